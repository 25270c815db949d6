"""The processes a BPF executor traces when it follows a process tree: a map the kernel keeps.

A uprobe_multi link's pid filter names one process (its threads included,
since Linux 6.10, 46ba0e49b642): a child the process forks later is not
traced, even though fork copied the breakpoints into its memory.  perf's
``inherit`` follows children, but on this kernel it races: with two children,
the exit of one sometimes takes the other's breakpoint and semaphore raise
with it.  So a tree is a set of processes the probe program checks itself:

* a BPF hash map of tgids (u32 -> u32 1), seeded with the roots;
* a program on the ``task:task_newtask`` tracepoint, which the kernel runs in
  the parent, inside ``copy_process()``, before the child can run: if the
  parent's tgid is in the map and ``clone_flags`` has no ``CLONE_THREAD`` (a
  new process, not a thread of a traced one), the child's pid (its tgid) is
  added; an insertion that fails (the map is full) is counted in a per-CPU
  counter, ``missed()``, never silent;
* a program on ``sched:sched_process_exit`` that removes the process when its
  last thread exits (the event's ``group_dead``, Linux 6.16, 3ca55ca225d7,
  "exit: move and extend sched_process_exit() tracepoint"; before it, when
  its leader exits), so that a reused pid is not traced as the old process;
* the uprobe_multi link is then armed for every process (pid 0), and the
  probe program returns at once for a tgid not in the map (codegen).

Arming for every process has a cost outside the tree: the kernel inserts
the breakpoints, and raises the semaphores, in every process that maps the
file, whose hits then trap into the program for a lookup and return.

Both tracepoint programs read the event's record at the offsets its
``format`` file gives, and are attached with BPF perf links
(kernel.bpf.PerfEventLink); like the maps, they are owned by their fds.
"""
import os
import struct

from ...errors import NoSuchProcess, SdtraceError
from ...kernel import perf, tracefs
from ...kernel.bpf import BPF_PROG_TYPE_TRACEPOINT, Map, Owned, PerfEventLink, Program
from .asm import R0, R1, R6, R10, Assembler
from .codegen import count_and_return, map_call

CLONE_THREAD = 0x00010000
DEFAULT_MAX_PROCESSES = 1 << 15
TGID = struct.Struct("<I")
PRESENT = TGID.pack(1)

FORK = ("task", "task_newtask")
EXIT = ("sched", "sched_process_exit")


def _field(event_format, name, sizes):
    """The field `name` of a tracepoint's format, with one of the `sizes` it must have."""
    for field in event_format.fields:
        if field.name == name and field.size in sizes:
            return field
    raise SdtraceError(f"tracepoint {event_format.group}:{event_format.event} has no "
                       f"{name} field of {' or '.join(map(str, sizes))} bytes")


def _fork_program(event_format, tree_fd, missed_fd):
    """Adds the new process to the tree when its parent is in it."""
    flags = _field(event_format, "clone_flags", (8,))
    pid = _field(event_format, "pid", (4,))
    code = Assembler()
    code.mov(R6, R1)
    code.call("get_current_pid_tgid")
    code.alu64("rsh", R0, 32)
    code.store(4, R10, -4, R0)
    map_call(code, "map_lookup_elem", tree_fd, -4)
    code.jump("jeq", R0, 0, "out")
    code.load(8, R1, R6, flags.offset)
    code.jump("jset", R1, CLONE_THREAD, "out")
    code.load(4, R1, R6, pid.offset)
    code.store(4, R10, -4, R1)
    code.store(4, R10, -8, 1)
    map_call(code, "map_update_elem", tree_fd, -4, -8)
    code.jump("jeq", R0, 0, "out")
    count_and_return(code, missed_fd)
    return code.assemble()


def _exit_program(event_format, tree_fd):
    """Removes the exiting process from the tree: at its last thread's exit (group_dead),
    or its leader's where the event does not say."""
    group_dead = next((field for field in event_format.fields if field.name == "group_dead"),
                      None)
    code = Assembler()
    if group_dead is not None:
        code.load(group_dead.size, R1, R1, group_dead.offset)
        code.jump("jeq", R1, 0, "out")
    code.call("get_current_pid_tgid")
    code.mov(R1, R0)
    code.alu64("rsh", R0, 32)
    if group_dead is None:
        code.alu32("mov", R1, R1)
        code.jump("jne", R1, R0, "out")
    code.store(4, R10, -4, R0)
    map_call(code, "map_delete_elem", tree_fd, -4)
    code.label("out")
    code.mov(R0, 0)
    code.exit()
    return code.assemble()


class ProcessTree:
    """`roots` (pids) and every process they fork from now on, as a BPF map of tgids.

    `map` is what the probe programs check; missed() counts the children that could
    not be added (more than `max_processes` in the tree at once)."""

    def __init__(self, roots, max_processes=DEFAULT_MAX_PROCESSES):
        self._owned = Owned()
        try:
            self.map = self._owned.own(Map.hash(TGID.size, len(PRESENT), max_processes,
                                          "sdtrace_tree"))
            self._missed = self._owned.own(Map.percpu_array(8, 1, "sdtrace_missed"))
            for pid in roots:
                if not os.path.exists(f"/proc/{pid}"):
                    raise NoSuchProcess(pid)
                self.map.update(TGID.pack(pid), PRESENT)
            fork_format = tracefs.event_format(*FORK)
            self._attach(FORK, _fork_program(fork_format, self.map.fd, self._missed.fd))
            self._attach(EXIT, _exit_program(tracefs.event_format(*EXIT), self.map.fd))
        except BaseException:
            self.close()
            raise

    def _attach(self, event, code):
        program = self._owned.own(Program(code, f"sdtrace_{event[1]}",
                                    prog_type=BPF_PROG_TYPE_TRACEPOINT))
        perf_fd = perf.open_tracepoint(tracefs.event_id(*event), cpu=perf.cpus()[0])
        try:
            self._owned.own(PerfEventLink(program, perf_fd))
        finally:
            os.close(perf_fd)

    def __contains__(self, pid):
        return self.map.lookup(TGID.pack(pid)) is not None

    def missed(self):
        """Children forked in the tree that the map had no room for, summed over the CPUs."""
        return self._missed.total_per_cpu(bytes(4))

    def close(self):
        """Stops following (the links go first) and frees the map; idempotent."""
        self._owned.close()
