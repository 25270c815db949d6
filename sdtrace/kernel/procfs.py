"""Reading /proc: who a process is, what it maps, and where a file's byte is.

Each reader fails one of two ways: ``ProcessGone`` (no such process, or one
being reaped) or ``ProcessDenied`` (it exists but its /proc file cannot be
read; an SdtraceError naming the file, suggesting root to non-root users).

* **Who.**  A PID is reused; (PID, start time) is not.  The start time is
  field 22 of /proc/PID/stat, in clock ticks since boot.  Fields are counted
  after the last ``)``, because the comm (field 2) may hold spaces and
  parentheses; a stat line cut short belongs to a task being reaped.
  ``alive(pid, starttime)`` says whether that very process still runs: one
  that has exited but is not reaped yet (a zombie, state Z, or X) keeps its
  /proc entry and start time, yet it is dead -- unless only its main thread
  exited (state Z too), which num_threads (field 20) above 1 tells.
* **What it maps.**  Each line of /proc/PID/maps is a ``Mapping``.  A file is
  named there by (device major, device minor, inode), which
  ``file_identity`` gives for a path or an open descriptor; paths are never
  compared (symlinks, other mount namespaces, deleted or replaced files).
* **Where a file's byte is.**  File offset F of a mapping that starts at file
  offset O and address A is at A + F - O.  One file page can be mapped
  several times with different permissions (the loader's RELRO part and the
  end of the text overlap the data segment), so ``mapped_addresses`` asks
  which permissions the caller wants: "wp" (writable private) for data the
  process writes, "x" for code.
"""
import os
from typing import NamedTuple, Tuple

from ..errors import AccessDenied

STATE_FIELD, PARENT_FIELD = 3, 4     # /proc/PID/stat fields (1-based)
THREADS_FIELD, STARTTIME_FIELD = 20, 22
DEAD_STATES = (b"Z", b"X")           # exited, not (or being) reaped

FileId = Tuple[int, int, int]        # (device major, device minor, inode)


class ProcessGone(Exception):
    """The process (or the memory a descriptor was opened on) no longer exists."""


class ProcessDenied(AccessDenied):
    """The process exists but its /proc files (or memory) cannot be read or written."""


class Mapping(NamedTuple):
    """One line of /proc/PID/maps."""
    start: int
    end: int
    perms: str          # "rw-p"
    offset: int         # file offset mapped at `start`
    file_id: FileId     # (0, 0, 0) for anonymous memory
    path: str

    def holds(self, file_offset):
        return self.offset <= file_offset < self.offset + (self.end - self.start)


def file_identity(file):
    """(major, minor, inode) of a path or open descriptor, as /proc/PID/maps writes them."""
    status = os.stat(file)
    return (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)


def is_file(path, identity):
    """Whether `path` names the file of `identity` (file_identity); False if it cannot
    be looked at."""
    try:
        return file_identity(path) == identity
    except OSError:
        return False


def read_proc(pid, name):
    """The bytes of /proc/PID/NAME."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as proc_file:
            return proc_file.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    except PermissionError as error:
        hint = "run as root" if os.geteuid() != 0 else "refused even to root"
        raise ProcessDenied(f"process {pid}: permission denied reading /proc/{pid}/{name} "
                            f"({hint})", f"/proc/{pid}/{name}", pid, error.errno) from None
    except OSError as error:
        raise ProcessDenied(f"process {pid}: cannot read /proc/{pid}/{name}: "
                            f"{error.strerror}", f"/proc/{pid}/{name}", pid, error.errno) from None


def read_stat(pid):
    """(parent PID, start time in clock ticks since boot) of process `pid`."""
    fields = _stat_fields(pid)
    return int(fields[PARENT_FIELD - 3]), int(fields[STARTTIME_FIELD - 3])


def _stat_fields(pid):
    """The fields of /proc/PID/stat from field 3 (state) on, as bytes."""
    stat = read_proc(pid, "stat")
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < STARTTIME_FIELD - 2:
        raise ProcessGone(pid)   # a stat line without its fields: the task is being reaped
    return fields


def read_starttime(pid):
    return read_stat(pid)[1]


def alive(pid, starttime):
    """Whether the process that started at `starttime` still has PID `pid` and has not
    exited (a zombie is dead)."""
    try:
        fields = _stat_fields(pid)
    except (ProcessGone, ProcessDenied):
        return False
    return (int(fields[STARTTIME_FIELD - 3]) == starttime
            and (fields[STATE_FIELD - 3] not in DEAD_STATES
                 or int(fields[THREADS_FIELD - 3]) > 1))


def descends_from(pid, ancestor):
    """Whether process `pid` is `ancestor` or one of its descendants."""
    try:
        while pid > 1 and pid != ancestor:
            pid = read_stat(pid)[0]
    except (ProcessGone, ProcessDenied):
        return False
    return pid == ancestor


def process_name(pid):
    """The comm of process `pid`, "?" if it cannot be read."""
    try:
        return read_proc(pid, "comm").decode("utf-8", "replace").strip()
    except (ProcessGone, ProcessDenied):
        return "?"


def parse_maps(text):
    """[Mapping] of a /proc/PID/maps text (bytes)."""
    mappings = []
    for line in text.decode("utf-8", "surrogateescape").splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        start, end = fields[0].split("-")
        major, minor = fields[3].split(":")
        mappings.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                                (int(major, 16), int(minor, 16), int(fields[4])),
                                fields[5] if len(fields) > 5 else ""))
    return mappings


def read_maps(pid):
    return parse_maps(read_proc(pid, "maps"))


def mapped_files(mappings):
    """{file_id: its first Mapping} of the files `mappings` map, in map order."""
    files = {}
    for mapping in mappings:
        if mapping.path.startswith("/") and mapping.file_id[2]:
            files.setdefault(mapping.file_id, mapping)
    return files


def mapped_addresses(mappings, file_id, offset, permissions):
    """Run-time addresses of file `file_id`'s byte at `offset`, one per mapping of it
    with all of `permissions` (letters of the maps' "rwxp" column, e.g. "wp")."""
    return [mapping.start + offset - mapping.offset for mapping in mappings
            if mapping.file_id == file_id and mapping.holds(offset)
            and all(permission in mapping.perms for permission in permissions)]
