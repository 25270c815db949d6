"""One process's memory through /proc/PID/mem: reading and writing its bytes, safely.

``ProcessMemory`` opens /proc/PID/mem once and checks the process's start
time, so a reused PID is never taken for the old process; the descriptor
keeps addressing the memory it was opened on, so after an exit I/O through
it fails (``ProcessGone``), and after an exec it fails too
(``MemoryReplaced``, a ProcessGone: the same process, a new image) instead of
reaching the new image.  That is how an exec is recognised for certain,
whatever order its notices arrive in.  An address that was unmapped between
reading the maps and touching the memory raises ``MappingGone``.
``counter_addresses`` says where a file's counter lives: only a writable
private VMA holds the live value, since the loader maps the same file page
read-only too (RELRO, the end of the text).

The semaphore layers above use these primitives both to write counters (the
manager) and only to read them (the audit).  ``CodePatch`` is one byte a
tracer wrote into a process's text (``-c``'s breakpoint in the loader),
described so that another process can undo it: ``undo`` restores it only in
the same process, in the same file mapping, while the byte is still ours.
"""
import errno
import os
from dataclasses import dataclass

from .procfs import (ProcessDenied, ProcessGone, alive, mapped_addresses, process_name,
                     read_maps, read_starttime)

COUNTER_SIZE = 2           # an SDT semaphore is an unsigned 16-bit counter


@dataclass(frozen=True)
class CodePatch:
    """Byte `patched` written over `original` at `address` of process (pid, starttime),
    where file (major, minor, inode) is mapped executable at `file_offset`."""
    pid: int
    starttime: int
    major: int
    minor: int
    inode: int
    file_offset: int
    address: int
    original: int
    patched: int

    def undo(self):
        """Writes the original byte back if the process, its mapping of the file and
        our byte are all still there; returns whether it did."""
        try:
            if not alive(self.pid, self.starttime):
                return False
            file_id = (self.major, self.minor, self.inode)
            if self.address not in mapped_addresses(read_maps(self.pid), file_id,
                                                    self.file_offset, "x"):
                return False          # exec'd or unmapped: not our text any more
            memory = ProcessMemory(self.pid, self.starttime)
            try:
                if memory.read(self.address, 1)[0] != self.patched:
                    return False
                memory.write(self.address, bytes([self.original]))
            finally:
                memory.close()
        except (ProcessGone, ProcessDenied, MappingGone):
            return False
        return True


class MemoryReplaced(ProcessGone):
    """The process lives on (same PID and start time) but exec'd: the memory a
    descriptor was opened on, and everything written into it, is gone."""


class MappingGone(Exception):
    """The process lives but the address is no longer mapped: it unmapped the file
    (dlclose) between our reading its maps and touching its memory."""


# --- where the counter is -----------------------------------------------------

def counter_addresses(mappings, file_id, offset):
    """Run-time addresses of the counter at file `offset` of file `file_id`, one per copy.

    Only a writable private VMA holds the live counter: the same file page
    can also be mapped read-only (RELRO, or the end of the text)."""
    return mapped_addresses(mappings, file_id, offset, "wp")



class ProcessMemory:
    """/proc/PID/mem of one process, opened once and checked against its start time.

    The descriptor addresses the memory of the process it was opened on: once
    that process exec's or exits, I/O through it fails (ProcessGone) rather
    than reaching a new image or a new process with the same PID."""

    def __init__(self, pid, starttime=None, writable=True):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem",
                              (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except OSError as error:
            self._denied(f"cannot open its memory: {error.strerror}", error.errno)
        try:
            self.starttime = read_starttime(pid)
            if starttime is not None and self.starttime != starttime:
                raise ProcessGone(pid)
        except BaseException:
            os.close(self.fd)
            raise

    def _denied(self, cause, code=None):
        if not os.path.exists(f"/proc/{self.pid}"):
            raise ProcessGone(self.pid)
        raise ProcessDenied(f"process {self.pid} ({process_name(self.pid)}): {cause}",
                            f"/proc/{self.pid}/mem", self.pid, code)

    def _failed(self, error, what, address):
        if not alive(self.pid, self.starttime):
            raise ProcessGone(self.pid)
        if error.errno in (errno.EIO, errno.EFAULT):
            raise MappingGone(self.pid)
        self._denied(f"cannot {what} its memory at 0x{address:x}: {error.strerror}", error.errno)

    def read(self, address, size):
        try:
            data = os.pread(self.fd, size, address)
        except OSError as error:
            self._failed(error, "read", address)
        if len(data) != size:
            self._gone()                  # the memory this descriptor was opened on is gone
        return data

    def _gone(self):
        if alive(self.pid, self.starttime):
            raise MemoryReplaced(self.pid)
        raise ProcessGone(self.pid)

    def read_counter(self, address, byteorder):
        return int.from_bytes(self.read(address, COUNTER_SIZE), byteorder)

    def write(self, address, data):
        """Writes `data` at `address` (also into read-only text, as a debugger does)."""
        try:
            written = os.pwrite(self.fd, data, address)
        except OSError as error:
            self._failed(error, "write", address)
        if written != len(data):
            self._gone()

    def write_counter(self, address, byteorder, value):
        self.write(address, value.to_bytes(COUNTER_SIZE, byteorder))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
