"""SDT semaphores counted in user space: one increment per {semaphore, process}.

An SDT semaphore is a 16-bit counter in the writable data of the file that
holds the probe; the code guarded by it runs only while it is non-zero.
Linux >= 4.20 counts it for a uprobe created with a ref_ctr_offset.  Without
that (old kernels, no uprobe PMU, or ``--semaphores=user``), the tracer arms
its uprobes without ref_ctr_offset and ``SemaphoreManager`` owns the
counters, writing them through ``/proc/PID/mem``.

The invariant: for every semaphore S of the session and every process M
mapping S's file, M's counter holds exactly one increment of this session
while it runs, and loses exactly that one when it stops.

* **Where the counter is.**  /proc/PID/maps lists the file's VMAs (read by
  procfs.py); they are matched by (device, inode), never by path.  The
  counter is in the VMA that is writable and private and whose file range
  holds the semaphore's file offset: the loader splits the data segment into
  an r--p RELRO part and an rw-p rest, and the page at the start of the data
  segment is also mapped read-only as the end of the text, so "the" mapping
  of a file offset is ambiguous until the permissions are asked.
* **Identity.**  A raised counter is a ``Holding``: PID, the process's start
  time (field 22 of /proc/PID/stat), device, inode, file offset and run-time
  address.  The address stands for the mapping: it is fixed by the load bias,
  whereas the start of the writable VMA moves when the loader carves the
  RELRO part off it.  A PID that is reused has another start time, so it is
  never taken for the old process.  Each process's /proc/PID/mem is opened
  once and kept: that descriptor keeps addressing the memory it was opened
  on, so after an exec (or exit) writes through it fail instead of landing in
  the new image.  Before every write the VMA is looked up again.
* **Counting once.**  A rescan finds the holding already present and does not
  raise again.  A held counter that reads 0 is not ours any more (the file
  was unmapped and mapped again at the same address): the holding is
  dropped and the fresh counter raised.  A process sharing its memory with
  a raised parent or child (CLONE_VM without a thread group: vfork,
  posix_spawn) holds the same counter; kcmp(KCMP_VM) tells, and it is not
  raised a second time.
* **New processes and mappings** (procwatch.py).  fork/exec/exit come from
  the proc connector.  A fork child holds a copy of each increment written
  into its parent before the fork (the event's timestamp against the write's
  time; a fork less than 0.1 s after the write is settled by comparing the
  child's value with the parent's): it is recorded as held, never written.
  A child of a holder, or one forked before the first scan ended, is then
  scanned for counters it did not copy.  exec
  and exit drop the process's holdings.  Opens of the files come from
  fanotify permission events: while the opener waits in open(2) its map is
  read, so a holding whose mapping is already gone (dlclose, then dlopen
  again) is dropped before the new mapping can appear at the old address;
  the process is then re-read a few times in the next two seconds and its
  new mapping raised.  Processes holding counters are re-read every two
  seconds to notice unmaps.  Without fanotify every process is re-read once a
  second.  The proc connector is required: without fork events a child's
  inherited increment cannot be told from its own.
* **Bounds and ownership.**  The counter is an unsigned 16-bit value: never
  raised past 0xffff, never lowered below 0, and only by what this session
  raised.  Read-modify-write of a counter by sdtrace processes is serialised
  by an flock on ``/run/sdtrace/counters.lock``; against the kernel's own
  ref_ctr updates (another session in kernel mode) the pread/pwrite pair is
  not atomic.  A process that vanished is forgotten silently; one that
  cannot be written is named in one warning and the others go on.
* **Crash recovery** (guardian.py).  Every change of the holdings is sent to
  a guardian process that reverts them when the session dies without
  saying goodbye, and keeps them in a ledger file under /run/sdtrace that
  ``revert_dead_ledgers()`` reverts if both are gone.
"""
import errno
import fcntl
import heapq
import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from .errors import SdtraceError
from .procfs import (FileId, ProcessDenied, ProcessGone, alive, file_identity,
                     mapped_addresses, parse_maps, process_name, read_maps, read_proc,
                     read_starttime, read_stat)

RUN_DIR = "/run/sdtrace"
COUNTER_LOCK = "counters.lock"
COUNTER_LIMIT = 0xffff
COUNTER_SIZE = 2
RECHECK_DELAYS = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 2.0)   # after an open or an exec
RECONCILE_INTERVAL = 2.0             # re-read the processes that hold counters
FULL_SCAN_INTERVAL = 1.0             # without fanotify: re-read every process
FORK_AMBIGUITY_NS = 100_000_000      # a fork this close after a write is settled by the values
KCMP_VM = 1
KCMP_SYSCALLS = {"x86_64": 312, "aarch64": 272, "i686": 349, "i386": 349}


@dataclass(frozen=True)
class Semaphore:
    """One counter of one file, as the session arms it."""
    file_id: FileId
    offset: int                                  # file offset of the counter
    path: str = field(compare=False)
    byteorder: str = field(compare=False)        # "little" or "big", from the ELF header


@dataclass(frozen=True)
class Holding:
    """One counter of one process that a session raised: which memory it is."""
    pid: int
    starttime: int
    major: int
    minor: int
    inode: int
    offset: int                                  # file offset of the counter
    address: int                                 # its run-time address in the process
    byteorder: str
    path: str = field(compare=False)

    @property
    def file_id(self):
        return (self.major, self.minor, self.inode)


class MappingGone(Exception):
    """The process lives but the address is no longer mapped: it unmapped the file
    (dlclose) between our reading its maps and touching its memory."""


# --- where the counter is -----------------------------------------------------

def counter_addresses(mappings, file_id, offset):
    """Run-time addresses of the counter at file `offset` of file `file_id`, one per copy.

    Only a writable private VMA holds the live counter: the same file page
    can also be mapped read-only (RELRO, or the end of the text)."""
    return mapped_addresses(mappings, file_id, offset, "wp")


def maps_hold(mappings, holding):
    """Whether the memory `holding` names is still mapped as it was."""
    return holding.address in counter_addresses(mappings, holding.file_id, holding.offset)


# --- one process's memory -----------------------------------------------------

class ProcessMemory:
    """/proc/PID/mem of one process, opened once and checked against its start time.

    The descriptor addresses the memory of the process it was opened on: once
    that process exec's or exits, I/O through it fails (ProcessGone) rather
    than reaching a new image or a new process with the same PID."""

    def __init__(self, pid, starttime=None, writable=True):
        self.pid = pid
        self.opened_ns = time.monotonic_ns()
        try:
            self.fd = os.open(f"/proc/{pid}/mem",
                              (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except OSError as error:
            self._denied(f"cannot open its memory: {error.strerror}")
        try:
            self.starttime = read_starttime(pid)
            if starttime is not None and self.starttime != starttime:
                raise ProcessGone(pid)
        except BaseException:
            os.close(self.fd)
            raise

    def _denied(self, cause):
        if not os.path.exists(f"/proc/{self.pid}"):
            raise ProcessGone(self.pid)
        raise ProcessDenied(f"process {self.pid} ({process_name(self.pid)}): {cause}")

    def _failed(self, error, what, address):
        if not alive(self.pid, self.starttime):
            raise ProcessGone(self.pid)
        if error.errno in (errno.EIO, errno.EFAULT):
            raise MappingGone(self.pid)
        self._denied(f"cannot {what} its memory at 0x{address:x}: {error.strerror}")

    def read(self, address, size):
        try:
            data = os.pread(self.fd, size, address)
        except OSError as error:
            self._failed(error, "read", address)
        if len(data) != size:
            raise ProcessGone(self.pid)   # the memory this descriptor was opened on is gone
        return data

    def read_counter(self, address, byteorder):
        return int.from_bytes(self.read(address, COUNTER_SIZE), byteorder)

    def write_counter(self, address, byteorder, value):
        try:
            written = os.pwrite(self.fd, value.to_bytes(COUNTER_SIZE, byteorder), address)
        except OSError as error:
            self._failed(error, "write", address)
        if written != COUNTER_SIZE:
            raise ProcessGone(self.pid)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ensure_run_dir():
    try:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    except OSError as error:
        raise SdtraceError(f"{RUN_DIR}: cannot create: {error.strerror} (run as root)") from None


class CounterLock:
    """Serialises read-modify-write of counters among sdtrace processes (``with lock:``).

    The lock file is opened at the first use and kept until close().  Not
    reentrant, and one holder at a time: callers serialise their own threads."""

    def __init__(self):
        self.fd = -1

    def __enter__(self):
        if self.fd < 0:
            ensure_run_dir()
            self.fd = os.open(os.path.join(RUN_DIR, COUNTER_LOCK),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lower_counter(memory, mappings, holding, count, warn):
    """Takes `count` increments back from `holding`'s counter; False if its memory is gone."""
    if not maps_hold(mappings, holding):
        return False
    try:
        value = memory.read_counter(holding.address, holding.byteorder)
        if value < count:
            warn(f"process {holding.pid} ({process_name(holding.pid)}): semaphore at "
                 f"{holding.path}+0x{holding.offset:x} is {value}, less than the {count} this "
                 f"session raised; lowering it to 0 only")
        memory.write_counter(holding.address, holding.byteorder, max(0, value - count))
    except MappingGone:
        return False      # unmapped just now: the increment went with the memory
    return True


def revert_holdings(holdings, warn):
    """Lowers each (Holding, count), re-checking every process and mapping first."""
    by_process = {}
    for holding, count in holdings:
        by_process.setdefault((holding.pid, holding.starttime), []).append((holding, count))
    lock = CounterLock()
    try:
        for (pid, starttime), entries in by_process.items():
            try:
                memory = ProcessMemory(pid, starttime)
            except ProcessGone:
                continue
            except ProcessDenied as error:
                warn(str(error))
                continue
            try:
                mappings = read_maps(pid)
                with lock:
                    for holding, count in entries:
                        lower_counter(memory, mappings, holding, count, warn)
            except ProcessGone:
                pass
            except ProcessDenied as error:
                warn(str(error))
            finally:
                memory.close()
    finally:
        lock.close()


def warn_to_stderr(message):
    sys.stderr.write(f"sdtrace: warning: {message}\n")


def _shares_memory(pid, other):
    """Whether two processes share one address space (CLONE_VM, e.g. vfork)."""
    from .libc import libc, syscall_number

    number = syscall_number(KCMP_SYSCALLS)
    if number is None:
        return False
    return libc().syscall(number, pid, other, KCMP_VM, 0, 0) == 0


# --- the manager --------------------------------------------------------------

@dataclass
class _Count:
    count: int          # increments of this session in that memory
    since_ns: int       # when the write that last raised it began (a fork: its time)
    until_ns: int       # when that write ended
    parent: int = 0     # the process's parent when it was raised
    released_ns: Optional[int] = None   # set once stop() took them back


class SemaphoreManager:
    """Raises the given semaphores once in every process that maps them, until stop().

        manager = SemaphoreManager.for_probes(probes).start()
        ...
        manager.stop()

    `semaphores` are (file path, semaphore file offset) pairs; several sites
    sharing a counter name it once.  `scope` limits which processes are
    raised: None for all, a collection of PIDs, or a predicate on a PID.
    Fork children of raised processes are always tracked (they hold a copy of
    the increment).  `guardian=False` skips crash recovery; `warn` receives
    one-line warnings (default: stderr).  A manager runs one session: start()
    once, stop() once.  Needs root.
    """

    def __init__(self, semaphores, scope=None, *, guardian=True, warn=warn_to_stderr):
        from .elf import ElfFile

        unique, files = {}, {}   # files: path -> (file_id, byte order)
        for path, offset in semaphores:
            if path not in files:
                try:
                    file_id = file_identity(path)
                except OSError as error:
                    raise SdtraceError(f"{path}: {error.strerror}") from None
                with ElfFile(path) as elf:
                    files[path] = file_id, elf.byteorder
            file_id, byteorder = files[path]
            unique.setdefault((file_id, offset), Semaphore(file_id, offset, path, byteorder))
        self.semaphores = tuple(unique.values())
        self._tokens = {f" {semaphore.file_id[2]} ".encode() for semaphore in self.semaphores}
        if scope is None or callable(scope):
            self._scope_pids, self._in_scope = None, scope or (lambda _pid: True)
        else:
            self._scope_pids = frozenset(scope)
            self._in_scope = self._scope_pids.__contains__
        self._use_guardian = guardian
        self._warn = warn
        self._lock = threading.RLock()
        self._held = {}          # pid -> {Holding: _Count}
        self._memories = {}      # pid -> ProcessMemory
        self._counter_lock = CounterLock()
        self._warned = set()
        self._rechecks = []      # heap of (monotonic time, pid)
        self._guardian = self._events = self._opens = self._thread = None
        self._stopping = threading.Event()
        self._wake_read = self._wake_write = -1
        self._started = False
        self._scanned_ns = None  # when the first scan ended

    @classmethod
    def for_probes(cls, probes, scope=None, **options):
        """The manager for the semaphores of `probes` (notes.Probe records).

        A probe whose semaphore lies outside every writable segment is refused."""
        semaphores = []
        for probe in probes:
            if probe.semaphore_error:
                raise SdtraceError(f"{probe.file}: {probe.qualified_name}: unusable semaphore: "
                                   f"{probe.semaphore_error}")
            if probe.semaphore is not None:
                semaphores.append((probe.file, probe.semaphore))
        return cls(semaphores, scope, **options)

    # -- life cycle ---------------------------------------------------------

    def start(self):
        """Subscribes to process events, then raises every counter already mapped."""
        if self._started:
            return self
        from . import procwatch

        if os.geteuid() != 0:
            raise SdtraceError("user-space semaphores need root (they write other processes' "
                               "memory and listen to the proc connector)")
        try:
            self._events = procwatch.ProcEvents()
        except OSError as error:
            raise SdtraceError(f"user-space semaphores need the proc connector (fork/exec/exit "
                               f"events; run as root): {error.strerror}") from None
        try:
            if self._use_guardian:
                from .guardian import GuardianLink

                self._guardian = GuardianLink(self._warn)
            try:
                self._opens = procwatch.FileOpens(sorted({s.path for s in self.semaphores}))
                if not self._opens.blocking:
                    self._warn("fanotify has no permission events here: a library unloaded "
                               "and loaded again at the same address is noticed late")
            except OSError as error:
                self._warn(f"fanotify unavailable ({error.strerror}): new mappings are found "
                           f"by re-reading every process each {FULL_SCAN_INTERVAL:g}s")
            self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._started = True
            self._thread = threading.Thread(target=self._watch, name="sdtrace-semaphores",
                                            daemon=True)
            self._thread.start()
            self.rescan()
            self._scanned_ns = time.monotonic_ns()
        except BaseException:
            self.stop()
            raise
        return self

    def rescan(self, pids=None):
        """Looks at the processes in scope (or `pids`) again; raises only counters not yet held."""
        for pid in self._candidates() if pids is None else pids:
            with self._lock:
                self._scan_pid(pid, may_raise=True)

    def holdings(self):
        """{Holding: count} of the counters this session holds now."""
        with self._lock:
            return {holding: counted.count for held in self._held.values()
                    for holding, counted in held.items() if counted.released_ns is None}

    def stop(self):
        """Lowers every counter this session raised; safe to call twice."""
        if not self._started and self._events is None:
            return
        self._started = False
        self._stopping.set()
        if self._thread is not None:
            os.write(self._wake_write, b"x")
            self._thread.join()
        if self._opens is not None:
            self._opens.close()
        with self._lock:
            if self._events is not None:
                self._handle_proc_events()
                self._lower_everything()
                self._handle_proc_events()  # forks that copied an increment before it was lowered
                self._events.close()
            for memory in self._memories.values():
                memory.close()
            self._memories.clear()
            self._held.clear()
            self._counter_lock.close()
            if self._guardian is not None:
                self._guardian.finish()
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._events = self._opens = self._thread = self._guardian = None
        self._wake_read = self._wake_write = -1

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- scanning -----------------------------------------------------------

    def _candidates(self):
        if self._scope_pids is not None:
            return sorted(self._scope_pids)
        return sorted(pid for pid in (int(name) for name in os.listdir("/proc") if name.isdigit())
                      if self._in_scope(pid))

    def _scan_pid(self, pid, may_raise):
        """Drops the holdings of `pid` that are gone and raises its new counters."""
        try:
            parent, starttime = read_stat(pid)
            text = read_proc(pid, "maps")
            held = self._held.get(pid, {})
            if held and next(iter(held)).starttime != starttime:
                self._forget(pid)
                held = {}
            if not held and not any(token in text for token in self._tokens):
                return
            present = []
            mappings = parse_maps(text)
            for semaphore in self.semaphores:
                for address in counter_addresses(mappings, semaphore.file_id, semaphore.offset):
                    present.append(Holding(pid, starttime, *semaphore.file_id, semaphore.offset,
                                           address, semaphore.byteorder, semaphore.path))
            for holding in [h for h in held if h not in present]:
                self._drop(holding)
            if not may_raise:
                present = [holding for holding in present if holding in held]
            if not present or (not held and self._shares_held_memory(pid, parent)):
                return
            memory = self._memory(pid, starttime)
            with self._counter_lock:
                for holding in present:
                    value = memory.read_counter(holding.address, holding.byteorder)
                    if holding in held:
                        if value != 0:
                            continue
                        # Our increment is not in this memory: it is a fresh mapping of the file.
                        self._drop(holding)
                        if not may_raise:
                            continue
                    self._raise(memory, holding, value, parent)
        except MappingGone:
            self._schedule(pid)       # its maps changed while we looked: look again
        except ProcessGone:
            self._forget(pid)
        except ProcessDenied as error:
            self._warn_once(pid, error)
        finally:
            self._close_idle_memory(pid)

    def _memory(self, pid, starttime):
        memory = self._memories.get(pid)
        if memory is not None and memory.starttime != starttime:
            self._forget(pid)
            memory = None
        if memory is None:
            memory = self._memories[pid] = ProcessMemory(pid, starttime)
        return memory

    def _shares_held_memory(self, pid, parent):
        """Whether `pid` shares its memory with its parent or a child we hold (vfork)."""
        relatives = [parent] if parent in self._held else []
        relatives += [other for other, held in self._held.items()
                      if next(iter(held.values())).parent == pid]
        return any(_shares_memory(pid, other) for other in relatives)

    def _raise(self, memory, holding, value, parent):
        if value >= COUNTER_LIMIT:
            self._warn_once(holding, f"process {holding.pid} ({process_name(holding.pid)}): "
                            f"semaphore at {holding.path}+0x{holding.offset:x} is already "
                            f"0x{value:x}; not raised")
            return
        since = time.monotonic_ns()
        memory.write_counter(holding.address, holding.byteorder, value + 1)
        self._record(holding, _Count(1, since, time.monotonic_ns(), parent))

    def _record(self, holding, counted):
        held = self._held.setdefault(holding.pid, {})
        previous = held.get(holding)
        if previous is not None:
            counted.count += previous.count
        held[holding] = counted
        self._tell(holding, counted.count)

    def _drop(self, holding):
        """Forgets a holding whose memory is gone, without writing."""
        held = self._held.get(holding.pid, {})
        if held.pop(holding, None) is not None:
            self._tell(holding, 0)
        if not held:
            self._held.pop(holding.pid, None)

    def _close_idle_memory(self, pid):
        if pid not in self._held and pid in self._memories:
            self._memories.pop(pid).close()

    def _forget(self, pid, before_ns=None):
        """Drops the holdings of `pid` made before `before_ns` (all if None), without writing."""
        held = self._held.get(pid, {})
        for holding, counted in list(held.items()):
            if before_ns is None or counted.since_ns < before_ns:
                del held[holding]
                self._tell(holding, 0)
        if not held:
            self._held.pop(pid, None)
        memory = self._memories.get(pid)
        if memory is not None and (not held or before_ns is None or memory.opened_ns < before_ns):
            memory.close()
            del self._memories[pid]

    def _tell(self, holding, count):
        if self._guardian is not None:
            self._guardian.record(holding, count)

    def _warn_once(self, subject, message):
        """Warns once per process (or other subject) per session."""
        if subject not in self._warned:
            self._warned.add(subject)
            self._warn(str(message))

    # -- events -------------------------------------------------------------

    def _watch(self):
        """The watcher thread: process events, file opens, due re-reads."""
        sources = [self._wake_read, self._events]
        if self._opens is not None:
            sources.append(self._opens)
        last_reconcile = last_full_scan = time.monotonic()
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                timeout = RECONCILE_INTERVAL - (now - last_reconcile)
                if self._opens is None:
                    timeout = min(timeout, FULL_SCAN_INTERVAL - (now - last_full_scan))
                if self._rechecks:
                    timeout = min(timeout, self._rechecks[0][0] - now)
                readable = select.select(sources, [], [], max(0.0, timeout))[0]
                if self._stopping.is_set():
                    break
                if self._opens in readable:
                    opens, overflowed = self._opens.read(self._snapshot)
                    with self._lock:
                        self._handle_proc_events()  # a fork is queued before the child can open
                        for file_open in opens:
                            self._on_open(file_open)
                    if overflowed:
                        self.rescan()
                elif self._events in readable:
                    with self._lock:
                        self._handle_proc_events()
                self._run_rechecks()
                now = time.monotonic()
                if now - last_reconcile >= RECONCILE_INTERVAL:
                    last_reconcile = now
                    with self._lock:
                        for pid in list(self._held):
                            self._scan_pid(pid, may_raise=self._in_scope(pid))
                if self._opens is None and now - last_full_scan >= FULL_SCAN_INTERVAL:
                    last_full_scan = now
                    self.rescan()
            except Exception as error:  # keep answering fanotify whatever went wrong
                self._warn_once(("watcher", str(error)),
                                f"semaphore watcher: {type(error).__name__}: {error}")
                time.sleep(0.1)

    def _snapshot(self, pid):
        """The opener's map while it waits in open(2), if it holds counters of ours."""
        if pid not in self._held:
            return None
        started = time.monotonic_ns()
        try:
            return started, read_maps(pid)
        except (ProcessGone, ProcessDenied):
            return None

    def _on_open(self, file_open):
        pid = file_open.pid
        if file_open.seen is not None:
            seen_ns, mappings = file_open.seen
            for holding, counted in list(self._held.get(pid, {}).items()):
                if (holding.file_id == file_open.file_id and counted.since_ns < seen_ns
                        and not maps_hold(mappings, holding)):
                    self._drop(holding)
        if self._in_scope(pid):
            self._schedule(pid)

    def _schedule(self, pid):
        now = time.monotonic()
        for delay in RECHECK_DELAYS:
            heapq.heappush(self._rechecks, (now + delay, pid))

    def _run_rechecks(self):
        now, due = time.monotonic(), set()
        while self._rechecks and self._rechecks[0][0] <= now:
            due.add(heapq.heappop(self._rechecks)[1])
        for pid in sorted(due):
            with self._lock:
                self._scan_pid(pid, may_raise=True)

    def _handle_proc_events(self):
        events, lost = self._events.read()
        for event in events:
            if event.kind == "fork" and event.thread == event.pid:
                self._on_fork(event)
            elif event.kind == "exec":
                self._forget(event.pid, before_ns=event.timestamp_ns)
                if self._in_scope(event.pid) and not self._stopping.is_set():
                    self._schedule(event.pid)
            elif event.kind == "exit" and event.thread == event.pid:
                self._forget(event.pid)
        if lost:
            self._warn_once("lost", "process events were lost (the system forks faster than "
                            "sdtrace reads): a child forked then may keep an increment")
            if not self._stopping.is_set():
                self.rescan()

    def _on_fork(self, event):
        """Records the increments a fork child copied from its parent.

        The child is then scanned if it may map a counter it did not copy: its
        parent holds counters (raised after the fork, perhaps), or the fork
        came before the first scan ended (which may have listed it too late)."""
        parent, child, forked_ns = event.parent, event.pid, event.timestamp_ns
        parent_held = self._held.get(parent, {})
        copied = [(holding, counted) for holding, counted in parent_held.items()
                  if counted.since_ns <= forked_ns
                  and (counted.released_ns is None or counted.released_ns > forked_ns)]
        if copied and not _shares_memory(parent, child):
            self._inherit(parent, child, forked_ns, copied)
        if (self._in_scope(child) and not self._stopping.is_set()
                and (parent_held or self._scanned_ns is None or forked_ns < self._scanned_ns)):
            self._scan_pid(child, may_raise=True)

    def _inherit(self, parent, child, forked_ns, copied):
        try:
            starttime = read_starttime(child)
            mappings = read_maps(child)
            memory = self._memory(child, starttime)
            with self._counter_lock:
                for holding, counted in copied:
                    inherited = replace(holding, pid=child, starttime=starttime)
                    if not maps_hold(mappings, inherited):
                        continue
                    if counted.released_ns is not None:  # stopping: take the copy back too
                        lower_counter(memory, mappings, inherited, counted.count, self._warn)
                        continue
                    if (forked_ns < counted.until_ns + FORK_AMBIGUITY_NS
                            and not self._same_value(memory, inherited, holding)):
                        continue  # the fork raced the write and the child missed it
                    self._record(inherited, _Count(counted.count, forked_ns, forked_ns, parent))
        except MappingGone:
            self._schedule(child)
        except ProcessGone:
            self._forget(child)
        except ProcessDenied as error:
            self._warn_once(child, error)
        finally:
            self._close_idle_memory(child)

    def _same_value(self, memory, inherited, holding):
        parent_memory = self._memories.get(holding.pid)
        if parent_memory is None:
            return True
        try:
            parent_value = parent_memory.read_counter(holding.address, holding.byteorder)
        except (ProcessGone, ProcessDenied, MappingGone):
            return True
        return memory.read_counter(inherited.address, inherited.byteorder) == parent_value

    def _lower_everything(self):
        for pid, held in list(self._held.items()):
            try:
                memory = self._memory(pid, next(iter(held)).starttime)
                mappings = read_maps(pid)
                with self._counter_lock:
                    for holding, counted in held.items():
                        if counted.released_ns is None:
                            self._tell(holding, 0)
                            lower_counter(memory, mappings, holding, counted.count, self._warn)
                            counted.released_ns = time.monotonic_ns()
            except ProcessGone:
                continue
            except ProcessDenied as error:
                self._warn_once(pid, error)
