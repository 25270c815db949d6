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

A program the verifier refuses is reported in one line naming the probe:
each site of the file is then loaded alone until the culprit is found
(the verifier's full log is under logging.debug).
"""
import errno

from ...errors import BpfRefused, NoSuchProcess, SdtraceError
from ...kernel.bpf import BPF_TRACE_UPROBE_MULTI, Map, Owned, Program, UprobeMultiLink
from ...kernel.log import logger
from . import codegen, scope
from .ringbuf import RingBuffer

log = logger(__name__)

DEFAULT_RING_BYTES = 4 << 20


class BpfExecutor:
    """`sites` (notes.Site, any files) armed for process `pid` (0: every process), and
    with `children` for the processes it forks from now on, theirs too.

    types: one tuple of spec types per site (or None); read() returns decoded
    codegen.Records; lost() counts the records the ring had no room for; warnings
    names the arguments that have no value; `tree` is the scope.ProcessTree of
    `children` (None otherwise), at most `max_processes` at once."""

    def __init__(self, sites, types=None, pid=0, children=False, ring_bytes=DEFAULT_RING_BYTES,
                 string_length=codegen.DEFAULT_STRING_LENGTH,
                 max_processes=scope.DEFAULT_MAX_PROCESSES, kernel_semaphores=True):
        if children and not pid:
            raise ValueError("children are followed from one process: give its pid")
        self.sites = list(sites)
        for site in self.sites:
            site.check_armable()
        types = types or [()] * len(self.sites)
        self.warnings = []
        self._owned = Owned()
        self.tree = None
        try:
            if children:
                self.tree = self._owned.own(scope.ProcessTree([pid], max_processes))
            self._ring = self._owned.own(Map.ringbuf(ring_bytes, "sdtrace_ring"))
            self._lost = self._owned.own(Map.percpu_array(8, 1, "sdtrace_lost"))
            plans = {site_id: (site, codegen.plan_site(site, site_types))
                     for site_id, (site, site_types) in enumerate(zip(self.sites, types))}
            self._warn(plans)
            self.layouts = {}
            for path in dict.fromkeys(site.file for site in self.sites):
                group = {site_id: entry for site_id, entry in plans.items()
                         if entry[0].file == path}
                self._attach(path, group, 0 if children else pid, string_length,
                             kernel_semaphores)
            self._reader = RingBuffer(self._ring)
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

    def _load(self, group, string_length):
        code, layouts = codegen.generate(group, self._ring.fd, self._lost.fd, string_length,
                                         self.tree and self.tree.map.fd)
        return Program(code, "sdtrace_usdt", expected_attach_type=BPF_TRACE_UPROBE_MULTI), layouts

    def _attach(self, path, group, pid, string_length, kernel_semaphores):
        try:
            program, layouts = self._load(group, string_length)
        except BpfRefused as refused:
            raise self._culprit(path, group, string_length, refused) from None
        self._owned.own(program)
        self.layouts.update(layouts)
        sites = [site for site, _plans in group.values()]
        try:
            link = UprobeMultiLink(program, path, [site.offset for site in sites],
                                   [kernel_semaphores and site.semaphore or 0 for site in sites],
                                   list(group), pid)
        except BpfRefused as refused:
            if refused.errno == errno.ESRCH:
                raise NoSuchProcess(pid) from None
            raise
        self._owned.own(link)
        log.debug("%s: %d sites armed with one uprobe_multi link (pid %d)", path, len(sites),
                  pid)

    def _culprit(self, path, group, string_length, refused):
        """The one-line error naming the first site whose program alone is refused."""
        for site_id, (site, plans) in group.items():
            try:
                program, _layouts = self._load({site_id: (site, plans)}, string_length)
            except BpfRefused as alone:
                refused = alone
                where = f"{site.qualified_name} at {path}:{site.offset:#x}"
                break
            program.close()
        else:
            where = f"the {len(group)} sites of {path}"
        return SdtraceError(f"BPF program for {where} refused by the kernel: "
                            f"{str(refused).split(': ', 2)[-1]}")

    def read(self, timeout=None):
        """The records written since the last read; waits up to `timeout` s for one."""
        records = self._reader.take()
        if not records and (timeout is None or timeout > 0) and self._reader.wait(timeout):
            records = self._reader.take()
        layouts = self.layouts
        return [layouts[codegen.site_id_of(data)].decode(data) for data in records]

    def lost(self):
        """Records the ring had no room for, summed over the CPUs."""
        return self._lost.total_per_cpu(bytes(4))

    def close(self):
        """Disarms (the links go first) and frees everything; idempotent."""
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
        self._owned.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
