"""events.py's generated parsers against the generic path, on real samples.

The samples come from the kernel: the `values` fixture fires every argument
type once, helpers.SDT_PROGRAM a NULL string.  Their ring bytes
(Ring.take) are parsed twice: by the generic path, which is independent of
the generated code (perf.SAMPLES, EventFormat.decode, then the fetch plans
applied one by one by assemble() below), and by the generated parsers of
each emitter.  The records must be equal, and the JSON and human lines must
say what the records say.
"""
import json
import platform
import time

import pytest
from helpers import Target, add_demo_hit

from sdtrace.engine import events
from sdtrace.engine.fetchargs import ArgumentPlan
from sdtrace.engine.session import Session
from sdtrace.errors import SdtraceError
from sdtrace.kernel import perf, tracefs
from sdtrace.present import output

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(platform.machine() != "x86_64",
                                 reason="the fixtures' fetch arguments are x86-64's")]


def take_samples(rings, timeout=10.0):
    """The ring bytes holding every sample of the hits so far, chunk by chunk."""
    count = rings.hit_count()
    chunks, seen = [], []
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        rings.wait(0.05)
        for ring in rings.rings.values():
            data = ring.take()
            if data:
                chunks.append(data)
                perf.walk(data, perf.SAMPLES, seen.append)
    assert len(seen) == count
    return chunks


def parse(chunks, parsers):
    items = []
    for data in chunks:
        lost, _ = perf.walk(data, parsers, items.append)
        assert lost == 0
    return sorted(items, key=lambda item: item[0])


def assemble(plans, fetched):
    """The reference: each argument from its plan, one by one (fetched, converted or constant)."""
    values = iter(fetched)
    return [((plan.convert or (lambda value: value))(next(values))) if plan.fetched
            else plan.constant for plan in plans]


def generic_records(chunks, decoder):
    """(ts, pid, tid, cpu, comm, site, args) by the generic path."""
    records = []
    for ts, sample_id, pid, tid, cpu, raw in parse(chunks, perf.SAMPLES):
        site, event_format = decoder.sites[sample_id]
        comm, *fetched = event_format.decode(raw)
        records.append((ts, pid, tid, cpu, comm, site, assemble(site.plans, fetched)))
    return records


def human(value):
    return "?" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def check_every_emitter(chunks, decoder):
    """The generated parsers of every emitter agree with the generic records; returns them."""
    expected = generic_records(chunks, decoder)
    assert parse(chunks, decoder.parsers()) == expected
    json_lines = parse(chunks, decoder.parsers(output.LineEmitter(True)))
    human_lines = parse(chunks, decoder.parsers(output.LineEmitter(False)))
    assert len(json_lines) == len(human_lines) == len(expected)
    for record, json_line, human_line in zip(expected, json_lines, human_lines):
        ts, pid, tid, cpu, comm, site, args = record
        assert json_line[:2] == human_line[:2] == (ts, site.probe)
        assert json_line[2].endswith("\n") and json_line[2].count("\n") == 1
        assert json.loads(json_line[2]) == {
            "ts": ts, "pid": pid, "tid": tid, "cpu": cpu, "comm": comm, "probe": site.probe,
            "file": site.file, "args": args}
        assert human_line[2] == (f"{comm:>16} {pid:>7}/{tid:<7} [{cpu:03d}] "
                                 f"{ts // 10**9}.{ts % 10**9 // 1000:06d}: {site.probe}: "
                                 + " ".join(map(human, args)) + "\n")
    return expected


def test_values_of_every_type_decode_alike_on_both_paths(fixtures, opt):
    program_path = fixtures.path("values", opt)
    with Target(program_path) as target, \
            Session(["values:strings(str,str)", "values:*"], pid=target.pid,
                    executor="tracefs") as session:
        target.send("fire 1")
        truth = {record["probe"]: record["args"] for record in
                 (json.loads(line) for line in target.send("values"))}
        records = check_every_emitter(take_samples(session._executor._rings),
                                      session._executor._decoder)
    assert sorted(record[5].probe for record in records) == sorted(truth)
    for _ts, pid, tid, _cpu, comm, site, args in records:
        assert (pid, tid, comm) == (target.pid, target.pid, "values")
        assert args == [None if plan.unavailable else want
                        for plan, want in zip(site.plans, truth[site.probe])], site.probe
    assert {tuple(record[6]) for record in records if record[5].probe == "values:strings"} == {
        ("hello world", "")}


def test_null_string_is_absent_on_both_paths(program, group):  # noqa: F811
    add_demo_hit(program, group, fetchargs=(events.COMM_FETCH, *program.fetchargs))
    event_format = tracefs.event_format(group, "hit")
    site = events.ArmedSite("demo", "hit", program.path, "hit",
                             tuple(ArgumentPlan(fetch=fetch.split("=", 1)[1])
                                   for fetch in program.fetchargs))
    decoder = events.Decoder()
    with Target(program.path, "NULL") as target, perf.RingSet() as rings:
        decoder.add(rings.open(tracefs.event_id(group, "hit")), site, event_format)
        rings.enable()
        target.send("fire 3")
        records = check_every_emitter(take_samples(rings), decoder)
    assert [record[6] for record in records] == [[0, None], [1, None], [2, None]]


def test_a_format_without_comm_first_is_refused(program, group):  # noqa: F811
    add_demo_hit(program, group)
    site = events.ArmedSite("demo", "hit", program.path, "hit", ())
    with pytest.raises(SdtraceError, match="comm"):
        events.Decoder().add([1], site, tracefs.event_format(group, "hit"))
