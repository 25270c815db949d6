"""The bpf() system call: maps, programs and links (uprobe_multi, perf event), each an fd.

``bpf(cmd, attr, size)`` takes one ``union bpf_attr``, whose member depends on
the command.  Each member this module uses is declared below as data
(``Layout``: field names and struct codes in the kernel's order, padding
included); fields not given are zero, which is what the kernel requires of
every field a command does not read.  Pointers in an attr (instructions,
the license, a log buffer, arrays of offsets) are addresses of ctypes
buffers that stay alive for the duration of the call.

Every object the kernel creates is an fd, and the fd is its only owner:
``Map``, ``Program`` and ``UprobeMultiLink`` hold one each and ``close()``
it.  A link holds its program, which holds the maps its instructions name,
so closing the link's fd (or dying: the kernel closes a dead process's fds)
removes the breakpoints and lowers the semaphores the link raised, then
frees the rest.  Nothing is pinned in bpffs, so nothing outlives the tracer.

The features used, and the kernels that brought them:

* ``BPF_MAP_TYPE_HASH`` and the command set (3.18);
  ``BPF_MAP_TYPE_PERCPU_ARRAY``: 4.6, a10423b87a7e ("bpf: introduce
  BPF_MAP_TYPE_PERCPU_ARRAY map"); a per-CPU map's value, as user space
  reads or writes it, is one 8-byte-aligned slot per *possible* CPU;
* ``BPF_MAP_TYPE_RINGBUF``: 5.8, 457f44363a88 ("bpf: Implement BPF ring
  buffer and verifier support for it"); its max_entries is the data size, a
  power-of-two multiple of the page size;
* ``BPF_LINK_CREATE`` with ``BPF_TRACE_UPROBE_MULTI``: 6.6, 89ae89f53d20
  ("bpf: Add multi uprobe link"): one link arms a program on many offsets of
  one file, each with its own ``ref_ctr_offset`` (the SDT semaphore, raised
  by the kernel in every process the breakpoint is inserted in) and cookie
  (0b779b61f651, "bpf: Add cookies support for uprobe_multi link"), for one
  process or all (b733eeade420, "bpf: Add pid filter support for
  uprobe_multi link").  The program must be loaded as a kprobe program with
  that expected attach type;
* ``BPF_PROG_TYPE_TRACEPOINT`` programs (4.7, 98b5c2c65c29, "perf, bpf: allow
  bpf programs attach to tracepoints"), whose context is the trace event's
  record as its ``format`` file lays it out, attached to a perf event of the
  tracepoint with ``BPF_LINK_CREATE`` and ``BPF_PERF_EVENT``: 5.15,
  b89fbfbb854c ("bpf: Implement minimal BPF perf link").  The link holds the
  perf event, so its fd is the attachment's only owner;
* the same perf links on uprobes of the uprobe PMU, where the kernel has no
  uprobe_multi links (``UprobePerfLinks``): the uprobe defined by
  perf_event_open itself (4.17, 33ea4b24277b, "perf/core: Implement the
  'perf_uprobe' PMU"), its semaphore in the attr's config (4.20,
  a6ca88b241d5, "trace_uprobe: support reference counter in fd-based
  uprobe"), the site's cookie in the link (5.15, 82e6b1eee6a8, "bpf: Allow to
  specify user-provided bpf_cookie for BPF perf links"), which
  bpf_get_attach_cookie() returns as it does on a uprobe_multi link.  The
  program is a kprobe program *without* the uprobe_multi expected attach type:
  the kernel refuses to attach a uprobe_multi program to a perf event (EINVAL).

A refused call raises BpfRefused, one line naming what was refused and the
errno by name.  A refused program load is retried once with a verifier log
buffer: the message ends with the log's verdict line, the whole log is on
the exception (``log``) and under logging.debug.
"""
import ctypes
import errno
import os
import struct
from typing import Iterable, List, Optional, Sequence, Tuple

from ..errors import BpfRefused
from . import perf
from .libc import libc, machine, syscall_number
from .log import logger

log = logger(__name__)

SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_F_SLEEPABLE = 1 << 4     # prog_flags: may fault user pages in (bpf_copy_from_user), 5.10
BPF_MAP_LOOKUP_BATCH = 24   # 5.6, cb4d03ab499d ("bpf: Add generic support for lookup batch op")
BPF_LINK_CREATE = 28

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type, enum bpf_attach_type
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PERF_EVENT = 41
BPF_TRACE_UPROBE_MULTI = 48

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

OBJECT_NAME_LENGTH = 16        # BPF_OBJ_NAME_LEN, NUL included
VERIFIER_LOG_BYTES = 1 << 20   # the kernel keeps the log's end when it is longer


class Layout:
    """One member of union bpf_attr, as data: ((field, struct code), ...), padding as
    (None, "Nx").  pack(**fields) gives its bytes, every field not named zero."""

    def __init__(self, *fields):
        self.fields = tuple(name for name, _code in fields if name)
        self.text = {name for name, code in fields if name and code.endswith("s")}
        self.struct = struct.Struct("<" + "".join(code for _name, code in fields))

    def pack(self, **values) -> bytes:
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"no field {', '.join(sorted(unknown))} in this bpf_attr member")
        return self.struct.pack(*(values.get(name, b"" if name in self.text else 0)
                                  for name in self.fields))


MAP_CREATE = Layout(("map_type", "I"), ("key_size", "I"), ("value_size", "I"),
                    ("max_entries", "I"), ("map_flags", "I"), ("inner_map_fd", "I"),
                    ("numa_node", "I"), ("map_name", f"{OBJECT_NAME_LENGTH}s"))
MAP_ELEMENT = Layout(("map_fd", "I"), (None, "4x"), ("key", "Q"), ("value", "Q"),
                     ("flags", "Q"))
MAP_BATCH = Layout(("in_batch", "Q"), ("out_batch", "Q"), ("keys", "Q"), ("values", "Q"),
                   ("count", "I"), ("map_fd", "I"), ("elem_flags", "Q"), ("flags", "Q"))
BATCH_ENTRIES = 4096           # entries read per BPF_MAP_LOOKUP_BATCH call
PROG_LOAD = Layout(("prog_type", "I"), ("insn_cnt", "I"), ("insns", "Q"), ("license", "Q"),
                   ("log_level", "I"), ("log_size", "I"), ("log_buf", "Q"),
                   ("kern_version", "I"), ("prog_flags", "I"),
                   ("prog_name", f"{OBJECT_NAME_LENGTH}s"), ("prog_ifindex", "I"),
                   ("expected_attach_type", "I"))
LINK_CREATE_UPROBE_MULTI = Layout(("prog_fd", "I"), ("target_fd", "I"), ("attach_type", "I"),
                                  ("flags", "I"), ("path", "Q"), ("offsets", "Q"),
                                  ("ref_ctr_offsets", "Q"), ("cookies", "Q"), ("cnt", "I"),
                                  ("uprobe_flags", "I"), ("pid", "I"), (None, "4x"))
LINK_CREATE_PERF_EVENT = Layout(("prog_fd", "I"), ("target_fd", "I"), ("attach_type", "I"),
                                ("flags", "I"), ("bpf_cookie", "Q"))
INSTRUCTION_SIZE = 8


def _refused(what: str, code: int, detail: str = "", log_text: Optional[str] = None):
    name = errno.errorcode.get(code, f"errno {code}")
    return BpfRefused(f"bpf: {what}: {name} ({os.strerror(code)}){detail}", what, code, log_text)


def bpf(command: int, attr: bytes, what: str) -> int:
    """bpf(`command`, `attr`): its non-negative result, or BpfRefused naming `what`.

    The caller keeps the buffers `attr` points into alive until this returns."""
    return bpf_buffer(command, ctypes.create_string_buffer(attr, len(attr)), what)


def bpf_buffer(command: int, buffer, what: str) -> int:
    """bpf() on `buffer`, a ctypes buffer holding the attr, which the kernel may write
    back (a batch's count)."""
    number = syscall_number(SYSCALL_BPF)
    if number is None:
        raise BpfRefused(f"bpf: {what}: unsupported machine {machine()!r}", what, None)
    result = libc().syscall(ctypes.c_long(number), ctypes.c_long(command), buffer,
                            ctypes.c_long(len(buffer)))
    if result < 0:
        raise _refused(what, ctypes.get_errno())
    return result


def _name(text: str) -> bytes:
    """An object name as the kernel takes it: at most 15 characters of [A-Za-z0-9_.]."""
    cleaned = "".join(char if char.isalnum() or char in "_." else "_" for char in text)
    return cleaned.encode("ascii", "replace")[:OBJECT_NAME_LENGTH - 1]


def possible_cpus() -> int:
    """How many CPUs this kernel may ever run (per-CPU map values have one slot each)."""
    with open("/sys/devices/system/cpu/possible") as file:
        text = file.read().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


class FdObject:
    """A kernel object owned by one fd: close() releases it; a context manager."""

    what = "bpf object"

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Release the object's fd; idempotent."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} fd={self.fd}>"


class Owned:
    """Kernel objects owned together: own() adds one, close() closes them newest first
    (so links go before the programs and maps they hold); close() is idempotent."""

    def __init__(self):
        self._objects = []

    def own(self, kernel_object):
        self._objects.append(kernel_object)
        return kernel_object

    def close(self) -> None:
        while self._objects:
            self._objects.pop().close()


class Map(FdObject):
    """A BPF map: fixed-size keys and values, looked up and updated by bytes."""

    def __init__(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                 name: str = "", flags: int = 0):
        fd = bpf(BPF_MAP_CREATE,
                 MAP_CREATE.pack(map_type=map_type, key_size=key_size, value_size=value_size,
                                 max_entries=max_entries, map_flags=flags,
                                 map_name=_name(name)),
                 f"creating map {name or map_type}")
        super().__init__(fd, name)
        self.map_type, self.key_size, self.value_size = map_type, key_size, value_size
        self.max_entries = max_entries
        self.per_cpu = map_type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)
        self.slot_size = (value_size + 7) & ~7
        self.value_bytes = self.slot_size * possible_cpus() if self.per_cpu else value_size

    @classmethod
    def hash(cls, key_size: int, value_size: int, max_entries: int, name: str = "") -> "Map":
        return cls(BPF_MAP_TYPE_HASH, key_size, value_size, max_entries, name)

    @classmethod
    def percpu_hash(cls, key_size: int, value_size: int, max_entries: int,
                    name: str = "") -> "Map":
        """A hash map whose values have one copy per CPU (4.6, 824bd0ce6c7c)."""
        return cls(BPF_MAP_TYPE_PERCPU_HASH, key_size, value_size, max_entries, name)

    @classmethod
    def percpu_array(cls, value_size: int, max_entries: int, name: str = "") -> "Map":
        """An array of `max_entries` u32-indexed values, one copy per CPU, zero-filled."""
        return cls(BPF_MAP_TYPE_PERCPU_ARRAY, 4, value_size, max_entries, name)

    @classmethod
    def ringbuf(cls, size: int, name: str = "") -> "Map":
        """A BPF ring buffer of `size` data bytes (a power-of-two number of pages)."""
        return cls(BPF_MAP_TYPE_RINGBUF, 0, 0, size, name)

    def _element(self, command: int, key: bytes, value=None, flags: int = 0,
                 what: str = "") -> int:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, not {self.key_size}")
        key_buffer = ctypes.create_string_buffer(key, len(key))
        attr = MAP_ELEMENT.pack(map_fd=self.fd, key=ctypes.addressof(key_buffer),
                                value=ctypes.addressof(value) if value is not None else 0,
                                flags=flags)
        return bpf(command, attr, f"{what} map {self.name}")

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value at `key` (per-CPU maps: every CPU's slot, concatenated), None if absent."""
        value = ctypes.create_string_buffer(self.value_bytes)
        try:
            self._element(BPF_MAP_LOOKUP_ELEM, key, value, what="looking up in")
        except BpfRefused as refused:
            if refused.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def lookup_per_cpu(self, key: bytes) -> List[bytes]:
        """A per-CPU map's value at `key`, one `value_size` bytes per possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[start:start + self.value_size]
                for start in range(0, len(raw), self.slot_size)]

    def total_per_cpu(self, key: bytes) -> int:
        """A per-CPU map's u64 counters at `key`, summed over the CPUs."""
        return sum(int.from_bytes(value, "little") for value in self.lookup_per_cpu(key))

    def items(self) -> Iterable[Tuple[bytes, bytes]]:
        """Every (key, value) of the map (per-CPU maps: every CPU's slot, concatenated),
        read in batches of BATCH_ENTRIES; where the kernel has no batch lookup for the
        map, key by key (BPF_MAP_GET_NEXT_KEY, then a lookup)."""
        keys = ctypes.create_string_buffer(self.key_size * BATCH_ENTRIES)
        values = ctypes.create_string_buffer(self.value_bytes * BATCH_ENTRIES)
        cursor = ctypes.create_string_buffer(max(self.key_size, 8))
        first = True
        while True:
            attr = ctypes.create_string_buffer(MAP_BATCH.pack(
                in_batch=0 if first else ctypes.addressof(cursor),
                out_batch=ctypes.addressof(cursor), keys=ctypes.addressof(keys),
                values=ctypes.addressof(values), count=BATCH_ENTRIES, map_fd=self.fd))
            try:
                bpf_buffer(BPF_MAP_LOOKUP_BATCH, attr, f"reading map {self.name}")
                done = False
            except BpfRefused as refused:
                if refused.errno == errno.EINVAL and first:
                    yield from self._items_one_by_one()
                    return
                if refused.errno != errno.ENOENT:
                    raise
                done = True                        # the last, possibly partial, batch
            count = MAP_BATCH.struct.unpack_from(attr.raw)[MAP_BATCH.fields.index("count")]
            raw_keys, raw_values = keys.raw, values.raw
            for index in range(count):
                yield (raw_keys[index * self.key_size:(index + 1) * self.key_size],
                       raw_values[index * self.value_bytes:(index + 1) * self.value_bytes])
            if done:
                return
            first = False

    def _items_one_by_one(self) -> Iterable[Tuple[bytes, bytes]]:
        key = ctypes.create_string_buffer(self.key_size)
        following = ctypes.create_string_buffer(self.key_size)
        current = None
        while True:
            attr = MAP_ELEMENT.pack(map_fd=self.fd,
                                    key=0 if current is None else ctypes.addressof(key),
                                    value=ctypes.addressof(following))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr, f"walking map {self.name}")
            except BpfRefused as refused:
                if refused.errno == errno.ENOENT:
                    return
                raise
            current = following.raw
            ctypes.memmove(key, following, self.key_size)
            value = self.lookup(current)
            if value is not None:
                yield current, value

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_bytes:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, "
                             f"not {self.value_bytes}")
        buffer = ctypes.create_string_buffer(value, len(value))
        self._element(BPF_MAP_UPDATE_ELEM, key, buffer, flags, what="updating")

    def delete(self, key: bytes) -> bool:
        """Remove `key`; whether it was there."""
        try:
            self._element(BPF_MAP_DELETE_ELEM, key, what="deleting from")
        except BpfRefused as refused:
            if refused.errno == errno.ENOENT:
                return False
            raise
        return True


def _verdict(log_text: str) -> str:
    """The line of a verifier log that says why: the last one before its statistics."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    reasons = [line for line in lines
               if not line.startswith(("processed ", "verification time", "stack depth"))]
    return reasons[-1].strip() if reasons else ""


class Program(FdObject):
    """A loaded BPF program; `instructions` is its bytecode (8 bytes per slot)."""

    def __init__(self, instructions: bytes, name: str, *,
                 prog_type: int = BPF_PROG_TYPE_KPROBE, expected_attach_type: int = 0,
                 license: str = "GPL", sleepable: bool = False):
        if not instructions or len(instructions) % INSTRUCTION_SIZE:
            raise ValueError(f"program {name}: {len(instructions)} bytes of instructions")
        what = f"loading program {name}"
        code = ctypes.create_string_buffer(instructions, len(instructions))
        license_text = ctypes.create_string_buffer(license.encode())
        fields = dict(prog_type=prog_type, insn_cnt=len(instructions) // INSTRUCTION_SIZE,
                      insns=ctypes.addressof(code), license=ctypes.addressof(license_text),
                      prog_name=_name(name), expected_attach_type=expected_attach_type,
                      prog_flags=BPF_F_SLEEPABLE if sleepable else 0)
        try:
            fd = bpf(BPF_PROG_LOAD, PROG_LOAD.pack(**fields), what)
        except BpfRefused as refused:
            raise self._explained(fields, what, refused.errno) from None
        super().__init__(fd, name)

    @staticmethod
    def _explained(fields: dict, what: str, code: int) -> BpfRefused:
        """The refusal of a load, with the verifier's log of a second attempt
        (`fields` still point into the caller's live buffers)."""
        buffer = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
        attr = PROG_LOAD.pack(**fields, log_level=1, log_size=VERIFIER_LOG_BYTES,
                              log_buf=ctypes.addressof(buffer))
        try:
            fd = bpf(BPF_PROG_LOAD, attr, what)
        except BpfRefused as again:
            code = again.errno
        else:                       # accepted the second time: report the first refusal
            os.close(fd)
        log_text = buffer.value.decode("utf-8", "replace")
        log.debug("%s: verifier log:\n%s", what, log_text)
        verdict = _verdict(log_text)
        return _refused(what, code, f": {verdict}" if verdict else "", log_text)


def _check_per_site(offsets: Sequence[int], ref_ctr_offsets: Optional[Sequence[int]],
                    cookies: Optional[Sequence[int]]) -> None:
    """ValueError unless ref_ctr_offsets and cookies, where given, have one value per offset."""
    count = len(offsets)
    for label, values in (("ref_ctr_offsets", ref_ctr_offsets), ("cookies", cookies)):
        if values is not None and len(values) != count:
            raise ValueError(f"{label}: {len(values)} values for {count} offsets")


class UprobeMultiLink(FdObject):
    """`program` armed on `offsets` of the file at `path`, for process `pid` (0: all).

    ref_ctr_offsets (0 where none) name the semaphore the kernel raises with each
    breakpoint; cookies are what bpf_get_attach_cookie() returns at each offset.
    `program` must be loaded with expected_attach_type BPF_TRACE_UPROBE_MULTI."""

    def __init__(self, program: Program, path: str, offsets: Sequence[int],
                 ref_ctr_offsets: Optional[Sequence[int]] = None,
                 cookies: Optional[Sequence[int]] = None, pid: int = 0):
        _check_per_site(offsets, ref_ctr_offsets, cookies)
        count = len(offsets)
        path_text = ctypes.create_string_buffer(os.fsencode(path))
        arrays = [_u64_array(values) for values in (offsets, ref_ctr_offsets, cookies)]
        attr = LINK_CREATE_UPROBE_MULTI.pack(
            prog_fd=program.fd, attach_type=BPF_TRACE_UPROBE_MULTI,
            path=ctypes.addressof(path_text), offsets=ctypes.addressof(arrays[0]),
            ref_ctr_offsets=ctypes.addressof(arrays[1]) if arrays[1] is not None else 0,
            cookies=ctypes.addressof(arrays[2]) if arrays[2] is not None else 0, cnt=count,
            pid=pid)
        what = f"attaching program {program.name} to {count} offsets of {path}"
        fd = bpf(BPF_LINK_CREATE, attr, what)
        super().__init__(fd, program.name)
        self.path, self.offsets, self.pid = path, tuple(offsets), pid


class PerfEventLink(FdObject):
    """`program` attached to the perf event open on `perf_fd` (a BPF perf link, 5.15,
    b89fbfbb854c), `cookie` what bpf_get_attach_cookie() returns there (82e6b1eee6a8).

    The link takes its own reference to the event: the caller may close `perf_fd`
    once this returns, leaving the link's fd the attachment's only owner."""

    def __init__(self, program: Program, perf_fd: int, cookie: int = 0):
        fd = bpf(BPF_LINK_CREATE,
                 LINK_CREATE_PERF_EVENT.pack(prog_fd=program.fd, target_fd=perf_fd,
                                             attach_type=BPF_PERF_EVENT, bpf_cookie=cookie),
                 f"attaching program {program.name} to perf event fd {perf_fd}")
        super().__init__(fd, program.name)


class UprobePerfLinks:
    """`program` armed on `offsets` of `path` as UprobeMultiLink arms it, where the
    kernel has no uprobe_multi links (before 6.6): per site, a uprobe of the uprobe PMU
    (perf.open_uprobe, its semaphore the site's ref_ctr_offset) and a PerfEventLink
    whose cookie is the site's.  The perf fds are closed once linked: each link holds
    its event, and this object holds the links, closed by close() newest first.

    pid=P arms process P; pid=0 every process, with one event opened on CPU 0 alone, as
    libbpf does: the program runs at every hit whatever the CPU (before perf's CPU
    filter), once per event, so one event per CPU would run it once per CPU.  A refusal
    is BpfRefused naming the site (ESRCH: no process P, as UprobeMultiLink says it) and
    closes the sites armed before it.  `program` is a BPF_PROG_TYPE_KPROBE program
    loaded without expected_attach_type BPF_TRACE_UPROBE_MULTI (a perf event refuses
    such a program: EINVAL); bpf_get_attach_cookie() works in it all the same."""

    def __init__(self, program: Program, path: str, offsets: Sequence[int],
                 ref_ctr_offsets: Optional[Sequence[int]] = None,
                 cookies: Optional[Sequence[int]] = None, pid: int = 0):
        _check_per_site(offsets, ref_ctr_offsets, cookies)
        self.name, self.path, self.offsets, self.pid = program.name, path, tuple(offsets), pid
        self._links = Owned()
        self.closed = False
        try:
            for index, offset in enumerate(offsets):
                perf_fd = perf.open_uprobe(path, offset,
                                           ref_ctr_offsets[index] if ref_ctr_offsets else 0,
                                           pid if pid else -1, -1 if pid else 0)
                try:
                    self._links.own(PerfEventLink(program, perf_fd,
                                                  cookies[index] if cookies else 0))
                finally:
                    os.close(perf_fd)
        except BaseException:
            self._links.close()
            raise

    def close(self) -> None:
        """Close every link, newest first, which disarms its site; idempotent."""
        self._links.close()
        self.closed = True

    def __enter__(self) -> "UprobePerfLinks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _u64_array(values: Optional[Iterable[int]]):
    if values is None:
        return None
    values = list(values)
    return (ctypes.c_uint64 * max(1, len(values)))(*values)
