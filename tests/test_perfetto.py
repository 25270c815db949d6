"""Timeline export (`--perfetto FILE`) of real processes, checked against the trace-event format.

`validate` checks a file the way the Trace Event Format document describes
it (the JSON Object Format, with the X, i and M phases sdtrace writes), and
that the slices of every thread nest, as the viewers require.  Every slice
is then checked against the events of the same run, written by `sdtrace
trace --json` alongside: its ts is a START hit's time, ts + dur an END hit's
time on the same thread, exactly (timestamps are read as decimals).
"""
import collections
import decimal
import json
import os

import pytest
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import latency_workload_timeline, sdtrace, trace_workload_timeline

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS = """
def tick(x):
    return x + 1
def tock(x):
    return tick(x) * 2
for i in range(3):
    tock(i)
"""
PHASES = {"X", "i", "M"}
INSTANT_SCOPES = {"g", "p", "t"}
METADATA_NAMES = {"process_name", "thread_name"}


def nanoseconds(microseconds):
    value = microseconds * 1000
    assert value == value.to_integral_value(), microseconds
    return int(value)


def validate(path):
    """The trace's events, after checking the file against the trace-event format."""
    with open(path) as timeline:
        trace = json.load(timeline, parse_float=decimal.Decimal)
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    assert trace.get("displayTimeUnit", "ms") in ("ms", "ns")
    slices = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        assert event["ph"] in PHASES, event
        assert isinstance(event["name"], str) and event["name"], event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int), event
        assert isinstance(event.get("args", {}), dict), event
        if event["ph"] == "M":
            assert event["name"] in METADATA_NAMES and isinstance(event["args"]["name"], str)
            continue
        assert isinstance(event["ts"], (int, decimal.Decimal)) and event["ts"] >= 0, event
        assert isinstance(event.get("cat", ""), str), event
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, decimal.Decimal)) and event["dur"] >= 0, event
            slices[(event["pid"], event["tid"])].append(
                (nanoseconds(event["ts"]), nanoseconds(event["ts"] + event["dur"])))
        else:
            assert event["s"] in INSTANT_SCOPES, event
    for thread, spans in slices.items():      # complete events of a thread must nest
        open_ends = []
        for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], (thread, start, end)
            open_ends.append(end)
    return trace["traceEvents"]


def by_phase(events, phase):
    return [event for event in events if event["ph"] == phase]


def check_slices_against_events(slices, events, start_probe, end_probe):
    """Every slice spans a START hit to an END hit of its thread, exactly."""
    hits = {(event["tid"], event["ts"]): event["probe"] for event in events}
    for slice_event in slices:
        start = nanoseconds(slice_event["ts"])
        end = start + nanoseconds(slice_event["dur"])
        assert hits.get((slice_event["tid"], start)) == start_probe, slice_event
        assert hits.get((slice_event["tid"], end)) == end_probe, slice_event


def thread_names(timeline):
    return {(event["pid"], event["tid"]): event["args"]["name"]
            for event in by_phase(timeline, "M") if event["name"] == "thread_name"}


def test_trace_timeline_pairs_and_instants(fixtures, tmp_path):
    timeline_path, events_path = tmp_path / "trace.json", tmp_path / "events.json"
    result = trace_workload_timeline(fixtures, timeline_path, events_path)
    timeline = validate(timeline_path)
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    pairs = [line.split() for line in result.stdout.splitlines() if line.startswith("pair ")]
    slices = by_phase(timeline, "X")
    assert len(slices) == len(pairs) == 1 + 2 + 4
    check_slices_against_events(slices, events, "workload:start", "workload:end")
    assert collections.Counter(event["tid"] for event in slices) == \
        collections.Counter(int(tid) for _pair, tid, _ns in pairs)
    instants = by_phase(timeline, "i")
    assert [nanoseconds(event["ts"]) for event in instants] == \
        [event["ts"] for event in events if event["probe"] == "workload:request"]
    assert all(event["name"] == "workload:request" for event in instants)
    assert set(thread_names(timeline)) == {(event["pid"], event["tid"]) for event in events}
    assert set(thread_names(timeline).values()) == {"workload"}


def test_latency_timeline_is_named_by_the_matched_key(fixtures, tmp_path):
    timeline_path = tmp_path / "latency.json"
    result = latency_workload_timeline(fixtures, timeline_path)
    slices = by_phase(validate(timeline_path), "X")
    measured = [int(ns) for line in result.stdout.splitlines() if line.startswith("pair ")
                for ns in line.split()[2:]]
    assert collections.Counter(event["name"] for event in slices) == {"1": 3, "2": 3}
    # each slice lies within the fixture's own measurement around its pair
    durations = sorted(nanoseconds(event["dur"]) for event in slices)
    assert all(duration <= bound for duration, bound in zip(durations, sorted(measured)))
    assert by_phase(validate(timeline_path), "i") == []


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_python_functions_become_slices_named_by_function(tmp_path):
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    timeline_path, events_path = tmp_path / "trace.json", tmp_path / "events.json"
    result = sdtrace("trace", "--json", "-o", str(events_path), "--perfetto", str(timeline_path),
                     "--buffer-pages", "4096", "--string-size", "256", "-c", f"{PYTHON} {script}",
                     "python:function__entry", "python:function__return", "python:line")
    assert result.returncode == 0, result.stderr
    timeline = validate(timeline_path)
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    mine = [event for event in by_phase(timeline, "X")
            if event["args"]["start"]["filename"] == str(script)]
    assert collections.Counter(event["name"] for event in mine) == \
        {"<module>": 1, "tock": 3, "tick": 3}
    check_slices_against_events(by_phase(timeline, "X"), events, "python:function__entry",
                                "python:function__return")
    assert all(event["name"] == "python:line" for event in by_phase(timeline, "i"))
