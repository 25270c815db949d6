"""The BPF executor on the real kernel: generated programs, one uprobe_multi link per file.

Expected values come from the traced programs themselves (the fixtures print
the truth) or from the process's memory (/proc/PID/mem), never from sdtrace.
"""
import errno
import json
import logging
import os
import struct
import subprocess
import sys
from collections import Counter

import pytest
from helpers import (CFLAGS, FIXTURES_DIR, LIBJVM, OPT_LEVELS, PROGRAMS, REPOSITORY, Target,
                     address_of, drain, executor_events, counter, read_mem, set_counter, wait_for)

from sdtrace.discovery import notes
from sdtrace.engine import fetchargs
from sdtrace.engine.bpf import asm, codegen
from sdtrace.engine.bpf.executor import BpfExecutor
from sdtrace.engine.bpf.ringbuf import RingBuffer
from sdtrace.errors import BpfRefused, SdtraceError
from sdtrace.kernel import bpf

pytestmark = pytest.mark.kernel

BREAKPOINT = b"\xcc"
STRINGS = {"values:strings": ("str", "str"), "addressing:strings": ("str", "str", "str")}


def sites_and_types(path):
    sites = notes.read_probes(path)
    return sites, [STRINGS.get(site.qualified_name, ()) for site in sites]


def fire_and_read(target, executor, expected):
    """Fires every probe of `target` once; the `expected` records, and the truth by probe."""
    target.send("fire 1")
    records = drain(executor, expected)
    truth = {line["probe"]: line["args"] for line in map(json.loads, target.send("values"))}
    return records, truth


CONFORMANCE_LEVELS = ("O0", "O1", "O2", "O3", "Os")


@pytest.fixture(scope="module")
def conformance(fixtures, tmp_path_factory):
    """(name, level) -> the fixture program built at that level: the suite's own builds
    at -O0 and -O2, the others compiled here (gcc moves operands around at each)."""
    directory = tmp_path_factory.mktemp("levels")
    paths = {}
    for level in CONFORMANCE_LEVELS:
        for name in ("values", "addressing"):
            if level in OPT_LEVELS:
                paths[name, level] = fixtures.path(name, level)
                continue
            sources, flags = PROGRAMS[name]
            output = str(directory / f"{name}-{level}")
            subprocess.run(["gcc", f"-{level}", *CFLAGS, "-o", output,
                            *(os.path.join(FIXTURES_DIR, source) for source in sources), *flags],
                           check=True)
            paths[name, level] = output
    return paths


@pytest.mark.parametrize("level", CONFORMANCE_LEVELS)
@pytest.mark.parametrize("name", ["values", "addressing"])
def test_every_argument_decodes_to_the_truth(conformance, level, name):
    """All sites of a file on one link, at every optimisation level: each record's arguments
    are what the program printed, the operands the tracefs executor cannot fetch
    (base+index*scale) included."""
    path = conformance[name, level]
    sites, types = sites_and_types(path)
    with Target(path) as target, BpfExecutor(sites, types, pid=target.pid) as executor:
        assert executor.warnings == []
        records, truth = fire_and_read(target, executor, len(sites))
        assert executor.lost == 0
    assert [record.probe for record in records] == list(truth)
    for record in records:
        probe = record.probe
        expected = truth[probe]
        if probe == "addressing:strings":      # cut at the default 64 bytes, exactly
            assert [len(text) for text in expected] == [5, 75, 64]
            expected = [text[:codegen.DEFAULT_STRING_LENGTH] for text in expected]
            assert record.truncated == [1], record
        else:
            assert record.truncated == []
        assert record.args == expected, probe
        assert (record.pid, record.tid) == (target.pid, target.pid)
        assert path.endswith(record.comm)             # the comm: the file name, cut at 15
    if name == "addressing":
        sib = [site for site in sites if site.name == "sib"][0]
        assert all(plan.unavailable for plan in fetchargs.plan_probe(sib))


JAVA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(LIBJVM))), "bin", "java")


@pytest.mark.skipif(not os.path.exists(JAVA), reason="OpenJDK 17 is not installed")
def test_hotspot_strings_are_read_by_their_length():
    """HotSpot's strings are (pointer, length), unterminated: a JVM's class__loaded names
    are the classes the JVM itself logs, cut at the 40 bytes asked for and marked so, with
    the length kept.  The pid filter is a shell's that then execs java: the link follows
    the process into its new image."""
    sites = [site for site in notes.read_probes(LIBJVM) if site.name == "class__loaded"]
    shell = subprocess.Popen(["sh", "-c", f"read armed; exec {JAVA} -Xlog:class+load -version"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        with BpfExecutor(sites, pid=shell.pid, string_length=40) as executor:
            output, _ = shell.communicate("armed\n", timeout=60)
            records = executor_events(executor)
            assert executor.lost == 0 and executor.warnings == []
    finally:
        shell.kill()
        shell.wait()
    logged = [line.split()[1].replace(".", "/") for line in output.splitlines()
              if "[class,load]" in line]
    assert len(logged) > 300
    assert Counter(record.args[0] for record in records) == Counter(
        name[:40] for name in logged)
    for record in records:
        name, length = record.args[:2]
        assert record.truncated == ([0] if length > 40 else []), record
        assert len(name) == min(length, 40) and record.pid == shell.pid


def test_strings_are_cut_at_the_length_asked_for(fixtures):
    path = fixtures.path("addressing")
    sites, types = sites_and_types(path)
    with Target(path) as target, BpfExecutor(sites, types, pid=target.pid,
                                             string_length=5) as executor:
        records, truth = fire_and_read(target, executor, len(sites))
    [record] = [record for record in records if record.probe.endswith(":strings")]
    assert record.args == [text[:5] for text in truth["addressing:strings"]]
    assert record.truncated == [1, 2]       # "short" is exactly 5 bytes: not cut


def test_ip_at_the_hit_is_the_run_time_site_address(fixtures):
    """pt_regs->ip, as a uprobe_multi program sees it, is the site's address in the process:
    what rip-relative operands are computed from."""
    path = fixtures.path("values")
    sites = notes.read_probes(path)
    with bpf.Map.ringbuf(4096, "ip_test") as ring:
        code = asm.Assembler()
        code.mov(asm.R6, asm.R1)
        code.load_map(asm.R1, ring.fd)
        code.mov(asm.R2, 16)
        code.mov(asm.R3, 0)
        code.call("ringbuf_reserve")
        code.jump("jeq", asm.R0, 0, "out")
        code.mov(asm.R7, asm.R0)
        code.load(8, asm.R1, asm.R6, codegen.REGISTERS["x86_64"]["rip"])
        code.store(8, asm.R7, 0, asm.R1)
        code.mov(asm.R1, asm.R6)
        code.call("get_attach_cookie")
        code.store(8, asm.R7, 8, asm.R0)
        code.mov(asm.R1, asm.R7)
        code.mov(asm.R2, 0)
        code.call("ringbuf_submit")
        code.label("out")
        code.mov(asm.R0, 0)
        code.exit()
        with Target(path) as target, \
                bpf.Program(code.assemble(), "ip_test",
                            expected_attach_type=bpf.BPF_TRACE_UPROBE_MULTI) as program, \
                bpf.UprobeMultiLink(program, path, [site.offset for site in sites],
                                    [site.semaphore or 0 for site in sites],
                                    cookies=range(len(sites)), pid=target.pid):
            reader = RingBuffer(ring, key_offset=8, record_size=16)     # key: the cookie
            records = []
            try:
                target.send("fire 1")
                reader.walk(_Unpacked("<QQ"), records.append)
                seen = {cookie: ip for ip, cookie in records}
            finally:
                reader.close()
            assert sorted(seen) == list(range(len(sites)))
            for cookie, ip in seen.items():
                assert ip == address_of(target.pid, path, sites[cookie].offset, "r-xp")


class _Unpacked(dict):
    """RingBuffer.walk's parsers for records of one struct format, whatever their key."""

    def __init__(self, layout):
        super().__init__()
        self._parse = lambda data, position, append: append(
            struct.unpack_from(layout, data, position))

    def __missing__(self, key):
        return self._parse


def test_a_full_ring_counts_every_lost_record(fixtures):
    """Records the ring had no room for are counted, per CPU, exactly: written + lost = hits."""
    path = fixtures.path("values")
    sites, types = sites_and_types(path)
    rounds = 300
    with Target(path) as target, BpfExecutor(sites, types, pid=target.pid,
                                             ring_bytes=4096) as executor:
        target.send(f"fire {rounds}")
        written = len(executor_events(executor))
        lost = executor.lost
    assert written > 0 and lost > 0
    assert written + lost == rounds * len(sites)


def test_a_refused_program_is_one_line_naming_the_probe(fixtures, monkeypatch, caplog):
    """The verifier refuses reading past pt_regs: the error names the first site that reads
    %rdx (values:signed at -O2), the full verifier log goes to logging.debug."""
    monkeypatch.setitem(codegen.REGISTERS["x86_64"], "rdx", 4096)
    path = fixtures.path("values", "O2")
    sites, types = sites_and_types(path)
    signed = [site for site in sites if site.name == "signed"][0]
    with caplog.at_level(logging.DEBUG, logger="sdtrace"), \
            pytest.raises(SdtraceError) as caught:
        BpfExecutor(sites, types)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"BPF program for values:signed at {path}:{signed.offset:#x} "
                              "refused by the kernel: EACCES"), message
    assert "invalid bpf_context access off=4096" in message
    assert any("verifier log" in record.getMessage() and "processed" in record.getMessage()
               for record in caplog.records)


def test_an_unarmable_site_is_refused_before_anything_is_armed(fixtures):
    path = fixtures.path("values")
    [guarded] = [site for site in notes.read_probes(path) if site.name == "guarded"]
    broken = guarded._replace(semaphore=None, semaphore_error="a semaphore out of reach")
    with pytest.raises(SdtraceError, match=f"^{path}: values:guarded: unusable semaphore: "
                                           "a semaphore out of reach$"):
        BpfExecutor([broken])


def test_without_kernel_semaphores_user_space_counts_them(fixtures):
    """kernel_semaphores=False arms no ref_ctr_offsets (--semaphores=user): the counter stays
    at 0, so the guarded probe skips its site, until user space raises it."""
    path = fixtures.path("values")
    [guarded] = [site for site in notes.read_probes(path) if site.name == "guarded"]
    with Target(path) as target, BpfExecutor([guarded], pid=target.pid,
                                             kernel_semaphores=False) as executor:
        assert counter(target.pid, path, guarded.semaphore) == 0
        assert target.send("fire 1")[0] == "guarded 0"
        set_counter(target.pid, path, guarded.semaphore, 1)
        assert target.send("fire 1")[0] == "guarded 1"
        records = []
        assert wait_for(lambda: records.extend(executor_events(executor)) or records)
        set_counter(target.pid, path, guarded.semaphore, 0)
    assert [record.args for record in records] == [[42]]


def test_refused_calls_are_one_line_with_the_errno_name():
    with pytest.raises(BpfRefused) as caught:
        bpf.Program(asm.SLOT.pack(0x95, 0, 0, 0), "no_r0")
    assert str(caught.value) == ("bpf: loading program no_r0: EACCES (Permission denied): "
                                 "R0 !read_ok")
    assert caught.value.errno == 13 and "processed 1 insns" in caught.value.log
    with pytest.raises(BpfRefused, match=r"\Abpf: creating map odd: EINVAL \(Invalid argument\)"
                                         r"\Z"):
        bpf.Map.ringbuf(4095, "odd")


def test_map_lookup_update_delete():
    with bpf.Map.hash(4, 8, 2, "test_hash") as table:
        key = struct.pack("<I", 7)
        assert table.lookup(key) is None
        table.update(key, struct.pack("<Q", 42))
        assert table.lookup(key) == struct.pack("<Q", 42)
        with pytest.raises(BpfRefused, match="EEXIST"):
            table.update(key, bytes(8), bpf.BPF_NOEXIST)
        assert table.delete(key) and not table.delete(key)
    assert table.closed
    with bpf.Map.percpu_array(8, 1, "test_cpus") as array:
        assert array.lookup_per_cpu(bytes(4)) == [bytes(8)] * bpf.possible_cpus()


ARMED_TRACER = """
import sys
from sdtrace.discovery import notes
from sdtrace.engine.bpf.executor import BpfExecutor
executor = BpfExecutor(notes.read_probes({path!r}), pid={pid})
print("armed", flush=True)
sys.stdin.read()
"""


# what GET_FD_BY_ID takes for each kind of BPF object a tracer's fdinfo names
GET_FD_BY_ID = {"prog_id": 13, "map_id": 14, "link_id": 30}


def bpf_objects(pid):
    """(kind, id) of every BPF program, map and link process `pid` holds, from fdinfo."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if "bpf" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
            continue
        with open(f"/proc/{pid}/fdinfo/{fd}") as fdinfo:
            for line in fdinfo:
                kind, _, value = line.partition(":")
                if kind in GET_FD_BY_ID:
                    found.add((kind, int(value)))
    return found


def exists(kind, object_id):
    """Whether the kernel still has BPF object `object_id` (it is opened and closed)."""
    try:
        os.close(bpf.bpf(GET_FD_BY_ID[kind], struct.pack("<III", object_id, 0, 0), "probing"))
    except BpfRefused as refused:
        assert refused.errno == errno.ENOENT, refused
        return False
    return True


def test_sigkilled_tracer_leaves_no_breakpoint_and_no_semaphore(fixtures):
    """The fds are the only owners: a SIGKILLed tracer leaves the process as it found it,
    and no program, map or link of its behind."""
    path = fixtures.path("values")
    [guarded] = [site for site in notes.read_probes(path) if site.name == "guarded"]
    with Target(path) as target:
        site = address_of(target.pid, path, guarded.offset, "r-xp")
        original = read_mem(target.pid, site, 1)
        tracer = subprocess.Popen(
            [sys.executable, "-c", ARMED_TRACER.format(path=path, pid=target.pid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=REPOSITORY))
        try:
            assert tracer.stdout.readline() == "armed\n"
            assert read_mem(target.pid, site, 1) == BREAKPOINT
            assert counter(target.pid, path, guarded.semaphore) == 1
            assert target.send("fire 1")[0] == "guarded 1"
            objects = bpf_objects(tracer.pid)
            assert {kind for kind, _id in objects} == set(GET_FD_BY_ID)
            assert all(exists(*found) for found in objects)
            tracer.kill()
            assert wait_for(lambda: read_mem(target.pid, site, 1) == original
                            and counter(target.pid, path, guarded.semaphore) == 0)
            assert target.send("fire 1")[0] == "guarded 0"
            assert wait_for(lambda: not any(exists(*found) for found in objects))
        finally:
            tracer.kill()
            tracer.wait()


@pytest.mark.parametrize("scope", ["pid", "every process"])
def test_perf_links_arm_the_sites_where_uprobe_multi_is_missing(fixtures, scope):
    """links="perf" (what a kernel without uprobe_multi links gets): one uprobe-PMU event
    and BPF perf link per site, its cookie the site id; every hit recorded once, the
    semaphore raised while armed and lowered after, by pid or for every process."""
    path = fixtures.path("values")
    sites, types = sites_and_types(path)
    with Target(path) as target:
        with BpfExecutor(sites, types, pid=target.pid if scope == "pid" else 0,
                         links="perf") as executor:
            assert executor.links == "perf"
            guarded = [site for site in sites if site.semaphore]
            assert guarded and all(counter(target.pid, path, site.semaphore) >= 1
                                   for site in guarded)
            records, truth = fire_and_read(target, executor, len(sites))
            assert executor.lost == 0
        assert all(counter(target.pid, path, site.semaphore) == 0 for site in guarded)
    mine = [record for record in records if record.pid == target.pid]
    assert sorted(record.probe for record in mine) == sorted(truth)
    for record in mine:
        assert record.args == truth[record.probe], record.probe
