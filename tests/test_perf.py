"""perf.py against the real kernel: arming by fd, per-CPU rings, loss, crash safety.

Every test defines demo:hit of helpers.SDT_PROGRAM in a fresh group,
opens it through perf, drives the program over its stdin protocol and checks
the kernel's effects through /proc/PID/mem: the semaphore (2 bytes at its file
offset) and the breakpoint (0xcc at the site).
"""
import ctypes
import os
import platform
import subprocess
import sys
import time

import pytest
from helpers import (REPOSITORY, Target, add_demo_hit, address_of, counter, definitions_of,
                     read_mem, wait_for)

from sdtrace.errors import SdtraceError
from sdtrace.kernel import perf, tracefs

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(platform.machine() != "x86_64",
                                 reason="the fetch arguments use x86-64 registers")]

BREAKPOINT = b"\xcc"      # int3, what uprobes write over the site on x86


def site_byte(target, program):
    return read_mem(target.pid, address_of(target.pid, program.path, program.site), 1)


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def drain_until(rings, count, timeout=10.0):
    """Drains until `count` samples arrived (or timeout); returns (samples, lost)."""
    samples, lost = [], 0
    deadline = time.monotonic() + timeout
    while len(samples) < count and time.monotonic() < deadline:
        rings.wait(0.05)
        batch, batch_lost = rings.drain()
        samples += batch
        lost += batch_lost
    return samples, lost


@pytest.fixture
def hit_event(program, group):
    """demo:hit defined with its semaphore and (i, message) arguments: (id, format)."""
    add_demo_hit(program, group)
    return tracefs.event_id(group, "hit"), tracefs.event_format(group, "hit")


def test_cpus_are_the_online_cpus():
    assert perf.cpus() == sorted(perf.cpus())
    assert len(perf.cpus()) == os.cpu_count()


def test_every_hit_arrives_once_with_its_values(program, hit_event):
    event_id, event_format = hit_event
    message = "héllo wörld"
    with Target(program.path, message) as target, perf.RingSet() as rings:
        identifiers = rings.open(event_id)
        assert len(identifiers) == len(perf.cpus()) == len(set(identifiers))
        rings.enable()
        before = now_ns()
        assert target.send("fire 1000") == ["enabled 1"]
        after = now_ns()
        samples, lost = drain_until(rings, 1000)
        assert (len(samples), lost) == (1000, 0)
        assert rings.drain() == ([], 0)
        assert rings.hit_count() == 1000
        assert [event_format.decode(raw) for *_, raw in samples] == [
            (index, message) for index in range(1000)]
        site_address = address_of(target.pid, program.path, program.site)
        for timestamp, sample_id, pid, tid, cpu, raw in samples:
            assert sample_id in identifiers and pid == tid == target.pid
            assert before <= timestamp <= after and cpu in perf.cpus()
            assert event_format.probe_ip(raw) == site_address
        assert [sample[0] for sample in samples] == sorted(sample[0] for sample in samples)
        rings.close()
        rings.close()


def test_null_string_argument_decodes_as_none(program, hit_event):
    event_id, event_format = hit_event
    with Target(program.path, "NULL") as target, perf.RingSet() as rings:
        rings.open(event_id)
        rings.enable()
        target.send("fire 2")
        samples, _ = drain_until(rings, 2)
        assert [event_format.decode(raw) for *_, raw in samples] == [(0, None), (1, None)]


def test_ring_wraps_around_without_losing_or_garbling(program, hit_event):
    event_id, event_format = hit_event
    with Target(program.path, "wrap") as target, perf.RingSet(data_pages=1) as rings:
        os.sched_setaffinity(target.pid, {perf.cpus()[0]})
        rings.open(event_id)
        rings.enable()
        received = []
        # ~80-byte records in a 4 KiB ring: rounds of 30 wrap it often, never fill it
        for _ in range(40):
            target.send("fire 30")
            samples, lost = drain_until(rings, 30)
            assert lost == 0
            received += [event_format.decode(raw) for *_, raw in samples]
        assert received == [(index, "wrap") for index in range(30)] * 40


def test_limited_drains_empty_the_rings_into_the_backlog(program, hit_event):
    event_id, event_format = hit_event
    with Target(program.path, "backlog") as target, perf.RingSet(data_pages=1) as rings:
        os.sched_setaffinity(target.pid, {perf.cpus()[0]})
        rings.open(event_id)
        rings.enable()
        received = []
        # 40 ~80-byte records fit a 4 KiB ring, two rounds do not: each drain walks only
        # ~256 bytes, yet no round is lost, because the drain empties the ring first
        for _ in range(5):
            target.send("fire 40")
            samples, lost = rings.drain(limit=256)
            assert lost == 0 and 0 < len(samples) < 10
            received += samples
        assert rings.pending and rings.backlog_bytes > 0
        while rings.pending:
            samples, lost = rings.drain(limit=256)
            assert lost == 0 and 0 < len(samples) < 10
            received += samples
        assert rings.backlog_bytes == 0 and rings.drain() == ([], 0)
        assert rings.hit_count() == 200
        assert [event_format.decode(raw) for *_, raw in received] == [
            (index, "backlog") for index in range(40)] * 5


def test_full_ring_accounts_for_every_hit(program, hit_event):
    event_id, _ = hit_event
    hits = 200_000
    with Target(program.path, "flood") as target, perf.RingSet(data_pages=1) as rings:
        os.sched_setaffinity(target.pid, {perf.cpus()[0]})
        rings.open(event_id)
        rings.enable()
        target.send(f"fire {hits}")
        received, lost = rings.drain()
        assert 0 < len(received) < hits
        # The kernel emits PERF_RECORD_LOST at its next write into the ring: one more hit.
        target.send("fire 1")
        flushed, flushed_lost = drain_until(rings, 1)
        assert len(received) + lost + len(flushed) + flushed_lost == hits + 1
        assert lost + flushed_lost > 0
        assert rings.hit_count() == hits + 1


def test_wait_wakes_per_wakeup_events_and_times_out(program, hit_event):
    event_id, _ = hit_event
    with Target(program.path, "wake") as target:
        with perf.RingSet() as rings:
            rings.open(event_id, wakeup_events=1)
            rings.enable()
            assert rings.wait(0.05) is False
            target.send("fire 1")
            assert rings.wait(5) is True
            assert len(rings.drain()[0]) == 1
        with perf.RingSet() as rings:      # default: wake only when half full
            rings.open(event_id)
            rings.enable()
            target.send("fire 1")
            assert rings.wait(0.2) is False
            assert len(rings.drain()[0]) == 1


def test_semaphore_and_breakpoint_live_exactly_while_fds_are_open(program, hit_event):
    event_id, _ = hit_event
    with Target(program.path, "x") as target:
        original = site_byte(target, program)
        assert original != BREAKPOINT and counter(target.pid, program.path, program.semaphore) == 0
        rings = perf.RingSet()
        try:
            rings.open(event_id)               # disabled, yet armed: open registers
            assert counter(target.pid, program.path, program.semaphore) == 1
            assert site_byte(target, program) == BREAKPOINT
            assert target.send("fire 0") == ["enabled 1"]
            with Target(program.path, "late") as late:   # mapped after: counted at mmap
                assert counter(late.pid, program.path, program.semaphore) == 1
        finally:
            rings.close()
        assert counter(target.pid, program.path, program.semaphore) == 0
        assert site_byte(target, program) == original
        assert target.send("fire 0") == ["enabled 0"]


def test_two_sessions_on_one_site_count_the_semaphore_once(program, hit_event):
    event_id, _ = hit_event
    second = tracefs.new_group()
    try:
        add_demo_hit(program, second)
        with Target(program.path, "x") as target:
            with perf.RingSet() as first_rings, perf.RingSet() as second_rings:
                first_rings.open(event_id)
                second_rings.open(tracefs.event_id(second, "hit"))
                assert counter(target.pid, program.path, program.semaphore) == 1
                first_rings.close()
                assert counter(target.pid, program.path, program.semaphore) == 1
            assert counter(target.pid, program.path, program.semaphore) == 0
    finally:
        tracefs.remove_group(second)


def test_remove_group_while_open_is_busy(program, group, hit_event):
    event_id, _ = hit_event
    with perf.RingSet() as rings:
        rings.open(event_id)
        with pytest.raises(SdtraceError, match=f"{group}/hit.*still open"):
            tracefs.remove_group(group)
    tracefs.remove_group(group)
    assert definitions_of(group) == []


def test_remove_stale_leaves_a_stale_group_that_is_still_open(program):
    dead_owner = subprocess.run([sys.executable, "-c",
                                 "from sdtrace.kernel import tracefs; print(tracefs.new_group())"],
                                capture_output=True, text=True, check=True).stdout.strip()
    try:
        add_demo_hit(program, dead_owner)
        with perf.RingSet() as rings:
            rings.open(tracefs.event_id(dead_owner, "hit"))
            assert dead_owner not in tracefs.remove_stale()
            assert definitions_of(dead_owner)
        assert dead_owner in tracefs.remove_stale()
    finally:
        tracefs.remove_group(dead_owner)


TRACER = """
import sys
from sdtrace.kernel import perf, tracefs
group = tracefs.new_group()
tracefs.add_uprobe(group, "hit", {path!r}, {site}, {semaphore}, {fetchargs!r})
rings = perf.RingSet()
rings.open(tracefs.event_id(group, "hit"))
rings.enable()
print(group, flush=True)
sys.stdin.read()
"""


def test_sigkilled_tracer_leaves_nothing_armed(program):
    code = TRACER.format(path=program.path, site=program.site, semaphore=program.semaphore,
                         fetchargs=program.fetchargs)
    with Target(program.path, "x") as target:
        original = site_byte(target, program)
        tracer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=REPOSITORY))
        tracer_group = None
        try:
            tracer_group = tracer.stdout.readline().strip()
            assert tracer_group.startswith("sdtrace_")
            assert counter(target.pid, program.path, program.semaphore) == 1
            assert site_byte(target, program) == BREAKPOINT
            tracer.kill()
            assert wait_for(lambda: counter(target.pid, program.path, program.semaphore) == 0
                            and site_byte(target, program) == original, timeout=1.0)
            assert target.send("fire 0") == ["enabled 0"]
            assert definitions_of(tracer_group)        # the inert definition remains
            tracer.wait()
            assert tracer_group in tracefs.remove_stale()
            assert definitions_of(tracer_group) == []
        finally:
            tracer.kill()
            tracer.wait()
            if tracer_group:
                tracefs.remove_group(tracer_group)


# --- errors ----------------------------------------------------------------------

def open_uprobe_pmu(path, offset):
    """Another tracer's uprobe at path:offset without a semaphore, via the uprobe PMU."""
    with open("/sys/bus/event_source/devices/uprobe/type") as type_file:
        pmu_type = int(type_file.read())
    path_buffer = ctypes.create_string_buffer(path.encode())
    attr = perf.PERF_EVENT_ATTR.pack(
        pmu_type, perf.PERF_EVENT_ATTR.size, 0, 0, 0, 0, perf.ATTR_DISABLED, 0, 0,
        ctypes.addressof(path_buffer), offset, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(perf.SYSCALL_PERF_EVENT_OPEN[os.uname().machine]), attr,
                      ctypes.c_long(-1), ctypes.c_long(0), ctypes.c_long(-1),
                      ctypes.c_ulong(perf.PERF_FLAG_FD_CLOEXEC))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd


def test_ref_ctr_offset_mismatch_at_open_is_explained(program, hit_event):
    event_id, _ = hit_event
    other_tracer = open_uprobe_pmu(program.path, program.site)
    try:
        with perf.RingSet() as rings:
            with pytest.raises(SdtraceError, match="ref_ctr_offset mismatch") as error:
                rings.open(event_id)
            assert f"trace event {event_id}" in str(error.value)
    finally:
        os.close(other_tracer)


def test_unknown_event_id_is_an_sdtrace_error():
    with pytest.raises(SdtraceError, match=r"trace event 999999999.*Invalid argument"):
        perf.open_tracepoint(999999999)


def test_unprivileged_open_names_root_and_paranoid(program, hit_event):
    event_id, _ = hit_event
    code = ("from sdtrace.kernel import perf\n"
            "try:\n"
            f"    perf.open_tracepoint({event_id})\n"
            "except Exception as error:\n"
            "    print(type(error).__name__, error)\n")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "/usr/bin/python3", "-c", code], capture_output=True, text=True,
                            cwd="/", env=dict(os.environ, PYTHONPATH=REPOSITORY))
    line = result.stdout.strip()
    assert line.startswith("SdtraceError perf_event_open"), (line, result.stderr)
    assert "root" in line and "perf_event_paranoid" in line


def test_ring_size_must_be_a_power_of_two(hit_event):
    event_id, _ = hit_event
    with perf.RingSet(data_pages=3) as rings:
        with pytest.raises(SdtraceError, match="power of two"):
            rings.open(event_id)
