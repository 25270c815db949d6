"""Process events: who forked, exec'd or exited, and who is opening a file.

The user-space semaphore manager (semaphores/manager.py) must learn of new processes
and new mappings promptly without polling all of /proc.  Two kernel
interfaces tell it, both read from non-blocking descriptors that a select()
loop can wait on:

* ``ProcEvents`` -- the proc connector.  A ``NETLINK_CONNECTOR`` datagram
  socket bound to the ``CN_IDX_PROC`` multicast group receives, after a
  ``PROC_CN_MCAST_LISTEN`` request, one message per fork, exec and exit on the
  whole system.  Each message is a netlink header, a ``cn_msg`` header, then
  a ``proc_event``: what happened, the CPU, a CLOCK_MONOTONIC timestamp and
  the task ids.  The timestamp lets the manager order an event against its
  own writes: a fork child holds a copy of every increment that was written
  into the parent before the fork.  The kernel sends the fork message before
  the child first runs, so it is queued before anything the child does.
  Needs CAP_NET_ADMIN.  When the socket buffer overflows, messages are lost
  and ``read()`` says so.

* ``FileOpens`` -- fanotify, marked on the inodes of a few files.  With
  permission events (``FAN_OPEN_PERM``, fanotify class CONTENT) the opener is
  held inside open(2) until we answer, which lets the caller look at the
  opener's memory map *before* it can map the file: a dlopen after a dlclose
  is told apart from a mapping that has been there all along even when the
  loader puts the fresh copy at the old address.  Every event is answered
  FAN_ALLOW, also when the callback fails; closing the group (or our death)
  allows whatever is pending.  Where the kernel has no permission events
  (CONFIG_FANOTIFY_ACCESS_PERMISSIONS=n) plain ``FAN_OPEN`` notifications are
  used and ``blocking`` is False.  Needs CAP_SYS_ADMIN.
"""
import errno
import os
import socket
import struct
from dataclasses import dataclass

from .libc import checked, libc
from .procfs import file_identity

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3
NETLINK_HEADER = struct.Struct("=IHHII")      # nlmsg_len type flags seq pid
CN_MSG_HEADER = struct.Struct("=IIIIHH")      # id.idx id.val seq ack len flags
PROC_EVENT_HEADER = struct.Struct("=IIQ")     # what cpu timestamp_ns
FORK_EVENT = struct.Struct("=iiii")           # parent_pid parent_tgid child_pid child_tgid
EXEC_EVENT = struct.Struct("=ii")             # process_pid process_tgid (exit starts alike)
LISTEN_REQUEST = struct.Struct("=I")          # enum proc_cn_mcast_op
PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT = 0x1, 0x2, 0x80000000
EVENT_OFFSET = NETLINK_HEADER.size + CN_MSG_HEADER.size
RECEIVE_BUFFER = 8 << 20

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_NOTIF, FAN_CLASS_CONTENT = 0x0, 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN, FAN_OPEN_PERM = 0x20, 0x10000
FAN_Q_OVERFLOW = 0x4000
FAN_ALLOW = 0x1
FAN_NOFD = -1
AT_FDCWD = -100
# event_len vers reserved metadata_len mask fd pid
FANOTIFY_EVENT = struct.Struct("=IBBHQii")
FANOTIFY_RESPONSE = struct.Struct("=iI")      # fd response


@dataclass(frozen=True)
class ProcEvent:
    kind: str           # "fork", "exec" or "exit"
    timestamp_ns: int   # CLOCK_MONOTONIC, comparable with time.monotonic_ns()
    pid: int            # the process (thread group) it happened to; for a fork, the child
    thread: int         # the task that forked/exec'd/exited (== pid for a process)
    parent: int         # for a fork, the parent process; else 0


class ProcEvents:
    """The proc connector: fork/exec/exit events of every process on the system."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                    NETLINK_CONNECTOR)
        try:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE
            except OSError:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.socket.bind((0, CN_IDX_PROC))
            request = (CN_MSG_HEADER.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, LISTEN_REQUEST.size, 0)
                       + LISTEN_REQUEST.pack(PROC_CN_MCAST_LISTEN))
            header = NETLINK_HEADER.pack(NETLINK_HEADER.size + len(request), NLMSG_DONE, 0, 0,
                                         self.socket.getsockname()[0])
            self.socket.send(header + request)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise

    def fileno(self):
        return self.socket.fileno()

    def read(self):
        """(events queued so far, True if the kernel dropped some); never blocks."""
        events, lost = [], False
        while True:
            try:
                message = self.socket.recv(65536)
            except BlockingIOError:
                return events, lost
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            event = _proc_event(message)
            if event is not None:
                events.append(event)

    def close(self):
        self.socket.close()


def _proc_event(message):
    if len(message) < EVENT_OFFSET + PROC_EVENT_HEADER.size + FORK_EVENT.size:
        return None
    what, _cpu, timestamp = PROC_EVENT_HEADER.unpack_from(message, EVENT_OFFSET)
    data = EVENT_OFFSET + PROC_EVENT_HEADER.size
    if what == PROC_EVENT_FORK:
        _parent_pid, parent_tgid, child_pid, child_tgid = FORK_EVENT.unpack_from(message, data)
        return ProcEvent("fork", timestamp, child_tgid, child_pid, parent_tgid)
    if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT):
        thread, pid = EXEC_EVENT.unpack_from(message, data)
        return ProcEvent("exec" if what == PROC_EVENT_EXEC else "exit", timestamp, pid, thread, 0)
    return None


@dataclass(frozen=True)
class FileOpen:
    pid: int            # the process that opened a marked file
    file_id: tuple      # (major, minor, inode) of that file
    seen: object        # what before_allow returned for it (None without permission events)


class FileOpens:
    """fanotify on a few files: which process opens which of them."""

    def __init__(self, paths):
        c_library = libc()
        event_flags = os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE
        self.fd, self.blocking = -1, True
        for group_class, mask in ((FAN_CLASS_CONTENT, FAN_OPEN_PERM), (FAN_CLASS_NOTIF, FAN_OPEN)):
            self.fd = checked(c_library.fanotify_init(group_class | FAN_CLOEXEC | FAN_NONBLOCK,
                                                      event_flags), "fanotify_init")
            try:
                for path in paths:
                    checked(c_library.fanotify_mark(self.fd, FAN_MARK_ADD, mask, AT_FDCWD,
                                                    os.fsencode(path)), f"fanotify_mark {path}")
                self.blocking = mask == FAN_OPEN_PERM
                return
            except OSError as error:
                os.close(self.fd)
                self.fd = -1
                if error.errno != errno.EINVAL or mask == FAN_OPEN:
                    raise

    def fileno(self):
        return self.fd

    def read(self, before_allow):
        """([FileOpen], True if the queue overflowed); never blocks.

        With permission events `before_allow(pid)` runs while the opener is
        still held in open(2); its result is the FileOpen's `seen`."""
        opens, overflowed = [], False
        while True:
            try:
                buffer = os.read(self.fd, 64 * FANOTIFY_EVENT.size)
            except BlockingIOError:
                return opens, overflowed
            position = 0
            while position + FANOTIFY_EVENT.size <= len(buffer):
                length, _version, _reserved, _header_length, mask, event_fd, pid = \
                    FANOTIFY_EVENT.unpack_from(buffer, position)
                position += max(length, FANOTIFY_EVENT.size)
                if mask & FAN_Q_OVERFLOW or event_fd == FAN_NOFD:
                    overflowed = True
                    continue
                opens.append(self._answer(event_fd, pid, mask, before_allow))

    def _answer(self, event_fd, pid, mask, before_allow):
        seen = None
        try:
            file_id = file_identity(event_fd)
            if mask & FAN_OPEN_PERM:
                try:
                    seen = before_allow(pid)
                except Exception:  # the opener must be let go whatever happened
                    seen = None
        finally:
            if mask & FAN_OPEN_PERM:
                os.write(self.fd, FANOTIFY_RESPONSE.pack(event_fd, FAN_ALLOW))
            os.close(event_fd)
        return FileOpen(pid, file_id, seen)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
