"""UprobePerfLinks on the real kernel: a program armed on SDT sites by uprobe-PMU perf
events and BPF perf links, the way for kernels without uprobe_multi links.

The program counts its hits per attach cookie; the expected counts come from the
traced program's replies ("guarded 1": values:guarded fired, its semaphore up),
breakpoints and semaphores from the process's memory (/proc/PID/mem), sites from
readelf: never from sdtrace.  Each test probes a private copy of the fixture, so
that no other process (a concurrent session's) hits its sites.
"""
import errno
import os
import struct
import subprocess

import pytest
from helpers import (Target, address_of, counter, file_offset, private_copy, read_mem,
                     readelf_notes)

from sdtrace.engine.bpf import asm
from sdtrace.engine.bpf.codegen import map_call
from sdtrace.errors import BpfRefused
from sdtrace.kernel import bpf

pytestmark = pytest.mark.kernel

BREAKPOINT = b"\xcc"
ROUNDS = 5
# values:guarded fires only while its semaphore is up; values:nosem has none
PROBES = ("guarded", "nosem")
# wider than 32 bits: the whole u64 must reach bpf_get_attach_cookie()
COOKIES = (0x1_0000_0001, 0xfeed_0000_0000_0002)
COOKIE = struct.Struct("<Q")


def sites(path):
    """(offsets, ref_ctr_offsets) of PROBES in `path`, from readelf."""
    notes = {note.name: note for note in readelf_notes(path)}
    chosen = [notes[name] for name in PROBES]
    return ([file_offset(path, note.location) for note in chosen],
            [note.semaphore and file_offset(path, note.semaphore) for note in chosen])


def cookie_counter(counts, **load):
    """A program adding 1 to this CPU's count of its attach cookie in `counts`, a per-CPU
    hash of u64 cookies to u64 counts."""
    code = asm.Assembler()
    code.call("get_attach_cookie")              # R1 is still the context
    code.store(8, asm.R10, -8, asm.R0)
    map_call(code, "map_lookup_elem", counts.fd, -8)
    code.jump("jne", asm.R0, 0, "add")
    code.store(8, asm.R10, -16, 0)
    map_call(code, "map_update_elem", counts.fd, -8, -16)
    map_call(code, "map_lookup_elem", counts.fd, -8)
    code.jump("jeq", asm.R0, 0, "out")
    code.label("add")
    code.mov(asm.R1, 1)
    code.atomic_add(8, asm.R0, 0, asm.R1)
    code.label("out")
    code.mov(asm.R0, 0)
    code.exit()
    return bpf.Program(code.assemble(), "cookie_counter", **load)


def code_bytes(target, path, offsets):
    """The first byte of each site as process `target` sees it."""
    return [read_mem(target.pid, address_of(target.pid, path, offset, "r-xp"), 1)
            for offset in offsets]


@pytest.fixture
def values(fixtures, tmp_path):
    return private_copy(fixtures, "values", tmp_path)


@pytest.mark.parametrize("scope", ["pid", "every process"])
def test_each_site_counts_its_hits_under_its_cookie(values, scope):
    """Every hit runs the program once with its site's cookie, on whatever CPU it happens
    (the target runs on the last one, the event of every process is on CPU 0); while
    armed, the breakpoints are in and the semaphore is up, after close() neither."""
    offsets, semaphores = sites(values)
    guarded = semaphores[0]
    with Target(values) as target, bpf.Map.percpu_hash(8, 8, 16, "cookie_counts") as counts, \
            cookie_counter(counts) as program:
        os.sched_setaffinity(target.pid, {max(os.sched_getaffinity(0))})
        original = code_bytes(target, values, offsets)
        assert BREAKPOINT not in original and counter(target.pid, values, guarded) == 0
        with bpf.UprobePerfLinks(program, values, offsets, semaphores, COOKIES,
                                 pid=target.pid if scope == "pid" else 0) as links:
            assert code_bytes(target, values, offsets) == [BREAKPOINT] * len(offsets)
            assert counter(target.pid, values, guarded) == 1
            assert target.send(f"fire {ROUNDS}") == ["guarded 1"] * ROUNDS
        assert links.closed
        links.close()                                       # idempotent
        assert code_bytes(target, values, offsets) == original
        assert counter(target.pid, values, guarded) == 0
        assert target.send("fire 1") == ["guarded 0"]     # nosem hit, unarmed: not counted
        found = {COOKIE.unpack(key)[0]: sum(COOKIE.unpack_from(value, start)[0]
                                            for start in range(0, len(value), COOKIE.size))
                 for key, value in counts.items()}
    assert found == dict.fromkeys(COOKIES, ROUNDS)


def test_a_vanished_process_is_esrch(values):
    """As UprobeMultiLink: BpfRefused with ESRCH (the executor's NoSuchProcess), one line
    naming the site."""
    offsets, semaphores = sites(values)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with bpf.Map.percpu_hash(8, 8, 16, "cookie_counts") as counts, \
            cookie_counter(counts) as program, pytest.raises(BpfRefused) as caught:
        bpf.UprobePerfLinks(program, values, offsets, semaphores, COOKIES, pid=gone.pid)
    assert caught.value.errno == errno.ESRCH
    message = str(caught.value)
    assert "\n" not in message
    assert f"uprobe {values}:{offsets[0]:#x}, pid {gone.pid}" in message


@pytest.mark.parametrize("refusal", ["offset outside the file", "uprobe_multi program"])
def test_a_refused_site_leaves_none_armed(values, refusal):
    """A refusal after some sites are armed disarms them: breakpoints out, semaphore
    down.  The perf path takes kprobe programs without the uprobe_multi attach type:
    the kernel refuses to attach those to a perf event."""
    offsets, semaphores = sites(values)
    load = {}
    if refusal == "offset outside the file":
        offsets[1] = os.path.getsize(values) + 0x1000
    else:
        load = dict(expected_attach_type=bpf.BPF_TRACE_UPROBE_MULTI)
    with Target(values) as target, bpf.Map.percpu_hash(8, 8, 16, "cookie_counts") as counts, \
            cookie_counter(counts, **load) as program:
        original = code_bytes(target, values, offsets[:1])
        with pytest.raises(BpfRefused) as caught:
            bpf.UprobePerfLinks(program, values, offsets, semaphores, COOKIES)
        assert caught.value.errno == errno.EINVAL
        assert "\n" not in str(caught.value)
        if refusal == "offset outside the file":
            assert f"uprobe {values}:{offsets[1]:#x}" in str(caught.value)
        assert code_bytes(target, values, offsets[:1]) == original
        assert counter(target.pid, values, semaphores[0]) == 0
        assert target.send("fire 1") == ["guarded 0"]


def test_one_ref_ctr_offset_and_cookie_per_site(values):
    offsets, semaphores = sites(values)
    with bpf.Map.percpu_hash(8, 8, 16, "cookie_counts") as counts, \
            cookie_counter(counts) as program:
        for bad in (dict(ref_ctr_offsets=semaphores[:1]), dict(cookies=COOKIES * 2)):
            with pytest.raises(ValueError, match="values for 2 offsets"):
                bpf.UprobePerfLinks(program, values, offsets, **bad)
