"""The semaphore audit: every SDT semaphore in every process, its value, and who uses it.

What ``dd if=/proc/PID/mem ... | xxd`` shows by hand, for all processes at
once (``sdtrace semaphores``).  For each process, /proc/PID/maps is read once
and its files are grouped by (device, inode).  Each file's probes are read
once per audit (cached by that identity), opened as the process sees it
(targets.mapped_path: the path, /proc/PID/root + the path, or
/proc/PID/map_files), so that a process in another mount namespace is read
from its own file system; the sites carry the file's byte order.

For each semaphore of a mapped file:

* its address is where the writable private VMA holding the semaphore's
  file offset puts it (procmem.counter_addresses: the RELRO part and the
  end of the text can map the same file page read-only);
* its value is the 16-bit counter read from /proc/PID/mem;
* it is *armed* when a site of a probe using it carries the int3 byte
  (0xcc) in that process's memory: the uprobe is installed.  A site's address
  comes from the executable VMA holding the site's file offset;
* it is *leaked* when its value is above 0 and no site is armed: code paths
  guarded by it run for nobody, which is the state a crashed tracer leaves.

A process that unloads a library between our reading its maps and its memory
(the read faults: procmem.MappingGone) is read once more, then skipped.
"""
import os
from dataclasses import dataclass

from ..errors import NoSuchProcess, SdtraceError
from ..kernel import procfs, procmem
from .counters import log_warning

INT3 = 0xcc
READ_ATTEMPTS = 2      # per process, when a mapping vanishes while it is read


@dataclass(frozen=True)
class SemaphoreState:
    pid: int
    comm: str
    file: str
    provider: str
    name: str
    semaphore: int      # file offset of the counter
    address: int        # its run-time address in the process
    value: int
    armed: bool         # a site of a probe using this semaphore holds int3
    leaked: bool        # value > 0 and nothing armed

    @property
    def qualified_name(self):
        return f"{self.provider}:{self.name}"


def audit(pid=None, specs=(), warn=log_warning):
    """[SemaphoreState] for process `pid` (all processes if None), filtered by `specs`.

    `specs` are specs.ProbeSpec: provider/name globs and optional targets.
    A single process that cannot be read is an SdtraceError; in a scan of
    all processes the unreadable ones are counted in one warning."""
    from ..discovery.targets import resolve_target

    targets = set()
    for spec in specs:
        if spec.target is not None:
            try:
                targets.update(map(procfs.file_identity, resolve_target(spec.target)))
            except OSError as error:
                raise SdtraceError(f"{spec.target}: {error.strerror}") from None
    probes_cache = {}
    states, denied = [], []
    pids = [pid] if pid is not None else sorted(
        int(name) for name in os.listdir("/proc") if name.isdigit())
    for candidate in pids:
        try:
            states.extend(_audit_process(candidate, specs, targets, probes_cache))
        except procfs.ProcessGone:
            if pid is not None:
                raise NoSuchProcess(pid) from None
        except procfs.ProcessDenied:
            if pid is not None:
                raise
            denied.append(candidate)
    if denied:
        warn(f"{len(denied)} processes could not be read (permission denied), "
             f"e.g. {', '.join(map(str, denied[:5]))}")
    return states


def _audit_process(pid, specs, targets, probes_cache):
    """The states of process `pid`; [] if its mappings keep vanishing while it is read."""
    for _attempt in range(READ_ATTEMPTS):
        try:
            return _process_states(pid, specs, targets, probes_cache)
        except procmem.MappingGone:
            continue
    return []


def _process_states(pid, specs, targets, probes_cache):
    mappings = procfs.read_maps(pid)
    files = []
    for file_id, first in procfs.mapped_files(mappings).items():
        if targets and file_id not in targets:
            continue
        if file_id not in probes_cache:
            probes_cache[file_id] = _semaphore_probes(pid, first)
        all_probes = probes_cache[file_id]
        probes = [probe for probe in all_probes
                  if not specs or any(spec.matches(probe) for spec in specs)]
        if probes:
            files.append((file_id, first.path, probes, all_probes))
    if not files:
        return []
    memory = procmem.ProcessMemory(pid, writable=False)
    try:
        comm = procfs.process_name(pid)
        states = []
        for file in files:
            states.extend(_file_states(memory, mappings, comm, *file))
        return states
    finally:
        memory.close()


def _file_states(memory, mappings, comm, file_id, path, probes, all_probes):
    states = []
    rows = {}
    for probe in probes:
        rows.setdefault((probe.semaphore, probe.provider, probe.name), probe)
    for (semaphore, provider, name), site in sorted(rows.items(), key=lambda item: item[0]):
        armed = any(_site_armed(memory, mappings, file_id, site.offset)
                    for site in all_probes if site.semaphore == semaphore)
        for address in procmem.counter_addresses(mappings, file_id, semaphore):
            value = memory.read_counter(address, site.byteorder)
            states.append(SemaphoreState(memory.pid, comm, path, provider, name, semaphore,
                                         address, value, armed, value > 0 and not armed))
    return states


def _site_armed(memory, mappings, file_id, site_offset):
    return any(memory.read(address, 1)[0] == INT3
               for address in procfs.mapped_addresses(mappings, file_id, site_offset, "x"))


def _semaphore_probes(pid, mapping):
    """The sites with a usable semaphore of the file `mapping` maps (notes.Site
    records, which carry the file's byte order); [] when the file is not ELF,
    has no such site, or cannot be opened."""
    from ..discovery.notes import read_probes
    from ..discovery.targets import mapped_path

    path = mapped_path(pid, mapping)
    if path is None:
        return []
    try:
        return [site for site in read_probes(path) if site.semaphore is not None]
    except SdtraceError:  # ElfError included: not an ELF file, or a damaged one
        return []
