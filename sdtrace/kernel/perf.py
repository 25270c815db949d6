"""perf_event_open on trace events and on uprobe-PMU uprobes, and the per-CPU ring buffers
trace events write to.

A uprobe defined in tracefs is armed by opening it as a perf tracepoint
(type PERF_TYPE_TRACEPOINT, config = the event's id), the way ``perf record``
does.  Opening registers the uprobe: the kernel writes the breakpoints and
increments the SDT semaphores right away, even while the event is disabled,
and undoes both when the last fd on the event is closed.  The fds are the
only owners, so whatever way the tracer dies, the probed processes are left
clean.

Each fd samples every hit (sample_period 1) as a PERF_RECORD_SAMPLE carrying
IDENTIFIER | TID | TIME | CPU | RAW; RAW is the trace event record that
tracefs' ``format`` file describes.  TIME is CLOCK_MONOTONIC nanoseconds
(use_clockid).  sample_id_all makes PERF_RECORD_LOST carry the same trailer.

Per CPU, the first fd opened is mmapped as the *leader*: one metadata page
(struct perf_event_mmap_page; we use data_head, written by the kernel, and
data_tail, written by us) followed by 2**n data pages.  Every other fd on that
CPU is redirected into the leader's buffer with PERF_EVENT_IOC_SET_OUTPUT, so
a CPU has one ring however many probes there are.  Because we write
data_tail, the kernel never overwrites unread records: when the ring is full
it drops samples and later emits a PERF_RECORD_LOST with their count.

Reading copies the bytes between data_tail and data_head out of the mmap in
one or two slices (two when the region wraps), publishes the new data_tail,
then walks the records in that copy (``walk``).  The ABI asks for smp_rmb()
after reading data_head, which Python cannot issue; on x86-64 (TSO) loads
are ordered anyway, on weakly ordered CPUs this relies on the time between
the kernel's commit and our read.

``walk`` hands each sample to a *parser* chosen by the sample's id:
``parser(data, position, append)`` appends what it makes of the sample and
returns the record's size.
The default parsers (``SAMPLES``) make ``Sample`` tuples; events.py supplies
parsers generated per probe site, which is what keeps the hot loop fast.
Whatever a parser appends starts with the sample's time, the key of the
merge of the CPUs.

``open_uprobe`` opens the other kind of event: a uprobe of the dynamic uprobe
PMU, defined by the perf_event_open call itself (nothing in tracefs), with no
ring.  It exists for a BPF program to be attached to (bpf.UprobePerfLinks); its
breakpoints and semaphore raises go with the last reference to it.
"""
import ctypes
import errno
import mmap
import os
import select
import struct
from collections import deque
from operator import itemgetter
from typing import Callable, Iterable, List, Mapping, Optional, Tuple

from ..errors import BpfRefused, SdtraceError
from .libc import libc, machine, syscall_number

PERF_TYPE_TRACEPOINT = 2

# perf_event_attr.sample_type bits
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_RAW = 1 << 10
PERF_SAMPLE_IDENTIFIER = 1 << 16
SAMPLE_TYPE = (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME
               | PERF_SAMPLE_CPU | PERF_SAMPLE_RAW)

# perf_event_attr flag bits (the bitfield word after read_format)
ATTR_DISABLED = 1 << 0
ATTR_SAMPLE_ID_ALL = 1 << 18
ATTR_USE_CLOCKID = 1 << 25

PERF_FLAG_FD_CLOEXEC = 1 << 3
CLOCK_MONOTONIC = 1

# struct perf_event_attr, PERF_ATTR_SIZE_VER7 (128 bytes).
PERF_EVENT_ATTR = struct.Struct(
    "<"
    "I"    # type
    "I"    # size
    "Q"    # config
    "Q"    # sample_period
    "Q"    # sample_type
    "Q"    # read_format
    "Q"    # flags (disabled, inherit, ... bitfield)
    "I"    # wakeup_events
    "I"    # bp_type
    "Q"    # config1
    "Q"    # config2
    "Q"    # branch_sample_type
    "Q"    # sample_regs_user
    "I"    # sample_stack_user
    "i"    # clockid
    "Q"    # sample_regs_intr
    "I"    # aux_watermark
    "H"    # sample_max_stack
    "2x"   # __reserved_2
    "I"    # aux_sample_size
    "4x"   # __reserved_3
    "Q"    # sig_data
)


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    """Linux's generic _IOC() encoding (x86, arm, riscv...)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
PERF_EVENT_IOC_ENABLE = _ioc(_IOC_NONE, "$", 0, 0)                      # 0x2400
PERF_EVENT_IOC_DISABLE = _ioc(_IOC_NONE, "$", 1, 0)                     # 0x2401
PERF_EVENT_IOC_SET_OUTPUT = _ioc(_IOC_NONE, "$", 5, 0)                  # 0x2405
PERF_EVENT_IOC_SET_FILTER = _ioc(_IOC_WRITE, "$", 6, ctypes.sizeof(ctypes.c_void_p))  # 0x40082406
PERF_EVENT_IOC_ID = _ioc(_IOC_READ, "$", 7, ctypes.sizeof(ctypes.c_void_p))  # 0x80082407

SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "arm64": 241, "riscv64": 241,
                           "i386": 336, "i686": 336, "armv7l": 364, "ppc64le": 319,
                           "s390x": 331}

# struct perf_event_mmap_page: only the ring's control words matter here.
MMAP_DATA_HEAD = 1024          # offsetof(data_head); data_tail follows it
MMAP_DATA_TAIL = 1032
U64 = struct.Struct("<Q")

# Records.  perf_event_header is (u32 type, u16 misc, u16 size); records are
# 8-byte aligned, so a header never straddles the end of the ring.
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
RECORD_HEADER = struct.Struct("<IHH")
# SAMPLE with SAMPLE_TYPE: header, id, pid, tid, time, cpu, res, raw size, raw...
SAMPLE_RECORD = struct.Struct("<6xH Q II Q I4x I")
# LOST: header, id, lost (then the sample_id trailer, unused)
LOST_RECORD = struct.Struct("<8x 8x Q")

DEFAULT_RING_BYTES = 4 << 20
BACKLOG_LIMIT = 64 << 20   # bytes taken from the rings and not yet walked (RingSet)


def _perf_event_open_number() -> int:
    number = syscall_number(SYSCALL_PERF_EVENT_OPEN)
    if number is None:
        raise SdtraceError(f"perf_event_open: unsupported machine {machine()!r}")
    return number


def open_tracepoint(event_id: int, cpu: int = 0, *, disabled: bool = True,
                    wakeup_events: int = 0) -> int:
    """Open trace event `event_id` as a sampling perf event of every process on CPU
    `cpu`; return its fd.

    There is no per-process form: perf's ``inherit``, which would follow a
    process's threads and children, races on this kernel (engine/tracefs/
    scope.py keeps a process tree's samples instead).  wakeup_events=N makes poll wake
    every N samples in the ring (all events sharing it count); 0 wakes only
    when the ring is half full, so readers also poll with a timeout.  Each
    wakeup costs the probed thread an irq_work: measured in a VM, N=1 adds
    ~9 us to every hit, which otherwise costs ~1.5-3 us in all.
    """
    flags = ATTR_SAMPLE_ID_ALL | ATTR_USE_CLOCKID
    if disabled:
        flags |= ATTR_DISABLED
    attr = PERF_EVENT_ATTR.pack(
        PERF_TYPE_TRACEPOINT, PERF_EVENT_ATTR.size, event_id, 1, SAMPLE_TYPE, 0, flags,
        wakeup_events, 0, 0, 0, 0, 0, 0, CLOCK_MONOTONIC, 0, 0, 0, 0, 0)
    fd = _perf_event_open(attr, -1, cpu)
    if fd < 0:
        raise SdtraceError(_refusal(f"trace event {event_id}", -1, cpu, -fd))
    return fd


def _perf_event_open(attr: bytes, pid: int, cpu: int) -> int:
    """perf_event_open(`attr`, `pid`, `cpu`), close-on-exec: the fd, or -errno."""
    fd = libc().syscall(ctypes.c_long(_perf_event_open_number()), attr,
                        ctypes.c_long(pid), ctypes.c_long(cpu), ctypes.c_long(-1),
                        ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    return fd if fd >= 0 else -ctypes.get_errno()


def _refusal(what: str, pid: int, cpu: int, error: int) -> str:
    """The one line saying that perf_event_open refused `what` with errno `error`."""
    return (f"perf_event_open({what}, pid {pid}, cpu {cpu}): "
            f"{os.strerror(error)}{_open_hint(error)}")


UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"


def parse_format(text: str) -> Tuple[str, int, int]:
    """A PMU format file ("config:32-63", "config1:0") as (field, first bit, last bit)."""
    field, _, bits = text.strip().partition(":")
    if not field or not bits:
        raise ValueError(f"not a PMU format: {text!r}")
    first, _, last = bits.partition("-")
    return field, int(first), int(last or first)


def open_uprobe(path: str, offset: int, ref_ctr_offset: int = 0, pid: int = -1,
                cpu: int = -1) -> int:
    """A uprobe at `path`+`offset` as a perf event of the dynamic uprobe PMU (4.17,
    33ea4b24277b), with the semaphore at `ref_ctr_offset` (0: none) in the bits of
    `config` its format names (4.20, a6ca88b241d5); its fd, for a BPF program to be
    attached to.  The event is opened enabled and has no ring buffer: what it does is
    run the program attached to it at every hit its filter passes.

    pid=P probes process P (cpu -1); pid=-1 needs a cpu, and its event passes the hits
    of every process on every CPU to an attached program (the program runs before
    perf's CPU filter), so one event is all processes.  A refusal is BpfRefused with
    the kernel's errno (ESRCH: no process `pid`; EINVAL: `offset` outside the file, or
    another tracer holds the site with another semaphore), as bpf.UprobeMultiLink
    reports the same failures."""
    what = f"uprobe {path}:{offset:#x}"
    try:
        with open(os.path.join(UPROBE_PMU, "type")) as file:
            pmu_type = int(file.read())
        config = 0
        if ref_ctr_offset:
            with open(os.path.join(UPROBE_PMU, "format", "ref_ctr_offset")) as file:
                field, first, last = parse_format(file.read())
            if field != "config" or ref_ctr_offset >> (last - first + 1):
                raise ValueError(f"ref_ctr_offset {ref_ctr_offset:#x} does not fit {field}")
            config = ref_ctr_offset << first
    except (OSError, ValueError) as error:
        raise SdtraceError(f"{what}: no uprobe PMU here ({error})") from None
    path_text = ctypes.create_string_buffer(os.fsencode(path))
    attr = PERF_EVENT_ATTR.pack(
        pmu_type, PERF_EVENT_ATTR.size, config, 1, 0, 0, 0, 0, 0,
        ctypes.addressof(path_text), offset, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    fd = _perf_event_open(attr, pid, cpu)
    if fd < 0:
        raise BpfRefused(_refusal(what, pid, cpu, -fd), f"opening {what}", -fd)
    return fd


def _open_hint(error: int) -> str:
    if error in (errno.EACCES, errno.EPERM):
        return " (needs root, or a lower /proc/sys/kernel/perf_event_paranoid)"
    if error == errno.EINVAL:
        return (" (no such trace event; or for a uprobe: its offset is outside the file, or "
                "ref_ctr_offset mismatch: another tracer holds the same site with another or "
                "no semaphore)")
    return ""


def _ioctl(fd: int, request: int, argument=0) -> None:
    if libc().ioctl(fd, ctypes.c_ulong(request), argument) != 0:
        error = ctypes.get_errno()
        raise SdtraceError(f"perf fd {fd}: ioctl {request:#x} failed: {os.strerror(error)}")


def enable(fd: int) -> None:
    """Start sampling on `fd` (PERF_EVENT_IOC_ENABLE)."""
    _ioctl(fd, PERF_EVENT_IOC_ENABLE)


def set_filter(fd: int, expression: str) -> None:
    """Sample only the hits that the ftrace filter `expression` (over the event's fields,
    ``common_pid`` among them) matches; the kernel drops the others before the ring."""
    _ioctl(fd, PERF_EVENT_IOC_SET_FILTER, ctypes.c_char_p(expression.encode()))


def disable(fd: int) -> None:
    """Stop sampling on `fd` (PERF_EVENT_IOC_DISABLE); its uprobe stays armed until close."""
    _ioctl(fd, PERF_EVENT_IOC_DISABLE)


def hit_count(fd: int) -> int:
    """How many times `fd`'s event fired while enabled, sampled or lost."""
    return U64.unpack(os.read(fd, U64.size))[0]


def sample_id(fd: int) -> int:
    """The id the kernel puts in `fd`'s samples (PERF_EVENT_IOC_ID), unique per fd."""
    value = ctypes.c_uint64()
    _ioctl(fd, PERF_EVENT_IOC_ID, ctypes.byref(value))
    return value.value


def cpus() -> List[int]:
    """Online CPU numbers, from /sys/devices/system/cpu/online ("0-3,6")."""
    with open("/sys/devices/system/cpu/online") as file:
        text = file.read().strip()
    online = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        online.extend(range(int(first), int(last or first) + 1))
    return online


Sample = Tuple[int, int, int, int, int, bytes]   # (time, sample_id, pid, tid, cpu, raw)
Parser = Callable[[bytes, int, Callable], int]    # (data, position, append) -> record size
SAMPLE_ID_OFFSET = 8                              # the sample's id follows its header


def _sample(data: bytes, position: int, append: Callable) -> int:
    """The generic parser: the sample at `position` as a Sample tuple."""
    record_size, identifier, pid, tid, timestamp, cpu, raw_size = SAMPLE_RECORD.unpack_from(
        data, position)
    raw_start = position + SAMPLE_RECORD.size
    append((timestamp, identifier, pid, tid, cpu, data[raw_start:raw_start + raw_size]))
    return record_size


class _EverySample(dict):
    """Parsers that give every sample, whatever its id, to the generic parser."""

    def __missing__(self, _sample_id: int) -> Parser:
        return _sample


SAMPLES: Mapping[int, Parser] = _EverySample()


def walk(data: bytes, parsers: Mapping[int, Parser], append: Callable, start: int = 0,
         end: Optional[int] = None) -> Tuple[int, int]:
    """Feed the samples of the records in `data` that start in [start, end) to their parsers.

    parsers maps a sample id to its parser.  Returns (lost count, where the
    next record starts).
    """
    sample_type = PERF_RECORD_SAMPLE
    unpack_id = U64.unpack_from
    lost = 0
    position = start
    available = len(data) if end is None else min(end, len(data))
    while position < available:
        # data[position] is the low byte of the u32 type: kernel record types are < 256
        if data[position] == sample_type:
            position += parsers[unpack_id(data, position + SAMPLE_ID_OFFSET)[0]](
                data, position, append)
            continue
        record_type, _, record_size = RECORD_HEADER.unpack_from(data, position)
        if record_type == PERF_RECORD_LOST:
            lost += LOST_RECORD.unpack_from(data, position)[0]
        elif record_size < RECORD_HEADER.size:
            raise SdtraceError(f"perf ring: corrupt record (size {record_size}) at byte "
                               f"{position} of a read")
        position += record_size
    return lost, position


class Ring:
    """The mmapped ring buffer of one leader fd, plus the fds redirected into it.

    data_pages (a power of two) sets the size: the default, 4 MiB of data per
    ring, holds about 47,000 samples of a probe with an int and a string
    argument (88 bytes each), some 70 ms of a flood at ~1.5 us per hit: the
    time the reader may be away (one limited drain, a write, being scheduled
    out) without a loss.  It costs 4 MiB + one page of locked kernel memory
    per CPU.
    """

    def __init__(self, fd: int, data_pages: Optional[int] = None):
        page_size = mmap.PAGESIZE
        if data_pages is None:
            data_pages = max(1, DEFAULT_RING_BYTES // page_size)
        if data_pages <= 0 or data_pages & (data_pages - 1):
            raise SdtraceError(f"perf ring: {data_pages} data pages is not a power of two")
        try:
            self._map = mmap.mmap(fd, (1 + data_pages) * page_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            raise SdtraceError(f"perf fd {fd}: cannot mmap {data_pages} ring pages: "
                               f"{error.strerror}") from None
        self.fd = fd
        self.fds = [fd]
        self._data_start = page_size
        self._data_size = data_pages * page_size
        self._tail = U64.unpack_from(self._map, MMAP_DATA_TAIL)[0]

    def redirect(self, fd: int) -> None:
        """Send `fd`'s records into this ring (same CPU); the ring then owns `fd`."""
        _ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, self.fd)
        self.fds.append(fd)

    def take(self) -> bytes:
        """Consume every record available: a copy of their bytes, in ring order."""
        ring = self._map
        head = U64.unpack_from(ring, MMAP_DATA_HEAD)[0]
        tail = self._tail
        if head == tail:
            return b""
        size = self._data_size
        start = self._data_start
        begin = tail % size
        end = begin + (head - tail)
        if end <= size:
            data = ring[start + begin:start + end]
        else:
            data = ring[start + begin:start + size] + ring[start:start + end - size]
        self._tail = head
        U64.pack_into(ring, MMAP_DATA_TAIL, head)
        return data

    def close(self) -> None:
        """Close every fd of the ring (which stops it) and unmap it; idempotent."""
        if self._map.closed:
            return
        self._map.close()
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []


class RingSet:
    """One Ring per online CPU, fed by per-CPU fds of any number of trace events.

    Reading is in two steps.  The rings' new bytes are first copied into a
    backlog, which is cheap (a memcpy), so that the rings make room again at
    once; then the backlog is walked, which is the slow part, oldest bytes
    first and, when a limit is given, only that many bytes per drain.  So
    while the reader is behind a burst, each drain frees the rings within
    the time of one limited walk, and the burst piles up in the backlog, in
    ordinary memory, instead of overflowing the rings.  The backlog stops
    taking at BACKLOG_LIMIT bytes; then the rings fill and the kernel counts
    what it drops, as without a backlog.
    """

    def __init__(self, cpu_numbers: Optional[Iterable[int]] = None,
                 data_pages: Optional[int] = None):
        self.cpus = list(cpu_numbers) if cpu_numbers is not None else cpus()
        self._data_pages = data_pages
        self.rings: "dict[int, Ring]" = {}
        self._poll = select.poll()
        self._closed = False
        self._backlog: "deque[tuple[int, bytes, int]]" = deque()  # (cpu, data, next record)
        self.backlog_bytes = 0

    def open(self, event_id: int, *, wakeup_events: int = 0) -> List[int]:
        """Open `event_id` (disabled) on every CPU; return its sample ids, one per CPU."""
        identifiers = []
        for cpu in self.cpus:
            fd = open_tracepoint(event_id, cpu, wakeup_events=wakeup_events)
            try:
                identifiers.append(sample_id(fd))
                ring = self.rings.get(cpu)
                if ring is None:
                    self.rings[cpu] = Ring(fd, self._data_pages)
                    self._poll.register(fd, select.POLLIN)
                else:
                    ring.redirect(fd)
            except BaseException:
                os.close(fd)
                raise
        return identifiers

    def fds(self) -> List[int]:
        """Every open perf fd, leaders and redirected ones."""
        return [fd for ring in self.rings.values() for fd in ring.fds]

    def enable(self) -> None:
        """Start sampling on every fd."""
        for fd in self.fds():
            enable(fd)

    def set_filter(self, expression: str) -> None:
        """perf.set_filter on every fd."""
        for fd in self.fds():
            set_filter(fd, expression)

    def disable(self) -> None:
        """Stop sampling on every fd (the uprobes stay armed until close)."""
        for fd in self.fds():
            disable(fd)

    def hit_count(self) -> int:
        """Total hits of every fd while enabled: samples read + lost + still in the rings.

        Exact even when the kernel has not yet emitted the PERF_RECORD_LOST
        for the last samples it dropped (it does so only at the next write).
        """
        return sum(hit_count(fd) for fd in self.fds())

    def wait(self, timeout: Optional[float]) -> bool:
        """Block until a ring wakes (see wakeup_events) or `timeout` seconds pass.

        True if a ring woke; drain after a timeout too, rings may hold samples.
        """
        return bool(self._poll.poll(None if timeout is None else timeout * 1000))

    @property
    def pending(self) -> bool:
        """True while the backlog holds bytes that no drain has walked yet."""
        return bool(self._backlog)

    def drain(self, parsers: Mapping[int, Parser] = SAMPLES,
              limit: Optional[int] = None,
              taken: Optional[Callable[[], None]] = None) -> Tuple[list, int]:
        """Read the rings: (what the parsers made, ordered by time; lost count).

        Walks the whole backlog, or about `limit` bytes of it (whole records);
        `taken()` is called between copying the rings and walking.
        The order is exact within one drain; a sample of one CPU can be older
        than the last one a previous drain returned from another CPU.
        """
        self._take()
        if taken is not None:
            taken()
        backlog = self._backlog
        items: list = []
        append = items.append
        lost = walked = 0
        cpus_walked = set()
        while backlog and (limit is None or walked < limit):
            cpu, data, start = backlog[0]
            chunk_lost, reached = walk(data, parsers, append, start,
                                       None if limit is None else start + limit - walked)
            lost += chunk_lost
            walked += reached - start
            cpus_walked.add(cpu)
            if reached < len(data):
                backlog[0] = (cpu, data, reached)
            else:
                backlog.popleft()
        self.backlog_bytes -= walked
        if len(cpus_walked) > 1:   # a ring is in time order (the kernel writes with preemption off)
            items.sort(key=itemgetter(0))
        return items, lost

    def _take(self) -> None:
        """Move the rings' new bytes to the backlog, unless it is full."""
        for cpu, ring in self.rings.items():
            if self.backlog_bytes >= BACKLOG_LIMIT:
                return
            data = ring.take()
            if data:
                self._backlog.append((cpu, data, 0))
                self.backlog_bytes += len(data)

    def close(self) -> None:
        """Close every fd and unmap every ring; idempotent."""
        if self._closed:
            return
        self._closed = True
        for ring in self.rings.values():
            ring.close()

    def __enter__(self) -> "RingSet":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
