"""The BPF executor's scopes on the real kernel: one process (the link's pid filter), and a
process tree (scope.ProcessTree, grown at fork and shrunk at exit by tracepoint programs).

A tree arms its link for every process that maps the file, so those tests trace private
copies of their files: no other process on the machine maps them.
"""
import contextlib
import os
import subprocess
import sys

import pytest
from helpers import (REPOSITORY, SYSTEM_PYTHON, Library, Target, address_of, bpf_events,
                     counter, private_copy, read_mem, wait_for)

from sdtrace.discovery import notes
from sdtrace.engine.bpf import scope
from sdtrace.engine.bpf.executor import BpfExecutor
from sdtrace.errors import NoSuchProcess
from sdtrace.kernel import bpf, perf, tracefs

pytestmark = pytest.mark.kernel

BREAKPOINT = b"\xcc"


@contextlib.contextmanager
def semusers(library, count):
    """`count` semuser processes with the library loaded, stopped on the way out."""
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            started.append(library.user())
            stack.callback(started[-1].stop)
        yield started


def drain(executor, expected):
    """Every record up to `expected` of them, waiting for each; then whatever else came."""
    records = []
    assert wait_for(lambda: records.extend(bpf_events(executor)) or len(records) >= expected)
    return records + bpf_events(executor)


def pids(records):
    return sorted(record.pid for record in records)


def child_of(reply):
    """The pid semuser's "fork" printed ("child PID"): the child now reads the commands."""
    [line] = reply
    return int(line.split()[1])


def test_one_process_is_traced_its_children_and_strangers_are_not(fixtures, tmp_path):
    """The link's pid filter: the breakpoints are in that process alone; a stranger mapping the
    same file keeps its semaphore at 0, and a forked child, though fork copied the raised
    semaphore and the breakpoint into it, produces no record."""
    library = Library(fixtures, tmp_path)
    sites = notes.read_probes(library.path)
    with semusers(library, 2) as (traced, stranger), \
            BpfExecutor(sites, pid=traced.pid) as executor:
        assert executor.tree is None
        assert traced.send("fire 1") == ["enabled 1"]
        assert stranger.send("fire 1") == ["enabled 0"]
        assert pids(drain(executor, 1)) == [traced.pid]
        child_of(traced.send("fork"))
        assert traced.send("fire 2") == ["enabled 1"]          # the child answers
        traced.send("exit")
        assert traced.send("fire 1") == ["enabled 1"]          # the parent again
        assert pids(drain(executor, 1)) == [traced.pid]


def test_threads_of_the_process_are_traced(fixtures):
    """Since Linux 6.10 the pid filter is the process, not its main thread."""
    path = fixtures.path("workload")
    sites = [site for site in notes.read_probes(path) if site.name == "start"]
    with Target(path) as target, BpfExecutor(sites, pid=target.pid) as executor:
        reply = target.send("threads 1")
        threads = sorted(int(line.split()[1]) for line in reply if line.startswith("pair"))
        records = drain(executor, 2)
    assert pids(records) == [target.pid] * 2
    assert sorted(record.tid for record in records) == threads
    assert target.pid not in threads


def test_a_tree_follows_forked_children_and_ignores_strangers(fixtures, tmp_path):
    """The tree: a child and a grandchild forked after arming are traced from their first
    instruction; a stranger mapping the same file is not (its semaphore is raised: the link
    is armed for every process); an exited child leaves the tree, its parent stays."""
    library = Library(fixtures, tmp_path)
    sites = notes.read_probes(library.path)
    with semusers(library, 2) as (traced, stranger), \
            BpfExecutor(sites, pid=traced.pid, children=True) as executor:
        assert traced.pid in executor.tree and stranger.pid not in executor.tree
        assert stranger.send("fire 3") == ["enabled 1"]
        traced.send("fire 1")
        child = child_of(traced.send("fork"))
        assert child in executor.tree
        traced.send("fire 2")
        grandchild = child_of(traced.send("fork"))
        assert grandchild in executor.tree
        traced.send("fire 3")
        traced.send("exit")                                    # the grandchild
        assert wait_for(lambda: grandchild not in executor.tree)
        traced.send("exit")                                    # the child
        assert wait_for(lambda: child not in executor.tree)
        traced.send("fire 1")
        records = drain(executor, 7)
        assert traced.pid in executor.tree
        assert executor.tree.missed() == 0 and executor.lost == 0
    assert [(record.pid, record.args[0]) for record in records] == [
        (traced.pid, 0), (child, 0), (child, 1), (grandchild, 0), (grandchild, 1),
        (grandchild, 2), (traced.pid, 0)]


def test_threads_of_a_process_in_the_tree_are_traced(fixtures, tmp_path):
    """A thread (clone with CLONE_THREAD) is not a new process: traced under its tgid."""
    path = private_copy(fixtures, "workload", tmp_path)
    sites = [site for site in notes.read_probes(path) if site.name == "start"]
    with Target(path) as target, \
            BpfExecutor(sites, pid=target.pid, children=True) as executor:
        target.send("threads 1")
        records = drain(executor, 2)
        threads_in_tree = [record.tid for record in records if record.tid in executor.tree]
    assert pids(records) == [target.pid] * 2
    assert threads_in_tree == []


@pytest.mark.parametrize("shape", ["fork-exec", "fork", "vfork", "spawn", "thread-exec"])
def test_every_way_a_process_comes_into_being_is_in_the_tree(fixtures, tmp_path, shape):
    """The root is a shell that execs the spawner, which makes processes every way there is
    (fork, exec, vfork, posix_spawn, exec from a thread): each process that reports a raised
    semaphore fires spawner:value with it, and each such hit is recorded, under its pid."""
    path = private_copy(fixtures, "spawner", tmp_path)
    sites = notes.read_probes(path)
    shell = subprocess.Popen(["sh", "-c", f"read armed; exec {path} {shape}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with BpfExecutor(sites, pid=shell.pid, children=True) as executor:
            output, _ = shell.communicate("armed\n", timeout=60)
            reports = {(int(pid), int(value)) for _word, pid, _sem, value
                       in (line.split() for line in output.splitlines())}
            records = drain(executor, len(reports))
    finally:
        shell.kill()
        shell.wait()
    assert len(reports) == (1 if shape == "thread-exec" else 2)
    assert all(value == 1 for _pid, value in reports), output
    assert sorted((record.pid, *record.args) for record in records) == sorted(reports)


TWO_CHILDREN = """
import gc, os, sys
gc.disable()                    # gc__start fires for the script's collect() calls only
rounds, collects = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()            # armed
for _ in range(rounds):
    first_exited, armed_again = os.pipe()
    first = os.fork()
    if first == 0:
        for _ in range(collects):
            gc.collect()
        os._exit(0)
    second = os.fork()
    if second == 0:
        for _ in range(collects):
            gc.collect()
        os.read(first_exited, 1)
        for _ in range(collects):
            gc.collect()
        os._exit(0)
    os.waitpid(first, 0)
    os.write(armed_again, b"x")
    os.waitpid(second, 0)
    print(first, second, flush=True)
os._exit(0)                     # no collection at finalization
"""


def test_two_children_one_exiting_leaves_the_other_traced(tmp_path):
    """The race perf's inherit has (issue 9: a child's exit sometimes disarms its sibling,
    1 to 2 times in 8): each of 16 rounds forks two children, the first fires and exits, the
    second fires before and after that exit; every hit of both is recorded."""
    rounds, collects = 16, 5
    python = tmp_path / "python3.11"
    python.write_bytes(open(SYSTEM_PYTHON, "rb").read())
    python.chmod(0o755)
    sites = [site for site in notes.read_probes(str(python)) if site.name == "gc__start"]
    script = subprocess.Popen([str(python), "-I", "-S", "-c", TWO_CHILDREN, str(rounds),
                               str(collects)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        with BpfExecutor(sites, pid=script.pid, children=True) as executor:
            output, _ = script.communicate("armed\n", timeout=60)
            assert script.returncode == 0
            records = drain(executor, 3 * collects * rounds)
            assert executor.lost == 0 and executor.tree.missed() == 0
            children = [int(pid) for line in output.splitlines() for pid in line.split()]
            assert wait_for(lambda: not any(pid in executor.tree for pid in children))
    finally:
        script.kill()
        script.wait()
    hits = {pid: 0 for pid in children}
    for record in records:
        hits[record.pid] += 1
    assert hits == {pid: collects * (1 + index % 2) for index, pid in enumerate(children)}


def test_a_full_tree_counts_the_children_it_missed(fixtures, tmp_path):
    library = Library(fixtures, tmp_path)
    sites = notes.read_probes(library.path)
    with semusers(library, 1) as (traced,), \
            BpfExecutor(sites, pid=traced.pid, children=True, max_processes=1) as executor:
        child = child_of(traced.send("fork"))
        assert child not in executor.tree
        traced.send("fire 1")                                 # the child
        traced.send("exit")
        traced.send("fire 1")
        records = drain(executor, 1)
        assert executor.tree.missed() == 1
    assert pids(records) == [traced.pid]


def test_without_group_dead_a_process_leaves_the_tree_when_its_leader_exits(fixtures):
    """Before Linux 6.16 sched_process_exit does not say whether the group died: the exit
    program generated for such a format removes a process at its leader's exit."""
    exit_format = tracefs.event_format(*scope.EXIT)
    older = tracefs.EventFormat(exit_format.group, exit_format.event,
                                [field for field in exit_format.fields
                                 if field.name != "group_dead"])
    with Target(fixtures.path("values")) as target, \
            bpf.Map.hash(4, 4, 4, "test_tree") as tree, \
            bpf.Program(scope._exit_program(older, tree.fd), "test_exit",
                        prog_type=bpf.BPF_PROG_TYPE_TRACEPOINT) as program:
        key = scope.TGID.pack(target.pid)
        tree.update(key, scope.PRESENT)
        perf_fd = perf.open_tracepoint(tracefs.event_id(*scope.EXIT), cpu=perf.cpus()[0])
        try:
            link = bpf.PerfEventLink(program, perf_fd)
        finally:
            os.close(perf_fd)
        with link:
            assert tree.lookup(key) == scope.PRESENT
            target.stop()
            assert wait_for(lambda: tree.lookup(key) is None)


def test_a_process_that_does_not_exist_is_one_line(fixtures):
    gone = subprocess.Popen(["true"])
    gone.wait()
    sites = notes.read_probes(fixtures.path("values"))
    for children in (False, True):
        with pytest.raises(NoSuchProcess, match=f"^process {gone.pid} does not exist$"):
            BpfExecutor(sites, pid=gone.pid, children=children)


ARMED_TREE = """
import sys
from sdtrace.discovery import notes
from sdtrace.engine.bpf.executor import BpfExecutor
executor = BpfExecutor(notes.read_probes({path!r}), pid={pid}, children=True)
print("armed", flush=True)
sys.stdin.read()
"""


def test_sigkilled_tree_tracer_leaves_no_breakpoint_and_no_semaphore(fixtures, tmp_path):
    """The tree's link is armed for every process: a SIGKILLed tracer leaves the stranger's
    memory as it found it, as well as the traced process's."""
    library = Library(fixtures, tmp_path)
    [tick] = notes.read_probes(library.path)
    with semusers(library, 2) as processes:
        traced = processes[0]
        sites = [address_of(process.pid, library.path, tick.offset, "r-xp")
                 for process in processes]
        originals = [read_mem(process.pid, site, 1) for process, site in zip(processes, sites)]
        tracer = subprocess.Popen(
            [sys.executable, "-c", ARMED_TREE.format(path=library.path, pid=traced.pid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=REPOSITORY))
        try:
            assert tracer.stdout.readline() == "armed\n"
            for process, site in zip(processes, sites):
                assert read_mem(process.pid, site, 1) == BREAKPOINT
                assert counter(process.pid, library.path, tick.semaphore) == 1
            tracer.kill()
            assert wait_for(lambda: all(
                read_mem(process.pid, site, 1) == original
                and counter(process.pid, library.path, tick.semaphore) == 0
                for process, site, original in zip(processes, sites, originals)))
        finally:
            tracer.kill()
            tracer.wait()
