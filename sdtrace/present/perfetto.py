"""Timeline export: Perfetto's native protobuf trace, or Chrome trace-event JSON.

``timeline_writer(path)`` picks the format by the file's name: a ``.pftrace``
or ``.perfetto-trace`` file gets Perfetto's native format
(``ProtoTimelineWriter``), any other Chrome trace-event JSON
(``JsonTimelineWriter``), which ui.perfetto.dev and chrome://tracing open but
Perfetto treats as legacy.  Both writers take the same calls: ``slice(name,
start, end, category)`` for a START/END pair, ``instant(record)`` for a hit,
``close()``; both write as events come, so that a long trace never sits in
memory.

The JSON file is one object, ``{"traceEvents": [...], "displayTimeUnit": "ns"}``:

* a START/END pair becomes a complete event (``"ph": "X"``) on its thread,
  ``ts`` the START's time and ``dur`` the END's time minus it;
* a hit of a probe that is neither a START nor an END becomes an instant
  event (``"ph": "i"``, ``"s": "t"``, thread scope); an END with no open
  START and a START still open when the trace ends are left out;
* process and thread names become metadata events (``"ph": "M"``,
  ``process_name`` / ``thread_name``) from the comm of the hits, written
  last, once every thread has been seen.

The format counts time in microseconds; sdtrace's nanosecond timestamps are
written as exact decimals (``12.345``), never through a float, so every
``dur`` is exactly the difference of the two hits.

The native file is a stream of TracePackets (perfetto_proto.py encodes them)
on one packet sequence, the first packet clearing its incremental state:

* that first packet is a clock snapshot of CLOCK_MONOTONIC and
  CLOCK_BOOTTIME that makes MONOTONIC the trace's clock; every event says it
  is timed by MONOTONIC (``timestamp_clock_id``), the clock of the records, so
  its timestamp is the hit's nanoseconds as they are (a packet's clock is
  BOOTTIME unless it says otherwise);
* a process and each of its threads get a track descriptor at their first
  hit, before any event on them, named by the comm of that hit;
* a pair becomes a TYPE_SLICE_BEGIN and a TYPE_SLICE_END event, the START's
  arguments on the first and the END's on the second; a hit that is neither,
  a TYPE_INSTANT event on its thread's track;
* the slices of one track must nest, as trace processor sorts the events by
  time (a tie keeping the file's order) and ends the innermost open slice at
  each END.  A pair is written at its END, so a pair that would overlap a
  slice already on its thread's track without nesting (two spans of different
  probes, or ``latency --match`` pairs that interleave) goes on another track
  of the thread, a *lane*: a child track of the thread's, all named
  OVERLAP_LANE so that the UI draws them together.  This is what the JSON
  format cannot show: its viewers draw such slices as if one were inside
  the other.

``TraceTimeline`` is the timeline of ``sdtrace trace``: it pairs probes by
the naming convention USDT providers follow -- ``X__entry``/``X__return``,
``X__start``/``X__done``, ``X__begin``/``X__end``, ``X__start``/``X__end``
of one provider, when both are traced (``X__`` may be absent) -- per thread, LIFO (aggregate.Pairer, after aggregate.TimeOrder).
Slices are named by the START's label arguments (providers.py: a python
function's name, a query's text) or else by the probe, e.g.
``python:function``.  ``sdtrace latency`` writes its own pairs, named by the
matched key.
"""
import bisect
import itertools
import json
import time

from ..engine.events import ARGS, COMM, PID, SITE, TID, TS
from . import perfetto_proto as proto
from .aggregate import Pairer, TimeOrder
from .output import finite, open_output, quote

# (START suffix, END suffix) in order of preference
SPAN_SUFFIXES = (("entry", "return"), ("start", "done"), ("begin", "end"), ("start", "end"))
NATIVE_SUFFIXES = (".pftrace", ".perfetto-trace")   # file names that get the native format
OVERLAP_LANE = "overlapping slices"                  # the name of a thread's extra tracks
LANE_MEMORY = 1024         # the most slices a lane remembers exactly (see _Lane)
SEQUENCE = 1               # the native trace's one packet sequence


def _micros(nanoseconds):
    """Exact microseconds for JSON: 1234567 ns -> 1234.567."""
    sign = "-" if nanoseconds < 0 else ""
    magnitude = abs(nanoseconds)
    return f"{sign}{magnitude // 1000}.{magnitude % 1000:03d}"


def timeline_writer(path):
    """The timeline writer for `path`: the native format for a .pftrace or .perfetto-trace
    file, JSON for any other."""
    native = str(path).lower().endswith(NATIVE_SUFFIXES)
    return (ProtoTimelineWriter if native else JsonTimelineWriter)(path)


class _Timeline:
    """What both formats take from a hit: its arguments, by name."""

    def __init__(self):
        self.argument_names = {}     # site -> the names of its arguments

    def _arguments(self, record):
        """{name: value} for a hit's arguments: the documented names (providers.py) or argN,
        found at the site's first hit."""
        site = record[SITE]
        names = self.argument_names.get(site)
        if names is None:
            from ..discovery.providers import argument_names

            count = len(record[ARGS])
            names = self.argument_names[site] = (argument_names(site.provider, site.name, count)
                                                 or [f"arg{index}" for index in range(count)])
        return dict(zip(names, record[ARGS]))


class JsonTimelineWriter(_Timeline):
    """Streams trace events to `path` as Chrome trace-event JSON; close() completes the file."""

    def __init__(self, path):
        super().__init__()
        self.file = open_output(path)
        self.file.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        self.separator = ""
        self.threads = {}        # tid -> (pid, comm)
        self.processes = {}      # pid -> comm of its main thread, or of its first hit
        self.heads = {}          # site -> the head of its instant events

    def _head(self, site):
        """The head of `site`'s instant events, made at its first hit."""
        head = self.heads.get(site)
        if head is None:
            head = self.heads[site] = (f'{{"ph": "i", "s": "t", "name": {quote(site.probe)}, '
                                       f'"cat": {quote(site.provider)}, ')
        return head

    def _json_arguments(self, record):
        """{name: value} for a hit's arguments, as JSON can hold them."""
        return {name: finite(value) for name, value in self._arguments(record).items()}

    def _event(self, text):
        self.file.write(self.separator + text)
        self.separator = ",\n"

    def _note(self, record):
        pid, tid, comm = record[PID], record[TID], record[COMM] or "?"
        self.threads[tid] = (pid, comm)
        if tid == pid or pid not in self.processes:
            self.processes[pid] = comm

    def slice(self, name, start, end, category):
        """A complete event on the START's thread, from START to END."""
        self._note(start)
        self._note(end)
        args = {"start": self._json_arguments(start), "end": self._json_arguments(end)}
        self._event(f'{{"ph": "X", "name": {quote(name)}, "cat": {quote(category)}, '
                    f'"ts": {_micros(start[TS])}, "dur": {_micros(end[TS] - start[TS])}, '
                    f'"pid": {start[PID]}, "tid": {start[TID]}, "args": {json.dumps(args)}}}')

    def instant(self, record):
        """An instant event on the hit's thread."""
        self._note(record)
        self._event(f'{self._head(record[SITE])}"ts": {_micros(record[TS])}, "pid": {record[PID]}, '
                    f'"tid": {record[TID]}, "args": {json.dumps(self._json_arguments(record))}}}')

    def close(self):
        """Write the names of every process and thread seen, and end the file."""
        if self.file.closed:
            return
        for pid, comm in self.processes.items():
            self._event(json.dumps({"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
                                    "args": {"name": comm}}))
        for tid, (pid, comm) in self.threads.items():
            self._event(json.dumps({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                                    "args": {"name": comm}}))
        self.file.write("\n]}\n")
        self.file.close()


def _annotation(name, value):
    """The DebugAnnotation of a named value: a dict's items nest, and None (a value that
    could not be read) is a name alone."""
    if isinstance(value, dict):
        return {"name": name, "dict_entries": [_annotation(*item) for item in value.items()]}
    if value is None:
        return {"name": name}
    if isinstance(value, bool):
        return {"name": name, "bool_value": value}
    if isinstance(value, int):
        return {"name": name, ("int_value" if value < 1 << 63 else "uint_value"): value}
    if isinstance(value, float):
        return {"name": name, "double_value": value}
    return {"name": name, "string_value": str(value)}


class _Lane:
    """A track of one thread, and what a slice must know to go on it without
    breaking the nesting of those already there.

    Slices come at their END, so in the order of their ends (a slice that ends
    before the lane's last end is refused: it could fall inside a slice whose
    children are forgotten).  A slice [start, end] fits when no slice on the lane
    has ``its start <= start < its end``; once placed, it contains every slice
    that started after it, and those are forgotten.  What is remembered is the
    outermost slices, disjoint, in order: ``starts`` and ``ends``.  Past
    LANE_MEMORY of them the older half becomes one interval, from the first's
    start to the last's end; that only ever refuses a slice that would have
    fitted in a gap between them, sending it to another lane."""
    __slots__ = ("uuid", "starts", "ends")

    def __init__(self, uuid):
        self.uuid = uuid
        self.starts = []
        self.ends = []

    def fits(self, start, end):
        if self.ends and end < self.ends[-1]:
            return False
        before = bisect.bisect_right(self.starts, start) - 1
        return before < 0 or self.ends[before] <= start

    def place(self, start, end):
        inside = bisect.bisect_right(self.starts, start)
        del self.starts[inside:], self.ends[inside:]
        self.starts.append(start)
        self.ends.append(end)
        if len(self.starts) > LANE_MEMORY:
            half = LANE_MEMORY // 2
            self.starts[:half] = self.starts[:1]
            self.ends[:half] = self.ends[half - 1:half]


class ProtoTimelineWriter(_Timeline):
    """Streams trace events to `path` in Perfetto's native protobuf format; close()
    completes the file."""

    def __init__(self, path):
        super().__init__()
        self.file = open_output(path).detach()     # the file's buffer, written in bytes
        self.uuids = itertools.count(1)
        self.processes = {}      # pid -> the uuid of its track
        self.threads = {}        # tid -> its lanes, its own track's first
        self._packet({"sequence_flags": proto.SEQ_INCREMENTAL_STATE_CLEARED, "clock_snapshot": {
            "clocks": [{"clock_id": proto.BUILTIN_CLOCK_MONOTONIC,
                        "timestamp": time.clock_gettime_ns(time.CLOCK_MONOTONIC)},
                       {"clock_id": proto.BUILTIN_CLOCK_BOOTTIME,
                        "timestamp": time.clock_gettime_ns(time.CLOCK_BOOTTIME)}],
            "primary_trace_clock": proto.BUILTIN_CLOCK_MONOTONIC}})

    def _packet(self, fields):
        fields["trusted_packet_sequence_id"] = SEQUENCE
        self.file.write(proto.packet(fields))

    def _event(self, timestamp, event):
        self._packet({"timestamp": timestamp,
                      "timestamp_clock_id": proto.BUILTIN_CLOCK_MONOTONIC, "track_event": event})

    def _lanes(self, record):
        """The lanes of the hit's thread; its process's track and its own are described
        at its first hit."""
        tid = record[TID]
        lanes = self.threads.get(tid)
        if lanes is None:
            pid, comm = record[PID], record[COMM] or "?"
            process = self.processes.get(pid)
            if process is None:
                process = self.processes[pid] = next(self.uuids)
                self._packet({"track_descriptor": {
                    "uuid": process, "process": {"pid": pid, "process_name": comm}}})
            lanes = self.threads[tid] = [_Lane(next(self.uuids))]
            self._packet({"track_descriptor": {
                "uuid": lanes[0].uuid, "parent_uuid": process,
                "thread": {"pid": pid, "tid": tid, "thread_name": comm}}})
        return lanes

    def _lane(self, lanes, start, end):
        """The uuid of the first lane the slice from `start` to `end` fits, a new one if none."""
        for lane in lanes:
            if lane.fits(start, end):
                break
        else:
            lane = _Lane(next(self.uuids))
            lanes.append(lane)
            self._packet({"track_descriptor": {
                "uuid": lane.uuid, "parent_uuid": lanes[0].uuid, "name": OVERLAP_LANE}})
        lane.place(start, end)
        return lane.uuid

    def slice(self, name, start, end, category):
        """A slice on a lane of the START's thread, from START to END."""
        track = self._lane(self._lanes(start), start[TS], end[TS])
        self._event(start[TS], {
            "type": proto.TYPE_SLICE_BEGIN, "track_uuid": track, "name": name,
            "categories": [category],
            "debug_annotations": [_annotation("start", self._arguments(start))]})
        self._event(end[TS], {
            "type": proto.TYPE_SLICE_END, "track_uuid": track,
            "debug_annotations": [_annotation("end", self._arguments(end))]})

    def instant(self, record):
        """An instant event on the hit's thread's own track."""
        site = record[SITE]
        self._event(record[TS], {
            "type": proto.TYPE_INSTANT, "track_uuid": self._lanes(record)[0].uuid,
            "name": site.probe, "categories": [site.provider],
            "debug_annotations": [_annotation(*item)
                                  for item in self._arguments(record).items()]})

    def close(self):
        self.file.close()


def _span_parts(site):
    """("provider", "base", "suffix") of a site of provider:base__suffix (base may be empty)."""
    base, _, suffix = site.name.rpartition("__")
    return site.provider, base, suffix


def _probe(provider, base, suffix):
    """(provider, name) of the probe of `base` and `suffix`."""
    return provider, f"{base}__{suffix}" if base else suffix


def span_name(site):
    """The name of the span a START or END site belongs to: "python:function"."""
    provider, base, _suffix = _span_parts(site)
    return f"{provider}:{base}" if base else provider


def span_roles(sites):
    """{site: ((provider, base), is_start)} for the sites that form START/END pairs."""
    probes = {(site.provider, site.name) for site in sites}
    roles = {}
    for site in sites:
        provider, base, suffix = _span_parts(site)
        for start_suffix, end_suffix in SPAN_SUFFIXES:
            if suffix == start_suffix and _probe(provider, base, end_suffix) in probes:
                roles[site] = ((provider, base), True)
            elif suffix == end_suffix and _probe(provider, base, start_suffix) in probes:
                roles[site] = ((provider, base), False)
            else:
                continue
            break
    return roles


class TraceTimeline:
    """The timeline of ``sdtrace trace --perfetto``, and the events.Emitter of
    that trace: its items are the line emitter's ``(ts, probe, text)`` plus
    the record, ``(ts, probe, text, record)``, so the trace loop writes the
    text and hands the same items, after its -n cut, to add()."""
    comm_text = string_text = str          # the record's values stay raw ...
    comm_absent = string_absent = value_absent = None

    def __init__(self, path, session, lines):
        import functools

        from ..engine.events import TEXT_CACHE_ENTRIES

        self.session = session
        self.lines = lines
        self.timeline = timeline_writer(path)
        self.order = TimeOrder()
        self.pairer = None
        self.spans = {}          # START site -> (its label's argument positions, span name)

        @functools.lru_cache(maxsize=TEXT_CACHE_ENTRIES)     # comms repeat: format each once
        def line_comm(comm):
            return lines.comm_absent if comm is None else lines.comm_text(comm)
        self.line_comm = line_comm

    def item(self, site, arguments):
        """... and the line emitter formats them itself: every argument as a value
        (a raw string, or None for one that could not be read), the comm through
        its comm_text."""
        from ..engine import codegen
        from ..engine.events import RECORDS, VALUE, Argument

        line = self.lines.item(
            site, [Argument(VALUE, argument.value) for argument in arguments],
            comm=codegen.Call(codegen.Constant(self.line_comm, "line_comm"), codegen.COMM))
        return codegen.Tuple(*line.items, RECORDS.item(site, arguments))

    def cut(self, item, truncated):
        from ..engine.events import RECORDS

        return (*self.lines.cut(item[:3], truncated), RECORDS.cut(item[3], truncated))

    def add(self, items):
        """Put the records of trace items on the timeline."""
        self._place(self.order.add([item[3] for item in items]))

    def _place(self, records):
        if self.pairer is None:
            self.pairer = Pairer(span_roles(self.session.sites))
        roles = self.pairer.roles
        for record in records:
            if record[SITE] not in roles:
                self.timeline.instant(record)
        for start, end in self.pairer.add(records):
            label, span = self._span(start)
            name = " ".join(str(start[ARGS][index]) for index in label) if label else span
            self.timeline.slice(name, start, end, span)

    def _span(self, start):
        """(label positions, span name) of a START record's site, found at its first pair:
        a slice is named by the label arguments (providers.py), or else by the span."""
        site = start[SITE]
        known = self.spans.get(site)
        if known is None:
            from ..discovery.providers import span_label

            known = self.spans[site] = (span_label(site.provider, site.name, len(start[ARGS])),
                                        span_name(site))
        return known

    def close(self):
        self._place(self.order.flush())
        self.timeline.close()
