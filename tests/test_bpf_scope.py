"""The BPF executor's scopes on the real kernel: one process (the link's pid filter), and what
is the BPF tree's own (scope.ProcessTree, grown at fork and shrunk at exit by tracepoint
programs): its size limit, its exit program, its cleanup.  What every executor's tree
does is in test_process_trees.py.

A tree arms its link for every process that maps the file, so those tests trace private
copies of their files: no other process on the machine maps them.
"""
import os
import subprocess
import sys

import pytest
from helpers import (REPOSITORY, Library, Target, address_of, child_of, counter, drain, pids,
                     read_mem, wait_for)

from sdtrace.discovery import notes
from sdtrace.engine.bpf import scope
from sdtrace.engine.bpf.executor import BpfExecutor
from sdtrace.errors import NoSuchProcess
from sdtrace.kernel import bpf, perf, tracefs

pytestmark = pytest.mark.kernel

BREAKPOINT = b"\xcc"


def test_one_process_is_traced_its_children_and_strangers_are_not(fixtures, tmp_path):
    """The link's pid filter: the breakpoints are in that process alone; a stranger mapping the
    same file keeps its semaphore at 0, and a forked child, though fork copied the raised
    semaphore and the breakpoint into it, produces no record."""
    library = Library(fixtures, tmp_path)
    sites = notes.read_probes(library.path)
    with library.users(2) as (traced, stranger), \
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


def test_a_full_tree_counts_the_children_it_missed(fixtures, tmp_path):
    library = Library(fixtures, tmp_path)
    sites = notes.read_probes(library.path)
    with library.users(1) as (traced,), \
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
    with library.users(2) as processes:
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
