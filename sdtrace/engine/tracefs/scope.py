"""The processes a tracefs executor keeps the samples of: a process tree, followed in user space.

perf's ``inherit`` would let the kernel follow a process's threads and
children, but on this kernel it races: the exit of one child sometimes takes
its sibling's breakpoint and semaphore raise with it, and a thread that
calls exec in a process whose events were inherited runs its new image with
the semaphore never raised (27 times in 40 here).  So a process scope opens
the events for every process, like the BPF executor's tree (bpf/scope.py),
and keeps only the samples of the processes in the tree:

* the tree is a map of tgids to the *span* of time, in CLOCK_MONOTONIC
  nanoseconds (the clock of the samples, perf.py's use_clockid), in which
  that pid was one of the tree's processes;
* it grows from the proc connector (kernel/procwatch.py): a fork whose parent
  is in the tree at the fork's time adds the child from that time on (a new
  thread's fork message, which names its process's parent, is passed over).  The
  kernel queues the fork message before the child first runs, so reading the
  connector *after* taking a batch of samples out of the rings and *before*
  walking them tells every child whose sample is in the batch;
* a pid of the tree that a process outside it is forked with (the pid was
  reused) leaves the tree at that fork's time, so the samples of neither
  process are taken for the other's;
* a process whose leader thread has exited is closed once no thread of it
  runs (its last samples are older than that moment); a closed span is
  forgotten CLOSED_KEPT_NS later, when no sample of it can still be unread.

The parsers (codegen.parser's ``scope``) look the sample's pid up and return
at once for a sample outside the tree, counting it in ``outside``, so that
the executor's lost count (hits - received) leaves those out.

The cost of opening the events for every process: the kernel inserts the
breakpoints, and with kernel semaphores raises the counters, in every process
that maps the file, and their hits are sampled and skipped here.
"""
import time
from collections import deque

from ...errors import NoSuchProcess, SdtraceError
from ...kernel import procfs, procwatch

FOREVER = float("inf")
CLOSED_KEPT_NS = 60 * 10**9


class Spans(dict):
    """tgid -> (first ns, end ns): when that pid was a process of the tree.  `pid in
    spans` says whether it is one now."""

    def __init__(self, *args):
        super().__init__(*args)
        self._closed = deque()         # (end ns, pid) of the closed spans, oldest first

    def holds(self, pid, timestamp_ns):
        """Whether process `pid` was in the tree at `timestamp_ns`."""
        first, end = self.get(pid, (0, 0))
        return first <= timestamp_ns < end

    def __contains__(self, pid):
        return self.get(pid, (0, 0))[1] == FOREVER

    def follow(self, events):
        """Apply the forks of `events` (procwatch.ProcEvent, in the kernel's order)."""
        for event in events:
            if event.kind != "fork" or event.thread != event.pid:    # a thread: no process
                continue
            if self.holds(event.parent, event.timestamp_ns):
                self[event.pid] = (event.timestamp_ns, FOREVER)
            elif self.holds(event.pid, event.timestamp_ns):          # its pid, reused
                self.close(event.pid, event.timestamp_ns)

    def close(self, pid, timestamp_ns):
        """Process `pid` is out of the tree from `timestamp_ns` on."""
        self[pid] = (self[pid][0], timestamp_ns)
        self._closed.append((timestamp_ns, pid))

    def forget(self, now_ns):
        """Drop the spans closed CLOSED_KEPT_NS before `now_ns` (not those reopened since)."""
        closed = self._closed
        while closed and closed[0][0] + CLOSED_KEPT_NS < now_ns:
            end, pid = closed.popleft()
            if self.get(pid, (0, None))[1] == end:
                del self[pid]


class ProcessTree:
    """Process `root` and the processes it forks from now on, theirs too; `warn` is
    told once if the proc connector drops messages."""

    def __init__(self, root, warn=None):
        try:
            self._starttime = procfs.read_starttime(root)
        except (procfs.ProcessGone, procfs.ProcessDenied):
            raise NoSuchProcess(root) from None
        self.root = root
        self.spans = Spans({root: (0, FOREVER)})
        self.outside = [0]                    # samples of other processes, skipped
        self._warn = warn or (lambda _line: None)
        self._dropped = 0                     # reads that found connector messages dropped
        self._exited = set()                  # tgids whose leader thread exited
        try:
            self._events = procwatch.ProcEvents()
        except OSError as error:
            raise SdtraceError(f"following process {root}'s children needs the proc "
                               f"connector (CAP_NET_ADMIN): {error.strerror}") from None

    def __contains__(self, pid):
        """Whether process `pid` is in the tree now (as of the last update)."""
        return pid in self.spans

    def missed(self):
        """How many times the proc connector dropped messages: forks the tree may miss."""
        return self._dropped

    @property
    def alive(self):
        """Whether the root process is still running."""
        return procfs.alive(self.root, self._starttime)

    def update(self):
        """Read the forks and exits queued since the last update."""
        if self._events is None:
            return
        events, dropped = self._events.read()
        if dropped:
            if not self._dropped:
                self._warn(f"the proc connector dropped messages: children of process "
                           f"{self.root} forked meanwhile may be missing")
            self._dropped += 1
        self.spans.follow(events)
        self._exited.update(event.pid for event in events
                            if event.kind == "exit" and event.pid == event.thread
                            and event.pid in self.spans)
        now_ns = time.monotonic_ns()
        for pid in list(self._exited):     # a leader exits first when main ends in pthread_exit
            if pid not in self.spans or not _running(pid):
                self._exited.discard(pid)
                if pid in self.spans:
                    self.spans.close(pid, now_ns)
        self.spans.forget(now_ns)

    def close(self):
        if self._events is not None:
            self._events.close()
            self._events = None


def _running(pid):
    """Whether some thread of process `pid` is still running (its leader may be a zombie)."""
    try:
        return procfs.alive(pid, procfs.read_starttime(pid))
    except (procfs.ProcessGone, procfs.ProcessDenied):
        return False
