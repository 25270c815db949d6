"""SDT semaphores counted in user space: what a session holds, and how it is taken back.

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
  scanned for counters it did not copy.  An exec or an exit is not told by
  its event's timestamp: under ptrace the exec stop, where ``-c`` raises the
  new image, comes *before* the kernel sends the exec event (exec_binprm:
  ptrace_event, then proc_exec_connector), so a holding made in the new image
  looks older than the exec.  The memory tells instead: at an exec event, or
  a thread-group leader's exit event, the process is scanned, and I/O through
  the descriptor its holdings were made with fails for an image that is gone
  (``MemoryReplaced`` while the process lives, ``ProcessGone`` once it has
  exited); only then are the holdings dropped.  Opens of the files come from
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
import fcntl
import os
from dataclasses import dataclass, field

from ..errors import SdtraceError
from ..kernel.log import logger
from ..kernel.procfs import FileId, ProcessDenied, ProcessGone, process_name, read_maps
from ..kernel.procmem import MappingGone, ProcessMemory, counter_addresses

_log = logger(__name__)

RUN_DIR = "/run/sdtrace"
COUNTER_LOCK = "counters.lock"
COUNTER_LIMIT = 0xffff


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



def maps_hold(mappings, holding):
    """Whether the memory `holding` names is still mapped as it was."""
    return holding.address in counter_addresses(mappings, holding.file_id, holding.offset)



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
        _log.debug("process %d: semaphore at %s+0x%x lowered by %d: %d -> %d", holding.pid,
                   holding.path, holding.offset, count, value, max(0, value - count))
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


def log_warning(message):
    """The default `warn` of this layer: a warning on its logger, silent unless the
    program using sdtrace configures logging (the library never writes to stderr)."""
    _log.warning(message)


