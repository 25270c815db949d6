"""The tracefs control files: uprobe definitions, their ids and formats.

A probe site becomes a kernel trace event by writing one line to
``uprobe_events``::

    p:GROUP/EVENT PATH:0xOFFSET(0xREF_CTR_OFFSET) NAME=FETCHARG:TYPE ...

That line only *defines* the event: nothing is armed until somebody opens it
(sdtrace opens it with perf_event_open, see perf.py).  The kernel then inserts
the breakpoint at PATH+OFFSET in every process mapping the file and, because
of ``(REF_CTR_OFFSET)``, increments the 16-bit SDT semaphore at that file
offset in each of them; closing the last perf fd undoes both.  So a tracer
that dies leaves only inert definitions behind.

Definitions are named per session: ``new_group()`` returns
``sdtrace_<pid>_<starttime>_<n>``, the owner's PID, its start time in clock
ticks (field 22 of /proc/PID/stat, which tells a live owner from a reused
PID) and a per-process counter.  ``remove_stale()`` deletes the groups whose
owner is gone and never touches other tools' groups or live sessions.

The definition syntax cannot quote: a PATH holding whitespace is refused
("path or fetch argument is empty or contains whitespace").  The kernel
resolves PATH to its inode once, when the line is written, and keeps that
inode, so such a file is defined through a symlink to it without whitespace,
``/run/sdtrace/paths/GROUP/NAME-DEV-INODE``, made only after checking that
it names the same (device, inode) as the path; the group's aliases go with
its definitions (``remove_group``, ``remove_stale``).

When the kernel refuses a definition, write(2) only says EINVAL or ENOENT;
the reason is the last entry of ``error_log`` (which we clear first).  One
refusal leaves no error_log entry: ``validate_ref_ctr_offset`` rejects a site
that another definition already uses with a different semaphore offset (or
none); we recognise it by finding that definition in ``uprobe_events``.

Each event's ``format`` file gives the layout of its raw sample: the common
fields, ``__probe_ip`` (``__probe_func``/``__probe_ret_ip`` for return
probes), then one field per fetch argument; strings are ``__data_loc char[]``
words holding (length << 16 | offset) of the NUL-terminated bytes, the offset
counted from the start of the record.  ``EventFormat`` turns that into a
struct format (``layout``) for all the argument words, counted from the start
of the record, plus fix-ups for the strings only.  events.py splices the same
layout into one Struct spanning the whole perf sample.
"""
import ctypes
import errno
import functools
import itertools
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

from ..errors import AccessDenied, KernelRefused, SdtraceError
from . import links
from .libc import libc
from .log import logger
from .procfs import alive, file_identity, is_file, read_starttime

MOUNT_POINTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
GROUP_PREFIX = "sdtrace_"
_SESSION_GROUP = re.compile(r"sdtrace_(\d+)_(\d+)_(\d+)\Z")
# "p:GROUP/EVENT PATH:0xOFFSET(0xREF_CTR_OFFSET) ARGS", as uprobe_events lists it
_DEFINITION_LINE = re.compile(r"[pr]:(\w+)/(\w+) (\S+):0x([0-9a-f]+)(?:\(0x([0-9a-f]+)\))?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_NAME_LENGTH = 63          # MAX_EVENT_NAME_LEN (64) includes the NUL
# symlinks to files whose path holds whitespace, one folder per group; beside the
# semaphore ledgers (semaphores/counters.RUN_DIR), and like them root's only
ALIAS_DIR = "/run/sdtrace/paths"
_WHITESPACE = re.compile(r"\s")
REMOVE_BUSY_TIMEOUT = 1.0     # seconds to wait for perf fds to go away

_log = logger(__name__)
_root: Optional[str] = None
_session_counter = itertools.count()


def root() -> str:
    """The tracefs mount point, mounting tracefs on /sys/kernel/tracing if needed."""
    global _root
    if _root is None:
        _root = next((mount_point for mount_point in MOUNT_POINTS
                      if os.path.exists(os.path.join(mount_point, "uprobe_events"))),
                     None) or _mount(MOUNT_POINTS[0])
    return _root


def _mount(mount_point: str) -> str:
    if libc().mount(b"nodev", mount_point.encode(), b"tracefs", 0, None) != 0:
        error = ctypes.get_errno()
        raise SdtraceError(
            f"tracefs: no uprobe_events under {' or '.join(MOUNT_POINTS)} and mounting "
            f"tracefs on {mount_point} failed: {os.strerror(error)}"
            + (" (needs root)" if error == errno.EPERM else ""))
    if not os.path.exists(os.path.join(mount_point, "uprobe_events")):
        raise SdtraceError(f"tracefs: {mount_point} has no uprobe_events "
                           "(kernel built without CONFIG_UPROBE_EVENTS)")
    return mount_point


def _path(*parts: str) -> str:
    return os.path.join(root(), *parts)


def _read(*parts: str) -> str:
    path = _path(*parts)
    try:
        with open(path) as file:
            return file.read()
    except OSError as error:
        raise SdtraceError(f"{path}: {error.strerror}") from None


# --- session groups -------------------------------------------------------------------

def new_group() -> str:
    """A group name for one tracing session: sdtrace_<pid>_<starttime>_<n>."""
    pid = os.getpid()
    return f"{GROUP_PREFIX}{pid}_{read_starttime(pid)}_{next(_session_counter)}"


def remove_stale() -> "list[str]":
    """Remove the session groups whose owner process is gone; return their names.

    A stale group that something still holds open (EBUSY) is left for a later call.
    """
    by_group = {}
    for group, event in _defined_events():
        by_group.setdefault(group, []).append((group, event))
    removed = []
    for group, events in sorted(by_group.items()):
        if not _owner_is_dead(group):
            continue
        try:
            _remove_events(events)
        except SdtraceError:
            continue
        _remove_aliases(group)
        removed.append(group)
    for group in _alias_groups():
        if group not in by_group and _owner_is_dead(group):
            _remove_aliases(group)
    return removed


def _owner_is_dead(group: str) -> bool:
    """Whether `group` is a session group whose owner process is gone."""
    owner = _SESSION_GROUP.match(group)
    return owner is not None and not alive(int(owner[1]), int(owner[2]))


# --- definitions ----------------------------------------------------------------------

@dataclass(frozen=True)
class UprobeDefinition:
    """One line of uprobe_events: an entry (or return) probe at path:offset."""
    group: str
    event: str
    path: str
    offset: int
    ref_ctr_offset: Optional[int] = None   # file offset of the SDT semaphore
    fetchargs: Tuple[str, ...] = ()        # "NAME=FETCHARG:TYPE" each
    retprobe: bool = False

    @property
    def name(self) -> str:
        return f"{self.group}/{self.event}"

    @property
    def site(self) -> str:
        return f"{self.path}:{self.offset:#x}"

    def line(self, path: Optional[str] = None) -> str:
        """The definition as written to uprobe_events, naming the file as `path` (an
        alias of it) if given; SdtraceError if it cannot be one."""
        for kind, name in (("group", self.group), ("event", self.event)):
            if not _IDENTIFIER.match(name) or len(name) > MAX_NAME_LENGTH:
                raise SdtraceError(f"uprobe {self.name}: {kind} name {name!r} is not a C "
                                   f"identifier of at most {MAX_NAME_LENGTH} characters")
        words = (path or self.path,) + tuple(self.fetchargs)
        if any(not word or word.split() != [word] for word in words):
            raise SdtraceError(f"uprobe {self.name}: path or fetch argument is empty or "
                               f"contains whitespace: {' '.join(map(repr, words))}")
        place = f"{words[0]}:{self.offset:#x}"
        if self.ref_ctr_offset is not None:
            place += f"({self.ref_ctr_offset:#x})"
        return " ".join((f"{'r' if self.retprobe else 'p'}:{self.name}", place) + words[1:])


def add_uprobe(group: str, event: str, path: str, offset: int,
               ref_ctr_offset: Optional[int] = None, fetchargs: Sequence[str] = (),
               retprobe: bool = False) -> None:
    """Define one uprobe event GROUP/EVENT; KernelRefused with the kernel's reason if refused."""
    add_uprobes([UprobeDefinition(group, event, path, offset, ref_ctr_offset,
                                  tuple(fetchargs), retprobe)])


def add_uprobes(definitions: Iterable[UprobeDefinition]) -> None:
    """Define many uprobe events through one open uprobe_events.

    All or nothing: if the kernel refuses one, those this call already added
    are removed again before KernelRefused is raised.
    """
    definitions = list(definitions)
    paths = {definition.path: _kernel_path(definition.group, definition.path)
             for definition in definitions}
    lines = [definition.line(paths[definition.path]) for definition in definitions]
    for definition in definitions:
        _check_offsets(definition)
    _clear_error_log()
    added, failure = [], None
    descriptor = _open_for_append("uprobe_events")
    try:
        for definition, line in zip(definitions, lines):
            try:
                os.write(descriptor, line.encode())
            except OSError as error:
                failure = KernelRefused(definition.name, definition.path, definition.offset,
                                        _refusal_reason(definition, line, error), error.errno)
                break
            added.append(definition)
            _log.debug("defined %s", line)
    finally:
        os.close(descriptor)
    if failure:
        _remove_events([(definition.group, definition.event) for definition in added])
        raise failure


def _kernel_path(group: str, path: str) -> str:
    """`path` if uprobe_events can take it, else a symlink to it under ALIAS_DIR/GROUP."""
    if not _WHITESPACE.search(path):
        return path
    try:
        status = os.stat(path)
    except OSError:
        return path                # refused by line(), naming the path
    name = f"{_WHITESPACE.sub('_', os.path.basename(path))}-{status.st_dev:x}-{status.st_ino}"
    alias = os.path.join(ALIAS_DIR, group, name)
    try:
        os.makedirs(os.path.dirname(alias), mode=0o700, exist_ok=True)
        if not os.path.islink(alias):
            os.symlink(os.path.abspath(path), alias)
        linked = os.stat(alias)
    except OSError as error:
        raise AccessDenied(f"{alias}: cannot make an alias without whitespace of {path}: "
                           f"{error.strerror}", alias, errno=error.errno) from None
    if (linked.st_dev, linked.st_ino) != (status.st_dev, status.st_ino):
        raise SdtraceError(f"{path}: replaced while it was being defined (through {alias})")
    _log.debug("%s: defined through %s", path, alias)
    return alias


def _alias_groups() -> "list[str]":
    try:
        return os.listdir(ALIAS_DIR)
    except OSError:
        return []


def _remove_aliases(group: str) -> None:
    shutil.rmtree(os.path.join(ALIAS_DIR, group), ignore_errors=True)


def _check_offsets(definition: UprobeDefinition) -> None:
    """Offsets past the end of the file are accepted by uprobe_events, refused only at open."""
    try:
        size = os.stat(definition.path).st_size
    except OSError:
        return                     # the kernel refuses it with a reason in error_log
    for what, offset in (("offset", definition.offset),
                         ("semaphore offset", definition.ref_ctr_offset)):
        if offset is not None and not 0 <= offset < size:
            raise SdtraceError(f"uprobe {definition.name} at {definition.site}: {what} "
                               f"{offset:#x} is outside the file ({size} bytes)")


def _open_for_append(name: str) -> int:
    path = _path(name)
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as error:
        raise SdtraceError(f"{path}: {error.strerror}") from None


def _clear_error_log() -> None:
    try:
        os.close(os.open(_path("error_log"), os.O_WRONLY | os.O_TRUNC))
    except FileNotFoundError:      # kernels before 5.2 have no error_log
        pass


def _refusal_reason(definition: UprobeDefinition, line: str, error: OSError) -> str:
    """Why the kernel refused `line`: error_log's entry, or the ref_ctr_offset conflict."""
    logged = _error_log_reason(line)
    if logged:
        return f"{logged} ({error.strerror})"
    if error.errno == errno.EINVAL:
        conflict = ref_ctr_conflict(definition.path, definition.offset,
                                    definition.ref_ctr_offset, definition.group)
        if conflict:
            return conflict
    return error.strerror


def _error_log_reason(line: str) -> Optional[str]:
    """The reason of the latest error_log entry whose command is `line`, if any."""
    try:
        log = _read("error_log")
    except SdtraceError:
        return None
    entries = re.findall(r"error: (.*)\n\s*Command: (.*)", log)
    return next((reason.strip() for reason, command in reversed(entries)
                 if command.strip() == line), None)


def ref_ctr_conflict(path: str, offset: int, ref_ctr_offset: Optional[int],
                     group: Optional[str] = None) -> Optional[str]:
    """Describe who holds `path`'s site at `offset` with another semaphore offset: a
    uprobe_events definition (of `group`, ours, or another tracer's), or a BPF link."""
    try:
        identity = file_identity(path)
    except OSError:
        return None
    for text in _read("uprobe_events").splitlines():
        match = _DEFINITION_LINE.match(text)
        if not match:
            continue
        their_group, event, their_path, their_offset, ref_ctr = match.groups()
        ref_ctr = int(ref_ctr, 16) if ref_ctr else 0
        if (int(their_offset, 16) == offset and ref_ctr != (ref_ctr_offset or 0)
                and is_file(their_path, identity)):
            holder = "" if their_group == group else "another tracer's "
            return (f"ref_ctr_offset mismatch: {holder}{their_group}/{event} holds the same "
                    f"site with {links.semaphore_text(ref_ctr)}")
    return links.conflict(identity, offset, ref_ctr_offset)


def _defined_events() -> "list[tuple[str, str]]":
    """(group, event) of every uprobe_events definition."""
    return [match.group(1, 2) for match in map(_DEFINITION_LINE.match,
                                                _read("uprobe_events").splitlines()) if match]


def remove_group(group: str) -> None:
    """Remove every event of `group`, and its path aliases; events already gone are fine."""
    _remove_events([entry for entry in _defined_events() if entry[0] == group])
    _remove_aliases(group)


def _remove_events(events: "list[tuple[str, str]]") -> None:
    """Remove GROUP/EVENT definitions, waiting briefly for perf fds still closing (EBUSY)."""
    if not events:
        return
    deadline = time.monotonic() + REMOVE_BUSY_TIMEOUT
    descriptor = _open_for_append("uprobe_events")
    try:
        for group, event in events:
            while True:
                try:
                    os.write(descriptor, f"-:{group}/{event}".encode())
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise SdtraceError(f"uprobe {group}/{event}: cannot remove it: "
                                           f"{error.strerror}" + (
                                               " (still open by a tracer)"
                                               if error.errno == errno.EBUSY else "")) from None
                    time.sleep(0.01)
    finally:
        os.close(descriptor)


# --- event ids and formats ------------------------------------------------------------

def event_id(group: str, event: str) -> int:
    """The trace event id of GROUP/EVENT (perf_event_attr.config for PERF_TYPE_TRACEPOINT)."""
    return int(_read("events", group, event, "id"))


@dataclass(frozen=True)
class Field:
    """One field of a trace event record, as the format file declares it."""
    name: str
    type: str          # C type as declared, e.g. "s32", "__data_loc char[]"
    offset: int
    size: int
    signed: bool

    @property
    def is_string(self) -> bool:
        return self.type.startswith("__data_loc")

    @property
    def struct_code(self) -> str:
        """struct format code of the field's word; strings decode their __data_loc u32."""
        if self.is_string:
            return "I"
        code = {1: "b", 2: "h", 4: "i", 8: "q"}.get(self.size)
        if code is None:
            return f"{self.size}s"             # arrays, odd sizes: raw bytes
        return code if self.signed else code.upper()


# Fields the kernel adds to every uprobe record, not probe arguments.
PROBE_IP_FIELDS = ("__probe_ip", "__probe_ret_ip")
_NON_ARGUMENT_FIELDS = ("__probe_ip", "__probe_func", "__probe_ret_ip")
_FIELD_LINE = re.compile(
    r"\s*field:(.+?)\s+([A-Za-z_]\w*)(\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);")


class EventFormat:
    """Layout of one event's raw samples and a decoder for its arguments.

    The tracer's parsers (events.py) are generated from `layout` and `args`.
    `decode(raw)`, the plain decoder, returns the argument values in
    declaration order: ints for integer fields, str for strings (None if the
    kernel could not read the string: a fault or NULL pointer), bytes for
    anything else; its Structs are only built when it is first used.
    """

    def __init__(self, group: str, event: str, fields: Sequence[Field]):
        self.group = group
        self.event = event
        self.fields = tuple(fields)
        self.args = tuple(field for field in self.fields
                          if not field.name.startswith("common_")
                          and field.name not in _NON_ARGUMENT_FIELDS)
        self.ip_field = next((field for field in self.fields
                              if field.name in PROBE_IP_FIELDS), None)
        layout, position = [], 0
        for field in self.args:
            layout.append(f"{field.offset - position}x{field.struct_code}")
            position = field.offset + field.size
        # struct format of the argument words, from the start of the raw record
        self.layout = "".join(layout)
        self.string_indexes = tuple(index for index, field in enumerate(self.args)
                                    if field.is_string)

    @functools.cached_property
    def struct(self) -> struct.Struct:
        """The argument words, from the start of the raw record."""
        return struct.Struct("<" + self.layout)

    def decode(self, raw: bytes) -> tuple:
        """The probe's argument values from a PERF_SAMPLE_RAW payload."""
        values = self.struct.unpack_from(raw)
        if not self.string_indexes:
            return values
        values = list(values)
        for index in self.string_indexes:
            location = values[index]
            length = location >> 16
            if length:
                offset = location & 0xFFFF
                # length counts the NUL the kernel always stores
                values[index] = raw[offset:offset + length - 1].decode(errors="replace")
            else:
                values[index] = None
        return tuple(values)

    def probe_ip(self, raw: bytes) -> Optional[int]:
        """The probed instruction's address (return address for return probes)."""
        if self.ip_field is None:
            return None
        return struct.unpack_from("<" + self.ip_field.struct_code, raw, self.ip_field.offset)[0]


def event_format(group: str, event: str) -> EventFormat:
    """Parse events/GROUP/EVENT/format."""
    fields = []
    for match in _FIELD_LINE.finditer(_read("events", group, event, "format")):
        type_, name, array, offset, size, signed = match.groups()
        fields.append(Field(name, type_ + (array or ""), int(offset), int(size),
                            signed == "1"))
    if not fields:
        raise SdtraceError(f"uprobe {group}/{event}: its format file declares no fields")
    return EventFormat(group, event, fields)
