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

Scope: every process (the events opened for every task), one process (each
of its threads, with perf's ``inherit`` for later threads and children), or
a command held before exec (``child``: the events opened on it with
enable-on-exec, so the semaphores are raised as its image is mapped).
"""
import os
import re

from ...errors import NoSuchProcess
from ...kernel import perf, tracefs
from ...kernel.log import logger
from .. import events, fetchargs

_log = logger(__name__)

WAKEUP_EVENTS = 64   # samples per ring before poll() wakes us; timeouts pick up the rest
_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_]")


class TracefsExecutor:
    """`sites` (notes.Site) with their `types` (a spec's, per site), armed for every
    process, process `pid`, or the held command `child`; `kernel_semaphores` gives
    each uprobe its ref_ctr.  Its interface is the BPF executor's (bpf/executor.py)."""

    name = "tracefs"

    def __init__(self, sites, types, pid=None, child=None, kernel_semaphores=True,
                 buffer_pages=None):
        tracefs.root()
        tracefs.remove_stale()
        self.sites = []
        self.warnings = []
        self.received = 0
        self.lost = 0            # samples the rings dropped (exact once finish() ran)
        self._pid, self._child = pid, child
        self._decoder = events.Decoder()
        self._rings = None
        self._group = tracefs.new_group()
        try:
            self._define(sites, types, kernel_semaphores)
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
        owners = self._traced_tasks()
        for site in self.sites:
            event_format = tracefs.event_format(self._group, site.event)
            event_id = tracefs.event_id(self._group, site.event)
            opened = 0
            for task in owners:
                sample_ids = self._rings.open(
                    event_id, task, inherit=task != -1, enable_on_exec=self._child is not None,
                    wakeup_events=WAKEUP_EVENTS)
                self._decoder.add(sample_ids, site, event_format)
                opened += len(sample_ids)
            _log.debug("%s/%s: %d perf fd(s) opened", self._group, site.event, opened)

    def _traced_tasks(self):
        if self._child is not None:
            return [self._child]
        if self._pid is None:
            return [-1]
        try:
            return sorted(int(tid) for tid in os.listdir(f"/proc/{self._pid}/task"))
        except OSError:
            raise NoSuchProcess(self._pid) from None

    def enable(self):
        """Start sampling (a command's events enable themselves at its exec)."""
        if self._child is None:
            self._rings.enable()

    def read(self, timeout, emitter=events.RECORDS, limit=None):
        """`emitter`'s items of the samples in the rings (at most about `limit` bytes of
        them), waiting up to `timeout` seconds for data."""
        rings = self._rings
        if not rings.pending:
            rings.wait(timeout)
        items, lost = rings.drain(self._decoder.parsers(emitter), limit)
        self.lost += lost
        self.received += len(items)
        return items

    @property
    def pending(self):
        """Whether samples already copied out of the rings wait to be decoded."""
        return self._rings.pending

    @property
    def alive(self):
        """False once every traced task has exited (their perf fds hung up)."""
        return self._rings.alive

    def finish(self, emitter=events.RECORDS):
        """Stop sampling and return the items still in the rings.  Afterwards `lost` is
        exact: the kernel reports a lost sample only at its next write to the ring, so
        the last losses are counted from the events' hit counters (hits = received +
        lost)."""
        self._rings.disable()
        items, lost = self._rings.drain(self._decoder.parsers(emitter))
        self.received += len(items)
        self.lost = max(self.lost + lost, self._rings.hit_count() - self.received)
        return items

    def close(self):
        """Close the fds (disarming every site), then delete the definitions; idempotent."""
        if self._rings is not None:
            self._rings.close()
        if self._group is not None:
            group, self._group = self._group, None
            tracefs.remove_group(group)
