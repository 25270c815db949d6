"""The user-space semaphore manager: raises a session's counters once per process, until stop().

The mechanism, its invariant and its limits are explained in counters.py;
this module is the part that runs: a watcher thread that follows process
events (procwatch.py) and file opens, scans processes, raises each counter
once and lowers it at the end, reporting every change to the guardian.
"""
import heapq
import os
import select
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

from ..errors import SdtraceError
from ..kernel.log import logger
from ..kernel.procfs import (ProcessDenied, ProcessGone, file_identity, parse_maps, process_name,
                             read_maps, read_proc, read_starttime, read_stat)
from ..kernel.procmem import MappingGone, MemoryReplaced, ProcessMemory, counter_addresses
from .counters import (COUNTER_LIMIT, CounterLock, Holding, Semaphore, log_warning, lower_counter,
                       maps_hold)

_log = logger(__name__)

RECHECK_DELAYS = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 2.0)   # after an open or an exec
RECONCILE_INTERVAL = 2.0             # re-read the processes that hold counters
FULL_SCAN_INTERVAL = 1.0             # without fanotify: re-read every process
FORK_AMBIGUITY_NS = 100_000_000      # a fork this close after a write is settled by the values
KCMP_VM = 1
KCMP_SYSCALLS = {"x86_64": 312, "aarch64": 272, "i686": 349, "i386": 349}


def _shares_memory(pid, other):
    """Whether two processes share one address space (CLONE_VM, e.g. vfork)."""
    from ..kernel.libc import libc, syscall_number

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

    `semaphores` are (file path, semaphore file offset, byte order) triples, the
    byte order being the file's (notes.Site.byteorder); several sites
    sharing a counter name it once.  `scope` limits which processes are
    raised: None for all, a collection of PIDs, or a predicate on a PID.
    Fork children of raised processes are always tracked (they hold a copy of
    the increment).  `guardian=False` skips crash recovery; `warn` receives
    one-line warnings (default: logged).  A manager runs one session: start()
    once, stop() once.  Needs root.
    """

    def __init__(self, semaphores, scope=None, *, guardian=True, warn=log_warning):
        unique, files = {}, {}   # files: path -> file_id
        for path, offset, byteorder in semaphores:
            if path not in files:
                try:
                    files[path] = file_identity(path)
                except OSError as error:
                    raise SdtraceError(f"{path}: {error.strerror}") from None
            file_id = files[path]
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
        self._exec_ns = {}       # pid -> when it exec'd during the session (proc connector)
        self._late = {}          # pid -> (comm, seconds from its exec to its first raise)

    @classmethod
    def for_probes(cls, probes, scope=None, **options):
        """The manager for the semaphores of `probes` (notes.Site records).

        A site that cannot be armed (its semaphore lies outside every writable
        segment, say) is refused."""
        semaphores = []
        for site in probes:
            site.check_armable()
            if site.semaphore is not None:
                semaphores.append((site.file, site.semaphore, site.byteorder))
        return cls(semaphores, scope, **options)

    # -- life cycle ---------------------------------------------------------

    def start(self):
        """Subscribes to process events, then raises every counter already mapped."""
        if self._started:
            return self
        from ..kernel import procwatch

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

    def late_raises(self):
        """(pid, comm, seconds) of each process that exec'd during the session and
        ran its new image unguarded until its first counter was raised -- user mode's
        window, which the kernel's ref_ctr does not have.  (A process held at its exec
        until raised, as ``-c`` does, ran nothing meanwhile: its entry means nothing.)"""
        with self._lock:
            return [(pid, comm, seconds) for pid, (comm, seconds) in self._late.items()]

    def guard_patch(self, patch, planted):
        """Has the guardian undo code patch `patch` (a kernel.procmem.CodePatch) if this
        session dies while it is planted (``planted=False``: it is gone)."""
        with self._lock:
            if self._guardian is not None:
                self._guardian.record_patch(patch, planted)

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
        except MemoryReplaced:
            # It exec'd since its holdings were made: they went with the old image.  The
            # one sure sign, whichever comes first: the exec event, a ptrace stop, a scan.
            self._forget(pid)
            self._scan_pid(pid, may_raise)
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
        _log.debug("process %d: semaphore at %s+0x%x raised: %d -> %d", holding.pid,
                   holding.path, holding.offset, value, value + 1)
        self._record(holding, _Count(1, since, time.monotonic_ns(), parent))
        self._note_lateness(holding.pid, since)

    def _note_lateness(self, pid, raised_ns):
        """Records how long after its exec `pid` was first raised, if it was after."""
        exec_ns = self._exec_ns.get(pid)
        if exec_ns is not None and raised_ns > exec_ns and pid not in self._late:
            self._late[pid] = (process_name(pid), (raised_ns - exec_ns) / 1e9)

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

    def _forget(self, pid):
        """Drops the holdings of `pid` and its memory, without writing (it exited or exec'd)."""
        for holding in self._held.pop(pid, {}):
            self._tell(holding, 0)
        memory = self._memories.pop(pid, None)
        if memory is not None:
            memory.close()

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
                self._on_exec(event)
            elif event.kind == "exit" and event.thread == event.pid:
                # Gone, or only its main thread is (the others run on), or that thread was
                # reaped by another thread's exec, which took its PID: the scan tells.
                if event.pid in self._held:
                    self._scan_pid(event.pid, may_raise=False)
                if event.pid not in self._held:
                    self._exec_ns.pop(event.pid, None)
        if lost:
            self._warn_once("lost", "process events were lost (the system forks faster than "
                            "sdtrace reads): a child forked then may keep an increment")
            if not self._stopping.is_set():
                self.rescan()

    def _on_exec(self, event):
        """An exec: what the process held went with its old image, unless what it holds
        was raised in the new one already (under ptrace the exec stop comes before the
        exec event, so the timestamps cannot tell); the memory tells (MemoryReplaced)."""
        pid = event.pid
        if self._started and self._in_scope(pid):
            self._exec_ns[pid] = event.timestamp_ns
            self._late.pop(pid, None)            # a new image: its own window
        if pid in self._held:
            self._scan_pid(pid, may_raise=self._in_scope(pid) and not self._stopping.is_set())
        if pid in self._held and pid in self._exec_ns:   # raised before this event came
            first = min(counted.since_ns for counted in self._held[pid].values())
            self._note_lateness(pid, first)
        if self._in_scope(pid) and not self._stopping.is_set():
            self._schedule(pid)

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
