"""Sites armed as tracefs uprobe events, their hits read from perf rings.

1. **define** -- one uprobe event per site in a group named after this
   session (kernel/tracefs.py), with the semaphore's file offset as
   ``ref_ctr`` (kernel semaphores) so that the kernel counts the semaphore
   exactly once per process;
2. **arm** -- open every event with perf_event_open on every CPU, redirected
   into one ring per CPU (kernel/perf.py).  From here the breakpoints and the
   semaphore increments are owned by our file descriptors: if this process
   dies, even by SIGKILL, the kernel closes them and disarms everything;
3. **read** -- drain the rings, decode samples into an emitter's items
   (events.py);
4. **finish, close** -- disable, read the rest, close the fds, then delete the
   definitions.  Definitions left by a session that was killed are deleted by
   the next session or by ``sdtrace cleanup``.

Scope: the events are always opened for every process, since perf's
``inherit`` races on this kernel.  One process (``pid``) or a command held
before exec (``child``) is a process tree, with the children it forks from
then on: its samples are kept and every other process's skipped
(scope.py).  A held command's semaphores are raised as its image is mapped,
before its first instruction.
"""
import os
import re

from ...kernel import perf, tracefs
from ...kernel.log import logger
from .. import events, fetchargs
from .scope import ProcessTree

_log = logger(__name__)

WAKEUP_EVENTS = 64   # samples per ring before poll() wakes us; timeouts pick up the rest
_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_]")


class TracefsExecutor:
    """`sites` (notes.Site) with their `types` (a spec's, per site), armed for every
    process, process `pid`, or the held command `child`, and their children;
    `kernel_semaphores` gives each uprobe its ref_ctr; `warn` hears of children the
    tree may have missed.  Its interface is the BPF executor's (bpf/executor.py)."""

    name = "tracefs"

    def __init__(self, sites, types=None, pid=None, child=None, kernel_semaphores=True,
                 buffer_pages=None, warn=None):
        tracefs.root()
        tracefs.remove_stale()
        self.sites = []
        self.warnings = []
        self.received = 0
        self.lost = 0            # samples the rings dropped (exact once finish() ran)
        self._rings = None
        self._group = None
        root = child if child is not None else pid
        self.tree = None if root is None else ProcessTree(root, warn)
        self._decoder = events.Decoder(self.tree)
        try:
            self._group = tracefs.new_group()
            self._define(sites, types or [()] * len(sites), kernel_semaphores)
            self._arm(buffer_pages)
        except BaseException:
            self.close()
            raise

    def _define(self, sites, types, kernel_semaphores):
        definitions = []
        for index, (site, site_types) in enumerate(zip(sites, types)):
            plans = fetchargs.plan_probe(site, fetchargs.argument_types(site, site_types))
            for argument, plan in enumerate(plans):
                if plan.unavailable:
                    self.warnings.append(f"{site.file}: {site.qualified_name}: argument "
                                         f"{argument} is unavailable: {plan.unavailable}")
            event = f"e{index}_{_NOT_IDENTIFIER.sub('_', site.qualified_name)}"
            event = event[:tracefs.MAX_NAME_LENGTH]
            definitions.append(tracefs.UprobeDefinition(
                self._group, event, site.file, site.offset,
                site.semaphore if kernel_semaphores else None,
                (events.COMM_FETCH, *fetchargs.fetch_arguments(plans))))
            strings = frozenset(index for index, plan in enumerate(plans)
                                if plan.fetch is not None and plan.fetch.endswith(":string"))
            self.sites.append(events.ArmedSite(site.provider, site.name, site.file,
                                               event, tuple(plans), strings))
        tracefs.add_uprobes(definitions)

    def _arm(self, buffer_pages):
        self._rings = perf.RingSet(data_pages=buffer_pages)
        for site in self.sites:
            event_format = tracefs.event_format(self._group, site.event)
            sample_ids = self._rings.open(tracefs.event_id(self._group, site.event),
                                          wakeup_events=WAKEUP_EVENTS)
            self._decoder.add(sample_ids, site, event_format)
            _log.debug("%s/%s: %d perf fd(s) opened", self._group, site.event, len(sample_ids))
        self._leave_out_tracer()

    def _leave_out_tracer(self):
        """Have the kernel drop the hits of this process's threads: the events are open
        for every process, sdtrace's included, and a tracer that runs the traced file
        (Debian's python3 is python3.11, whose python:line fires at every line) would
        otherwise sample the lines that read its samples, without end.  The kernel
        takes one filter per event, so a thread started later is not left out; the
        thread that arms is (the CLI's, which reads the samples)."""
        threads = sorted(map(int, os.listdir("/proc/self/task")))
        self._rings.set_filter(" && ".join(f"common_pid != {thread}" for thread in threads))

    def enable(self):
        """Start sampling."""
        self._rings.enable()

    def read(self, timeout, emitter=events.RECORDS, limit=None):
        """`emitter`'s items of the samples in the rings (at most about `limit` bytes of
        them), waiting up to `timeout` seconds for data."""
        rings = self._rings
        if not rings.pending:
            rings.wait(timeout)
        items, lost = rings.drain(self._decoder.parsers(emitter), limit, self._update_tree)
        self.lost += lost
        self.received += len(items)
        return items

    @property
    def pending(self):
        """Whether samples already copied out of the rings wait to be decoded."""
        return self._rings.pending

    @property
    def alive(self):
        """Whether the traced process (`pid`) is still running; True for every process."""
        return self.tree is None or self.tree.alive

    def _update_tree(self):
        """Between taking samples out of the rings and walking them: learn the tree's new
        children (their fork was queued before they could be sampled)."""
        if self.tree is not None:
            self.tree.update()

    def finish(self, emitter=events.RECORDS):
        """Stop sampling and return the items still in the rings.  Afterwards `lost` is
        exact: the kernel reports a lost sample only at its next write to the ring, so
        the last losses are counted from the events' hit counters (hits = received +
        lost)."""
        self._rings.disable()
        items, lost = self._rings.drain(self._decoder.parsers(emitter), taken=self._update_tree)
        self.received += len(items)
        outside = 0 if self.tree is None else self.tree.outside[0]
        self.lost = max(self.lost + lost, self._rings.hit_count() - self.received - outside)
        return items

    def close(self):
        """Close the fds (disarming every site), then delete the definitions; idempotent."""
        if self._rings is not None:
            self._rings.close()
        if self.tree is not None:
            self.tree.close()
        if self._group is not None:
            group, self._group = self._group, None
            tracefs.remove_group(group)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
