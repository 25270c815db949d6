"""What this kernel can do: one probe per feature, asked once, in one place.

Like libbpf's feature probes, every answer comes from the running kernel --
a file tracefs or sysfs publishes, or a minimal real system call whose
result tells -- never from the release number, which distributions backport
into.  Each check is cached for the life of the process and returns a
``Feature``: its name, whether it is there, and why (the file or errno that
said so).  ``FEATURES`` lists them in the order ``sdtrace info`` prints them;
``check(name)`` runs one, ``check_all()`` every one.

Checks, with the kernel that brought each feature and the upstream commit:

``tracefs_uprobes``
    ``uprobe_events`` under a tracefs mount (mounted on
    /sys/kernel/tracing if missing): Linux 3.5, "tracing: uprobes
    trace_event interface".
``tracefs_ref_ctr``
    ``PATH:OFFSET(REF_CTR_OFFSET)`` in uprobe definitions, the kernel
    counting SDT semaphores: Linux 4.20, 1cc33161a83d ("uprobes: Support SDT
    markers having reference count (semaphore)"), which also taught
    trace_uprobe the syntax.  tracefs' README documents it; a kernel whose
    uprobe PMU takes a ref_ctr_offset (below, a later commit) has it too.
``uprobe_pmu``
    the ``uprobe`` PMU (perf_event_open of a uprobe without tracefs):
    Linux 4.17, 33ea4b24277b ("perf/core: Implement the 'perf_uprobe' PMU").
``uprobe_pmu_ref_ctr``
    its ``ref_ctr_offset`` format field, the bits of ``config`` that carry
    the semaphore's offset: a6ca88b241d5 ("trace_uprobe: support reference
    counter in fd-based uprobe"), the file libbpf keys on too.
``fanotify_permission``
    fanotify permission events (``FAN_OPEN_PERM``, needs
    CONFIG_FANOTIFY_ACCESS_PERMISSIONS): Linux 2.6.37, "fanotify:
    permissions and blocking".  Probed by marking a private scratch file.
``proc_connector``
    fork/exec/exit events over netlink: Linux 2.6.15, "[PATCH] Process
    Events Connector".  Probed by subscribing and closing.
``bpf``
    the bpf() system call, usable by this process: Linux 3.18, 99c55f7d47c0
    ("bpf: introduce BPF syscall and maps").  Probed by creating a one-entry
    hash map.
``bpf_ringbuf``
    ``BPF_MAP_TYPE_RINGBUF``: Linux 5.8, 457f44363a88 ("bpf: Implement BPF
    ring buffer and verifier support for it").  Probed by creating a one-page
    ring.
``bpf_uprobe_multi``
    ``BPF_LINK_CREATE`` with ``BPF_TRACE_UPROBE_MULTI``: Linux 6.6,
    89ae89f53d20 ("bpf: Add multi uprobe link").  A two-instruction program
    is loaded with that expected attach type and linked to "/" (not a
    regular file): a kernel that knows the attach type gets as far as the
    path and says EBADF, one that does not says EINVAL.  Its pid filter
    matched a thread, not a process, until Linux 6.10, 46ba0e49b642 ("bpf:
    fix multi-uprobe PID filtering logic"), which also refuses a negative
    pid before looking at the path: pid -1 on "/" then says EINVAL instead
    of EBADF.  Without the fix the feature is reported absent (the detail
    says why), as a per-process trace would miss its other threads.

Permission matters: as a user without CAP_BPF/CAP_SYS_ADMIN the BPF, fanotify
and proc connector checks answer "no" with EPERM in the detail.
"""
import errno
import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import SdtraceError
from .perf import UPROBE_PMU, parse_format  # noqa: F401 (parse_format: tests read it here)



@dataclass(frozen=True)
class Feature:
    name: str
    available: bool
    detail: str        # what said so: a path, an errno, a reason
    kernel: str        # the first release that has it, e.g. "4.20"

    def as_dict(self) -> dict:
        return {"available": self.available, "detail": self.detail, "kernel": self.kernel}


Answer = Tuple[bool, str]     # what a check says: (available, detail)


# --- the checks -----------------------------------------------------------------------

def _tracefs_uprobes() -> Answer:
    from . import tracefs

    try:
        root = tracefs.root()
    except SdtraceError as error:
        return False, str(error)
    return True, os.path.join(root, "uprobe_events")


def _tracefs_ref_ctr() -> Answer:
    from . import tracefs

    readme = None
    if check("tracefs_uprobes").available:
        readme = os.path.join(tracefs.root(), "README")
        try:
            with open(readme) as file:
                if "(ref_ctr_offset)" in file.read():
                    return True, f"{readme} documents (ref_ctr_offset)"
        except OSError as error:
            readme = f"{readme}: {error.strerror}"
    pmu = check("uprobe_pmu_ref_ctr")
    if pmu.available:
        return True, f"the uprobe PMU has it ({pmu.detail})"
    if readme is None:
        return False, "no tracefs uprobes, and no ref_ctr_offset in the uprobe PMU"
    return False, f"{readme} does not document (ref_ctr_offset)"


def _uprobe_pmu() -> Answer:
    path = os.path.join(UPROBE_PMU, "type")
    try:
        with open(path) as file:
            return True, f"{path}: type {int(file.read())}"
    except (OSError, ValueError) as error:
        return False, f"{path}: {_why(error)}"


def _uprobe_pmu_ref_ctr() -> Answer:
    path = os.path.join(UPROBE_PMU, "format", "ref_ctr_offset")
    try:
        with open(path) as file:
            field, first, last = parse_format(file.read())
    except (OSError, ValueError) as error:
        return False, f"{path}: {_why(error)}"
    return True, f"{path}: bits {first}-{last} of {field}"


def _fanotify_permission() -> Answer:
    from .procwatch import FileOpens

    with tempfile.TemporaryDirectory(prefix="sdtrace-probe-") as directory:
        scratch = os.path.join(directory, "marked")
        open(scratch, "w").close()
        try:
            opens = FileOpens([scratch])
        except OSError as error:
            return False, f"fanotify: {_why(error)}"
        blocking = opens.blocking
        opens.close()
    if blocking:
        return True, "FAN_OPEN_PERM marks accepted"
    return False, ("FAN_OPEN_PERM refused (EINVAL): kernel built without "
                   "CONFIG_FANOTIFY_ACCESS_PERMISSIONS; plain FAN_OPEN only")


def _proc_connector() -> Answer:
    from .procwatch import ProcEvents

    try:
        events = ProcEvents()
    except OSError as error:
        return False, f"netlink connector: {_why(error)}"
    events.close()
    return True, "subscribed to fork/exec/exit events"


def _bpf() -> Answer:
    from . import bpf

    try:
        bpf.Map.hash(4, 4, 1, "sdtrace_probe").close()
    except SdtraceError as error:   # BpfRefused, also for a machine without bpf()
        return False, _bpf_why(error)
    return True, "created a hash map"


def _bpf_ringbuf() -> Answer:
    from . import bpf

    if not check("bpf").available:
        return False, f"no usable bpf(): {check('bpf').detail}"
    try:
        bpf.Map.ringbuf(os.sysconf("SC_PAGE_SIZE"), "sdtrace_probe").close()
    except SdtraceError as error:
        return False, _bpf_why(error)
    return True, "created a one-page ring buffer"


# mov r0, 0; exit -- what a probe program needs to be loadable
RETURN_ZERO = bytes.fromhex("b700000000000000" "9500000000000000")


def _bpf_uprobe_multi() -> Answer:
    from . import bpf

    if not check("bpf").available:
        return False, f"no usable bpf(): {check('bpf').detail}"
    try:
        program = bpf.Program(RETURN_ZERO, "sdtrace_probe",
                              expected_attach_type=bpf.BPF_TRACE_UPROBE_MULTI)
    except SdtraceError as error:
        return False, _bpf_why(error)
    try:
        known = _link_refusal(bpf, program, pid=0)
        if known != errno.EBADF:
            return False, (f"BPF_TRACE_UPROBE_MULTI link refused: "
                           f"{errno.errorcode.get(known, known)}")
        if _link_refusal(bpf, program, pid=0xffffffff) != errno.EINVAL:
            return False, "its pid filter matches one thread, not a process (fixed in 6.10)"
    finally:
        program.close()
    return True, "BPF_TRACE_UPROBE_MULTI links, with the 6.10 pid filter"


def _link_refusal(bpf, program, pid: int) -> Optional[int]:
    """The errno of linking `program` to "/" for `pid` (None if, absurdly, it was linked)."""
    try:
        bpf.UprobeMultiLink(program, "/", [0], pid=pid).close()
    except SdtraceError as error:
        return getattr(error, "errno", None)
    return None


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        hint = " (needs root)" if error.errno in (errno.EPERM, errno.EACCES) else ""
        return f"{errno.errorcode.get(error.errno, error.errno)} ({error.strerror}){hint}"
    return str(error)


BPF_PERMISSION = "(needs root, or CAP_BPF)"    # ends the detail of a feature we may not use


def _bpf_why(error: Exception) -> str:
    code = getattr(error, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return f"{error} {BPF_PERMISSION}"
    return str(error)


# name -> (the first release that has it, the check), in the order `sdtrace info` shows them
FEATURES: Dict[str, Tuple[str, Callable[[], Answer]]] = {
    "tracefs_uprobes": ("3.5", _tracefs_uprobes),
    "tracefs_ref_ctr": ("4.20", _tracefs_ref_ctr),
    "uprobe_pmu": ("4.17", _uprobe_pmu),
    "uprobe_pmu_ref_ctr": ("4.20", _uprobe_pmu_ref_ctr),
    "fanotify_permission": ("2.6.37", _fanotify_permission),
    "proc_connector": ("2.6.15", _proc_connector),
    "bpf": ("3.18", _bpf),
    "bpf_ringbuf": ("5.8", _bpf_ringbuf),
    "bpf_uprobe_multi": ("6.10", _bpf_uprobe_multi),
}


@functools.lru_cache(maxsize=None)
def check(name: str) -> Feature:
    """The Feature `name` (a key of FEATURES), probed on first use."""
    kernel, probe = FEATURES[name]
    available, detail = probe()
    return Feature(name, available, detail, kernel)


def check_all() -> List[Feature]:
    return [check(name) for name in FEATURES]
