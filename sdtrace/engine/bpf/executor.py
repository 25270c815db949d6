"""Sites armed with BPF: one program and one uprobe_multi link per file, records out.

``BpfExecutor(sites)`` numbers the sites (their ids, in the order given),
creates the ring buffer every program writes to and the per-CPU counter of
records it had no room for, then for each file: generates the program of
its sites (codegen), loads it, and attaches it with one uprobe_multi link
to every site's offset, with the site ids as cookies and the semaphores'
file offsets as ref_ctr_offsets, so that the kernel raises each semaphore
in every process it inserts the breakpoint into, and lowers it when the
link goes (``kernel_semaphores=False`` gives none: the semaphores are then
user space's to count, semaphores.manager's, as in --semaphores=user).
The fds are the only owners: closing them, or the tracer's death, disarms
everything.

Scope: every process (``pid=0``); one process and its threads (``pid=P``:
the link's pid filter, so the breakpoints and semaphore raises are in P
alone); or P and the processes it forks from then on (``pid=P,
children=True``): a scope.ProcessTree that the kernel keeps current at
fork and exit, checked by the program, the link armed for every process.

Records are read through each site's parser for the caller's emitter
(records.py), as the tracefs executor's samples are (events.py), so both
executors hand the session the same items.  finish() detaches the links
first, then reads what is left: afterwards ``received + lost`` is every hit,
exactly, since the program counts each record it had no room for.

A program the verifier refuses is reported in one line naming the probe:
each site of the file is then loaded alone until the culprit is found
(the verifier's full log is under logging.debug).
"""
import errno
import mmap
import os

from ...errors import BpfRefused, NoSuchProcess, SdtraceError
from ...kernel import features, procfs, tracefs
from ...kernel.bpf import (BPF_TRACE_UPROBE_MULTI, Map, Owned, Program, UprobeMultiLink,
                           UprobePerfLinks)
from ...kernel.log import logger
from .. import events
from . import codegen, scope
from .records import RecordParsers
from .tally import TallyMaps
from .ringbuf import RingBuffer

log = logger(__name__)

DEFAULT_RING_BYTES = 4 << 20
# How the sites are armed: one uprobe_multi link per file (6.6), or where the kernel has
# none a uprobe-PMU perf event and BPF perf link per site (5.15); the program of a perf
# link cannot be sleepable here, so it does not fault pages in.
LINKS = {"multi": UprobeMultiLink, "perf": UprobePerfLinks}


class BpfExecutor:
    """`sites` (notes.Site, any files) armed for process `pid` (0: every process), and
    with `children` for the processes it forks from now on, theirs too.

    types: one tuple of spec types per site (or None).  read() returns an emitter's
    items (events.RECORDS' record tuples by default; `sites` holds their
    events.ArmedSite); `lost` counts the records the ring had no room for;
    `warnings` names the arguments that have no value; `tree` is the
    scope.ProcessTree of `children` (None otherwise), at most `max_processes` at once."""

    name = "bpf"

    def __init__(self, sites, types=None, pid=0, children=False, ring_bytes=DEFAULT_RING_BYTES,
                 string_length=codegen.DEFAULT_STRING_LENGTH,
                 max_processes=scope.DEFAULT_MAX_PROCESSES, kernel_semaphores=True,
                 tally=None, links=None):
        if children and not pid:
            raise ValueError("children are followed from one process: give its pid")
        if links is None:
            links = "multi" if features.check("bpf_uprobe_multi").available else "perf"
        if links not in LINKS:
            raise ValueError(f"links: {links!r} is not one of {', '.join(LINKS)}")
        self.links = links
        notes_sites = list(sites)
        for site in notes_sites:
            site.check_armable()
        types = types or [()] * len(notes_sites)
        self.warnings = []
        self.received = 0
        self._lost = None                   # the count, once finish() or close() read it
        self._pid = pid
        self._starttime = None
        self._owned = Owned()               # maps, programs, the tree
        self._links = Owned()               # what arms the sites: closed first
        self.tree = None
        self.tally = None                   # tally.TallyMaps, when hits are counted in maps
        self._final_counts = None           # its counts, read by finish()
        self._final_missing = 0
        self._final_spans = None
        try:
            if pid:
                self._starttime = _starttime(pid)
            if children:
                self.tree = self._owned.own(scope.ProcessTree([pid], max_processes))
            if tally is not None:                  # no records: the smallest ring there is
                ring_bytes = mmap.PAGESIZE
            self._ring = self._owned.own(Map.ringbuf(ring_bytes, "sdtrace_ring"))
            self._lost_counter = self._owned.own(Map.percpu_array(8, 1, "sdtrace_lost"))
            plans = {site_id: (site, codegen.plan_site(site, site_types))
                     for site_id, (site, site_types) in enumerate(zip(notes_sites, types))}
            self._warn(plans)
            self.layouts = {site_id: codegen.RecordLayout(site_plans, string_length)
                            for site_id, (_site, site_plans) in plans.items()}
            self.record_size = max((layout.size for layout in self.layouts.values()),
                                   default=0)
            if tally is not None:
                self.tally = self._owned.own(TallyMaps(tally, self.layouts, self.record_size))
            for path in dict.fromkeys(site.file for site in notes_sites):
                group = {site_id: entry for site_id, entry in plans.items()
                         if entry[0].file == path}
                self._attach(path, group, 0 if children else pid, string_length,
                             kernel_semaphores)
            self.sites = [_armed(site_id, site, site_plans)
                          for site_id, (site, site_plans) in plans.items()]
            self._records = {site_id: (armed, self.layouts[site_id])
                             for site_id, armed in enumerate(self.sites)}
            self._parsers = {}
            self._reader = RingBuffer(self._ring, codegen.OFFSETS["site"], self.record_size)
        except BaseException:
            self.close()
            raise

    def _warn(self, plans):
        for site, site_plans in plans.values():
            for index, plan in enumerate(site_plans):
                if plan.kind is None:
                    self.warnings.append(f"{site.file}: {site.qualified_name}: argument {index} "
                                         f"({site.operands[index].text!r}) is unavailable: "
                                         f"{plan.unavailable}")

    @property
    def _tracer_pid(self):
        """This process, for the program to leave out where the link is armed for every
        process (sdtrace may run the traced file); a link with one pid cannot fire here."""
        return os.getpid() if not self._pid or self.tree is not None else None

    def _load(self, group, string_length):
        """The program of the sites of `group` ({site id: (site, plans)}), loaded."""
        multi = self.links == "multi"
        code, _layouts = codegen.generate(group, self._ring.fd, self._lost_counter.fd,
                                          string_length, self.tree and self.tree.map.fd,
                                          sleepable=multi, record_size=self.record_size,
                                          emit=self.tally and self.tally.emit,
                                          tracer_pid=self._tracer_pid)
        return Program(code, "sdtrace_usdt",
                       expected_attach_type=BPF_TRACE_UPROBE_MULTI if multi else 0,
                       sleepable=multi)

    def _attach(self, path, group, pid, string_length, kernel_semaphores):
        try:
            program = self._load(group, string_length)
        except BpfRefused as refused:
            raise self._culprit(path, group, string_length, refused) from None
        self._owned.own(program)
        sites = [site for site, _plans in group.values()]
        try:
            link = LINKS[self.links](program, path, [site.offset for site in sites],
                                     [kernel_semaphores and site.semaphore or 0
                                      for site in sites], list(group), pid)
        except BpfRefused as refused:
            if refused.errno == errno.ESRCH:
                raise NoSuchProcess(pid) from None
            if refused.errno == errno.EINVAL:
                self._explain_mismatch(path, sites, kernel_semaphores)
            raise
        self._links.own(link)
        log.debug("%s: %d sites armed with %s (pid %d)", path, len(sites),
                  "one uprobe_multi link" if self.links == "multi" else "uprobe perf links", pid)

    @staticmethod
    def _explain_mismatch(path, sites, kernel_semaphores):
        """The kernel's bare EINVAL for a site another uprobe holds with another semaphore
        offset, as one line naming the site and the holder (if we can see it)."""
        for site in sites:
            conflict = tracefs.ref_ctr_conflict(
                path, site.offset, site.semaphore if kernel_semaphores else None)
            if conflict:
                raise SdtraceError(f"{path}: {site.qualified_name}: {conflict}")

    def _culprit(self, path, group, string_length, refused):
        """The one-line error naming the first site whose program alone is refused."""
        for site_id, (site, plans) in group.items():
            try:
                program = self._load({site_id: (site, plans)}, string_length)
            except BpfRefused as alone:
                refused = alone
                where = f"{site.qualified_name} at {path}:{site.offset:#x}"
                break
            program.close()
        else:
            where = f"the {len(group)} sites of {path}"
        return SdtraceError(f"BPF program for {where} refused by the kernel: "
                            f"{str(refused).split(': ', 2)[-1]}")

    # -- reading -------------------------------------------------------------------

    def enable(self):
        """The links are live from the start: nothing to do (the tracefs executor's twin
        enables its perf events here)."""

    def read(self, timeout=None, emitter=events.RECORDS, limit=None):
        """`emitter`'s items of the records written since the last read (at most about
        `limit` bytes of them if given); waits up to `timeout` s for one if there is none."""
        parsers = self._parsers.get(emitter)
        if parsers is None:
            parsers = self._parsers[emitter] = RecordParsers(self._records, emitter)
        items = []
        reader = self._reader
        reader.walk(parsers, items.append, limit)
        if not items and (timeout is None or timeout > 0) and reader.wait(timeout):
            reader.walk(parsers, items.append, limit)
        self.received += len(items)
        return items

    def counts(self):
        """With a tally: the counts so far (the final ones after finish()), a Counter of
        raw key tuples, or with its value {raw key: tally.Histogram} (tally.py)."""
        if self._final_counts is not None:
            return self._final_counts
        sites = dict(enumerate(self.sites))
        if self.tally.tally.value is None and self.tally.tally.spans is None:
            return self.tally.counts_by_key(sites)
        return self.tally.histograms(sites)

    def spans(self):
        """With a tally of spans: its counters (tally.TallyMaps.span_counts)."""
        if self._final_spans is not None:
            return self._final_spans
        return self.tally.span_counts()

    def missing(self):
        """With a tally's value: the hits whose value could not be read."""
        if self._final_counts is not None:
            return self._final_missing
        return self.tally.missing_count()

    @property
    def pending(self):
        """Whether records are waiting in the ring."""
        return self._reader.pending

    @property
    def alive(self):
        """Whether the traced process (`pid`) is still running; True for every process."""
        return not self._pid or procfs.alive(self._pid, self._starttime)

    @property
    def lost(self):
        """Records the ring had no room for, summed over the CPUs, and with a tally the
        hits the full map could not count, so far (final after finish())."""
        if self._lost is not None:
            return self._lost
        lost = self._lost_counter.total_per_cpu(bytes(4))
        return lost if self.tally is None else lost + self.tally.dropped_count()

    def finish(self, emitter=events.RECORDS):
        """Detaches every site, then returns the items of the records left in the ring;
        afterwards received + lost counts every hit (with a tally: the hits counted, and
        those the full map could not count)."""
        self._links.close()
        items = self.read(0, emitter)
        self._lost = self._lost_counter.total_per_cpu(bytes(4))
        if self.tally is not None:
            self._final_counts = self.counts()
            if self.tally.tally.spans is not None:      # the hits the result accounts for
                self._final_spans = spans = self.spans()
                self.received = (2 * sum(histogram.count
                                         for histogram in self._final_counts.values())
                                 + spans["unmatched"] + spans["open"])
            elif self.tally.tally.value is None:
                self.received = sum(self._final_counts.values())
            else:
                self._final_missing = self.missing()
                self.received = self._final_missing + sum(
                    histogram.count for histogram in self._final_counts.values())
            self._lost += self.tally.dropped_count()
        return items

    def close(self):
        """Disarms (the links go first) and frees everything; idempotent."""
        self._links.close()
        counter = getattr(self, "_lost_counter", None)
        if self._lost is None and counter is not None and not counter.closed:
            self._lost = counter.total_per_cpu(bytes(4))
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
        self._owned.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _starttime(pid):
    try:
        return procfs.read_starttime(pid)
    except procfs.ProcessGone:
        raise NoSuchProcess(pid) from None


def _armed(site_id, site, plans):
    """The events.ArmedSite that site `site_id`'s records name."""
    return events.ArmedSite(site.provider, site.name, site.file, f"site{site_id}", plans,
                            frozenset(index for index, plan in enumerate(plans)
                                      if plan.string and plan.kind is not None))
