"""Timeline export: Chrome trace-event JSON, as ui.perfetto.dev and chrome://tracing open it.

The file is one JSON object, ``{"traceEvents": [...], "displayTimeUnit": "ns"}``,
written as events come so that a long trace never sits in memory:

* a START/END pair becomes a complete event (``"ph": "X"``) on its thread,
  ``ts`` the START's time and ``dur`` the END's time minus it;
* a hit that is not part of a pair becomes an instant event (``"ph": "i"``,
  ``"s": "t"``, thread scope);
* process and thread names become metadata events (``"ph": "M"``,
  ``process_name`` / ``thread_name``) from the comm of the hits, written
  last, once every thread has been seen.

The format counts time in microseconds; sdtrace's nanosecond timestamps are
written as exact decimals (``12.345``), never through a float, so every
``dur`` is exactly the difference of the two hits.

``TraceTimeline`` is the timeline of ``sdtrace trace``: it pairs probes by
the naming convention USDT providers follow -- ``X__entry``/``X__return``,
``X__start``/``X__done``, ``X__begin``/``X__end``, ``X__start``/``X__end``
of one provider, when both are traced (``X__`` may be absent) -- per thread, LIFO (aggregate.Pairer, after aggregate.TimeOrder).
Slices are named by the START's label arguments (providers.py: a python
function's name, a query's text) or else by the probe, e.g.
``python:function``.  ``sdtrace latency`` writes its own pairs, named by the
matched key.
"""
import json

from .aggregate import ARGS, COMM, PID, SITE, TID, TS, Pairer, TimeOrder
from .errors import SdtraceError

# (START suffix, END suffix) in order of preference
SPAN_SUFFIXES = (("entry", "return"), ("start", "done"), ("begin", "end"), ("start", "end"))


def _micros(nanoseconds):
    """Exact microseconds for JSON: 1234567 ns -> 1234.567."""
    sign = "-" if nanoseconds < 0 else ""
    magnitude = abs(nanoseconds)
    return f"{sign}{magnitude // 1000}.{magnitude % 1000:03d}"


def _json_value(value):
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return None
    return value


def argument_record(site, args):
    """{name: value} for a hit's arguments, by documented name or argN."""
    from .providers import argument_names

    names = argument_names(site.probe, len(args)) or [f"arg{index}" for index in range(len(args))]
    return {name: _json_value(value) for name, value in zip(names, args)}


class TimelineWriter:
    """Streams trace events to `path`; close() completes the file."""

    def __init__(self, path):
        try:
            self.file = open(path, "w", buffering=1 << 20)
        except OSError as error:
            raise SdtraceError(f"{path}: {error.strerror}") from None
        self.file.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        self.separator = ""
        self.threads = {}        # tid -> (pid, comm)
        self.processes = {}      # pid -> comm of its main thread, or of its first hit

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
        args = {"start": argument_record(start[SITE], start[ARGS]),
                "end": argument_record(end[SITE], end[ARGS])}
        self._event(f'{{"ph": "X", "name": {json.dumps(name)}, "cat": {json.dumps(category)}, '
                    f'"ts": {_micros(start[TS])}, "dur": {_micros(end[TS] - start[TS])}, '
                    f'"pid": {start[PID]}, "tid": {start[TID]}, "args": {json.dumps(args)}}}')

    def instant(self, record):
        """An instant event on the hit's thread."""
        self._note(record)
        site = record[SITE]
        self._event(f'{{"ph": "i", "s": "t", "name": {json.dumps(site.probe)}, '
                    f'"cat": {json.dumps(site.probe.partition(":")[0])}, '
                    f'"ts": {_micros(record[TS])}, "pid": {record[PID]}, "tid": {record[TID]}, '
                    f'"args": {json.dumps(argument_record(site, record[ARGS]))}}}')

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


def _span_parts(probe):
    """("provider", "base", "suffix") of "provider:base__suffix" (base may be empty)."""
    provider, _, name = probe.partition(":")
    base, _, suffix = name.rpartition("__")
    return provider, base, suffix


def _probe_name(provider, base, suffix):
    return f"{provider}:{base}__{suffix}" if base else f"{provider}:{suffix}"


def span_name(probe):
    """The name of the span a START or END probe belongs to: "python:function"."""
    provider, base, _suffix = _span_parts(probe)
    return f"{provider}:{base}" if base else provider


def span_roles(sites):
    """{site: ((provider, base), is_start)} for the sites that form START/END pairs."""
    probes = {site.probe for site in sites}
    roles = {}
    for site in sites:
        provider, base, suffix = _span_parts(site.probe)
        for start_suffix, end_suffix in SPAN_SUFFIXES:
            if suffix == start_suffix and _probe_name(provider, base, end_suffix) in probes:
                roles[site] = ((provider, base), True)
            elif suffix == end_suffix and _probe_name(provider, base, start_suffix) in probes:
                roles[site] = ((provider, base), False)
            else:
                continue
            break
    return roles


class TraceTimeline:
    """The timeline of ``sdtrace trace --perfetto``, and the events.py emitter
    of that trace: its items are the event writer's ``(ts, site, text)``
    plus the record, ``(ts, site, text, record)``, so the trace loop writes
    the text and hands the same items, after its -n cut, to add()."""
    comm_text = string_text = str          # the record's values stay raw ...
    comm_absent = string_absent = None

    def __init__(self, path, session, writer):
        self.session = session
        self.writer = writer
        self.timeline = TimelineWriter(path)
        self.order = TimeOrder()
        self.pairer = None

    def item(self, site, arguments):
        """... and the writer formats them itself: strings as values, comm through its comm_text."""
        from .events import RECORDS, TEXT, VALUE

        writer = self.writer
        text, names = writer.item(site, [(VALUE if kind == TEXT else kind, expression)
                                         for kind, expression in arguments])
        record, _ = RECORDS.item(site, arguments)

        def writer_comm(comm):
            return writer.comm_absent if comm is None else writer.comm_text(comm)

        return (f"(lambda comm: {text})(writer_comm(comm)) + ({record},)",
                {**names, "writer_comm": writer_comm})

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
            self.timeline.slice(self._name(start), start, end, span_name(start[SITE].probe))

    @staticmethod
    def _name(start):
        from .providers import span_label

        site, args = start[SITE], start[ARGS]
        label = span_label(site.probe, len(args))
        if label:
            return " ".join(str(args[index]) for index in label)
        return span_name(site.probe)

    def close(self):
        self._place(self.order.flush())
        self.timeline.close()
