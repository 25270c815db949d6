"""The native timeline (`--perfetto FILE.pftrace`), read back with Perfetto's own definitions.

Every file is parsed with the protobuf runtime and the trace definitions the
`perfetto` package ships (perfetto_trace_pb2), never with sdtrace's encoder;
`imported` then puts it together the way Perfetto's trace processor imports
a TrackEvent trace (its binary, which the package downloads at run time,
cannot be had here): the first packet clears the sequence's incremental
state and makes CLOCK_MONOTONIC the trace clock, every track is described
before its first event, the events are sorted by time (ties keep the file's
order) and each END closes the innermost open slice of its track.

The root-free tests check the encoder byte for byte against protobuf's own
serializer, its table against the real descriptors, and the lanes with
generated slices.  The kernel tests trace real processes: each slice of the
native file, its thread and its times, equals the JSON timeline's that the
same records make (the records of the run's `--json` events, replayed
through the JSON writer).
"""
import collections
import decimal
import json
import subprocess
import types

import pytest
from google.protobuf.descriptor import FieldDescriptor
from helpers import latency_workload_timeline, sdtrace, trace_workload_timeline
from hypothesis import given
from hypothesis import strategies as st
from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

from sdtrace.engine.events import ArmedSite
from sdtrace.present import perfetto
from sdtrace.present import perfetto_proto as proto

Slice = collections.namedtuple("Slice", "pid tid name start end track")
Instant = collections.namedtuple("Instant", "pid tid name ts")
KINDS = {proto.UINT: {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                      FieldDescriptor.TYPE_ENUM},
         proto.INT: {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64},
         proto.BOOL: {FieldDescriptor.TYPE_BOOL}, proto.DOUBLE: {FieldDescriptor.TYPE_DOUBLE},
         proto.STRING: {FieldDescriptor.TYPE_STRING}}
DESCRIPTORS = {"Clock": pb.ClockSnapshot.Clock.DESCRIPTOR}
SITE = ArmedSite("demo", "span__start", "/demo", "", ())
END_SITE = ArmedSite("demo", "span__end", "/demo", "", ())
HIT_SITE = ArmedSite("demo", "hit", "/demo", "", ())
OVERLAP_PROGRAM = r"""
#include <sys/sdt.h>
int main(void)
{
    for (int i = 0; i < 3; i++) {
        STAP_PROBE1(overlap, a__start, i);
        STAP_PROBE1(overlap, b__start, i);
        STAP_PROBE1(overlap, a__end, i);
        STAP_PROBE1(overlap, b__end, i);
    }
    return 0;
}
"""


def imported(path):
    """(slices, instants, tracks by uuid) of a native trace, imported as trace processor does."""
    packets = list(pb.Trace.FromString(path.read_bytes()).packet)
    first = packets[0]
    assert first.sequence_flags & pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    assert first.clock_snapshot.primary_trace_clock == pb.BUILTIN_CLOCK_MONOTONIC
    assert {clock.clock_id for clock in first.clock_snapshot.clocks} == \
        {pb.BUILTIN_CLOCK_MONOTONIC, pb.BUILTIN_CLOCK_BOOTTIME}
    assert {packet.trusted_packet_sequence_id for packet in packets} == {1}
    tracks, events = {}, []
    for packet in packets[1:]:
        if packet.HasField("track_descriptor"):
            descriptor = packet.track_descriptor
            assert descriptor.uuid not in tracks
            assert not descriptor.parent_uuid or descriptor.parent_uuid in tracks
            tracks[descriptor.uuid] = descriptor
        else:
            assert packet.timestamp_clock_id == pb.BUILTIN_CLOCK_MONOTONIC
            assert packet.track_event.track_uuid in tracks      # described before its events
            events.append(packet)
    open_slices, slices, instants = collections.defaultdict(list), [], []
    for packet in sorted(events, key=lambda packet: packet.timestamp):    # a stable sort
        event = packet.track_event
        thread = _thread(tracks, event.track_uuid)
        if event.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            open_slices[event.track_uuid].append(packet)
        elif event.type == pb.TrackEvent.TYPE_SLICE_END:
            begin = open_slices[event.track_uuid].pop()
            slices.append(Slice(thread.pid, thread.tid, begin.track_event.name,
                                begin.timestamp, packet.timestamp, event.track_uuid))
        else:
            assert event.type == pb.TrackEvent.TYPE_INSTANT
            instants.append(Instant(thread.pid, thread.tid, event.name, packet.timestamp))
    assert not any(open_slices.values())
    return slices, instants, tracks


def _thread(tracks, uuid):
    """The ThreadDescriptor of a thread's track or of one of its lanes."""
    descriptor = tracks[uuid]
    if descriptor.HasField("thread"):
        assert tracks[descriptor.parent_uuid].process.pid == descriptor.thread.pid
        return descriptor.thread
    assert descriptor.name == perfetto.OVERLAP_LANE
    assert tracks[descriptor.parent_uuid].HasField("thread")
    return tracks[descriptor.parent_uuid].thread


def lanes_used(slices, tracks):
    return {slice_.track for slice_ in slices if not tracks[slice_.track].HasField("thread")}


# root-free: the encoder against protobuf's own serializer and definitions

def test_the_message_table_agrees_with_perfettos_definitions():
    for message, fields in proto.MESSAGES.items():
        descriptor = DESCRIPTORS.get(message) or getattr(pb, message).DESCRIPTOR
        for field, (number, kind) in fields.items():
            real = descriptor.fields_by_name[field]
            assert real.number == number, (message, field)
            if kind in proto.MESSAGES:
                assert real.message_type.name == kind, (message, field)
            else:
                assert real.type in KINDS[kind], (message, field)
    assert proto.SEQ_INCREMENTAL_STATE_CLEARED == pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    assert (proto.BUILTIN_CLOCK_MONOTONIC, proto.BUILTIN_CLOCK_BOOTTIME) == \
        (pb.BUILTIN_CLOCK_MONOTONIC, pb.BUILTIN_CLOCK_BOOTTIME)
    assert (proto.TYPE_SLICE_BEGIN, proto.TYPE_SLICE_END, proto.TYPE_INSTANT) == \
        (pb.TrackEvent.TYPE_SLICE_BEGIN, pb.TrackEvent.TYPE_SLICE_END, pb.TrackEvent.TYPE_INSTANT)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=-2**63,
                                                                   max_value=2**63 - 1))
def test_varints_are_protobufs_bytes(unsigned, signed):
    for fields in ({"uint_value": unsigned}, {"int_value": signed}):   # one value at a time
        encoded = proto.encode("DebugAnnotation", fields)
        assert encoded == pb.DebugAnnotation(**fields).SerializeToString()
        assert pb.DebugAnnotation.FromString(encoded) == pb.DebugAnnotation(**fields)


@pytest.mark.parametrize("value", [-2**63 - 1, 2**64])
def test_a_varint_refuses_what_64_bits_cannot_hold(value):
    with pytest.raises(ValueError):
        proto.varint(value)


values = st.one_of(st.just({}), st.builds(lambda text: {"string_value": text}, st.text()),
                   st.builds(lambda real: {"double_value": real}, st.floats(allow_nan=False)),
                   st.builds(lambda truth: {"bool_value": truth}, st.booleans()),
                   st.builds(lambda number: {"int_value": number},
                             st.integers(-2**63, 2**63 - 1)))
annotations = st.recursive(
    st.builds(lambda name, value: {"name": name, **value}, st.text(), values),
    lambda children: st.builds(lambda name, entries: {"name": name, "dict_entries": entries},
                               st.text(), st.lists(children, min_size=1, max_size=3)),
    max_leaves=8)


@given(st.fixed_dictionaries({
    "type": st.sampled_from([1, 2, 3]), "track_uuid": st.integers(0, 2**64 - 1),
    "name": st.text(), "categories": st.lists(st.text(), max_size=3),
    "debug_annotations": st.lists(annotations, max_size=3)}), st.integers(0, 2**64 - 1))
def test_packets_parse_back_to_their_fields(event, timestamp):
    trace = pb.Trace.FromString(proto.packet({"timestamp": timestamp, "track_event": event}) * 2)
    assert len(trace.packet) == 2 and trace.packet[1].timestamp == timestamp
    parsed = trace.packet[1].track_event
    assert (parsed.type, parsed.track_uuid, parsed.name, list(parsed.categories)) == \
        (event["type"], event["track_uuid"], event["name"], event["categories"])
    assert [_as_dict(annotation) for annotation in parsed.debug_annotations] == \
        event["debug_annotations"]


def _as_dict(annotation):
    return {field.name: ([_as_dict(entry) for entry in value] if field.name == "dict_entries"
                         else value)
            for field, value in annotation.ListFields()}


def test_the_file_name_picks_the_format(tmp_path):
    for name, writer in (("t.pftrace", perfetto.ProtoTimelineWriter),
                         ("t.PERFETTO-TRACE", perfetto.ProtoTimelineWriter),
                         ("t.json", perfetto.JsonTimelineWriter),
                         ("t", perfetto.JsonTimelineWriter)):
        timeline = perfetto.timeline_writer(tmp_path / name)
        timeline.close()
        assert type(timeline) is writer


def record(ts, tid=7, site=SITE, args=(1,)):
    return (ts, 5, tid, 0, "demo", site, list(args))


spans = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=40)


@pytest.mark.parametrize("memory", [perfetto.LANE_MEMORY, 2])
@given(spans=spans)
def test_slices_come_back_whole_whatever_their_overlaps(tmp_path_factory, memory, spans):
    """Slices given at their ends, in time order, come back as they were, each on a track
    of its thread: those that nest on the thread's own, the others on its lanes."""
    given_slices = sorted(((start, start + length) for start, length in spans),
                          key=lambda span: span[1])
    path = tmp_path_factory.mktemp("lanes") / "t.pftrace"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perfetto, "LANE_MEMORY", memory)
        timeline = perfetto.ProtoTimelineWriter(path)
        for index, (start, end) in enumerate(given_slices):
            timeline.slice(f"s{index}", record(start), record(end, site=END_SITE), "demo")
        timeline.instant(record(30))
        timeline.close()
    slices, instants, tracks = imported(path)
    assert sorted((s.name, s.start, s.end) for s in slices) == \
        sorted((f"s{index}", start, end) for index, (start, end) in enumerate(given_slices))
    assert {(s.pid, s.tid) for s in slices} <= {(5, 7)}
    assert instants == [Instant(5, 7, "demo:span__start", 30)]
    if all(a_end <= b_start or b_start < a_start and a_end <= b_end
           for index, (a_start, a_end) in enumerate(given_slices)
           for b_start, b_end in given_slices[index + 1:]):
        assert not lanes_used(slices, tracks) or memory < perfetto.LANE_MEMORY


def test_arguments_become_debug_annotations(tmp_path):
    path = tmp_path / "t.pftrace"
    timeline = perfetto.ProtoTimelineWriter(path)
    timeline.slice("one", record(10, args=(2**64 - 1,)), record(20, site=END_SITE,
                                                             args=(-3,)), "demo")
    timeline.instant(record(15, site=HIT_SITE, args=("text", None, 1.5, True)))
    timeline.close()
    begin, end, instant = [packet.track_event for packet
                           in pb.Trace.FromString(path.read_bytes()).packet
                           if packet.HasField("track_event")]     # in the order written
    assert begin.debug_annotations[0].name == "start"
    assert begin.debug_annotations[0].dict_entries[0].uint_value == 2**64 - 1
    assert end.debug_annotations[0].name == "end"
    assert end.debug_annotations[0].dict_entries[0].int_value == -3
    assert [(entry.name, entry.WhichOneof("value")) for entry in instant.debug_annotations] \
        == [("arg0", "string_value"), ("arg1", None), ("arg2", "double_value"),
            ("arg3", "bool_value")]


# kernel: real traces, both formats from the same records

def replayed_json_timeline(events_path, tmp_path):
    """The JSON timeline's slices and instants from the records of `sdtrace trace --json`
    events, replayed through TraceTimeline as the trace loop hands them over."""
    sites, records = {}, []
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        provider, _, name = event["probe"].partition(":")
        site = sites.setdefault(event["probe"], ArmedSite(provider, name, event["file"], "", ()))
        records.append((event["ts"], event["pid"], event["tid"], event["cpu"], event["comm"],
                        site, event["args"]))
    path = tmp_path / "replayed.json"
    timeline = perfetto.TraceTimeline(path, types.SimpleNamespace(sites=list(sites.values())),
                                      None)
    timeline.add([(None, None, None, one) for one in records])
    timeline.close()
    trace = json.loads(path.read_text(), parse_float=decimal.Decimal)["traceEvents"]
    threads = {event["tid"]: event["pid"] for event in trace if event["ph"] == "M"}
    slices = sorted((event["pid"], event["tid"], event["name"], _ns(event["ts"]),
                     _ns(event["ts"]) + _ns(event["dur"]))
                    for event in trace if event["ph"] == "X")
    instants = sorted(Instant(event["pid"], event["tid"], event["name"], _ns(event["ts"]))
                      for event in trace if event["ph"] == "i")
    return slices, instants, threads


def _ns(microseconds):
    return int(microseconds * 1000)


def native_and_json(path, events_path, tmp_path):
    slices, instants, tracks = imported(path)
    json_slices, json_instants, json_threads = replayed_json_timeline(events_path, tmp_path)
    assert sorted(s[:5] for s in slices) == json_slices
    assert sorted(instants) == json_instants
    named = {descriptor.thread.tid: (descriptor.thread.pid, descriptor.thread.thread_name)
             for descriptor in tracks.values() if descriptor.HasField("thread")}
    assert {tid: pid for tid, (pid, _name) in named.items()} == \
        {tid: pid for tid, pid in json_threads.items() if tid in named}
    return slices, instants, tracks


@pytest.mark.kernel
@pytest.mark.usefixtures("executor")
def test_trace_writes_the_json_timelines_slices_natively(fixtures, tmp_path):
    path, events_path = tmp_path / "trace.pftrace", tmp_path / "events.json"
    result = trace_workload_timeline(fixtures, path, events_path)
    slices, instants, tracks = native_and_json(path, events_path, tmp_path)
    pairs = [line.split() for line in result.stdout.splitlines() if line.startswith("pair ")]
    assert len(slices) == len(pairs) == 1 + 2 + 4
    assert collections.Counter(s.tid for s in slices) == \
        collections.Counter(int(tid) for _pair, tid, _ns in pairs)
    assert len(instants) == 5 and not lanes_used(slices, tracks)
    assert {descriptor.thread.thread_name for descriptor in tracks.values()
            if descriptor.HasField("thread")} == {"workload"}


@pytest.mark.kernel
@pytest.mark.usefixtures("executor")
def test_overlapping_spans_of_one_thread_go_on_a_lane(tmp_path):
    source, program = tmp_path / "overlap.c", tmp_path / "overlap"
    source.write_text(OVERLAP_PROGRAM)
    subprocess.run(["gcc", "-O2", "-o", str(program), str(source)], check=True)
    path, events_path = tmp_path / "trace.pftrace", tmp_path / "events.json"
    result = sdtrace("trace", "--json", "-o", str(events_path), "--perfetto", str(path),
                     "-c", str(program), "overlap:*")
    assert result.returncode == 0, result.stderr
    slices, _instants, tracks = native_and_json(path, events_path, tmp_path)
    assert collections.Counter(s.name for s in slices) == {"overlap:a": 3, "overlap:b": 3}
    assert {tracks[s.track].HasField("thread") for s in slices if s.name == "overlap:a"} == {True}
    assert {s.track for s in slices if s.name == "overlap:b"} == lanes_used(slices, tracks)
    assert len(lanes_used(slices, tracks)) == 1


@pytest.mark.kernel
@pytest.mark.usefixtures("executor")
def test_latency_writes_its_pairs_natively(fixtures, tmp_path):
    path = tmp_path / "latency.pftrace"
    result = latency_workload_timeline(fixtures, path)
    slices, instants, _tracks = imported(path)
    measured = sorted(int(ns) for line in result.stdout.splitlines() if line.startswith("pair ")
                      for ns in line.split()[2:])
    assert collections.Counter(s.name for s in slices) == {"1": 3, "2": 3} and instants == []
    # each slice lies within the fixture's own measurement around its pair
    assert all(duration <= bound for duration, bound in
               zip(sorted(s.end - s.start for s in slices), measured))
