"""Timeline export: Chrome trace-event JSON, as ui.perfetto.dev and chrome://tracing open it.

The file is one JSON object, ``{"traceEvents": [...], "displayTimeUnit": "ns"}``,
written as events come so that a long trace never sits in memory:

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

from ..engine.events import ARGS, COMM, PID, SITE, TID, TS
from .aggregate import Pairer, TimeOrder
from .output import finite, open_output, quote

# (START suffix, END suffix) in order of preference
SPAN_SUFFIXES = (("entry", "return"), ("start", "done"), ("begin", "end"), ("start", "end"))


def _micros(nanoseconds):
    """Exact microseconds for JSON: 1234567 ns -> 1234.567."""
    sign = "-" if nanoseconds < 0 else ""
    magnitude = abs(nanoseconds)
    return f"{sign}{magnitude // 1000}.{magnitude % 1000:03d}"


class TimelineWriter:
    """Streams trace events to `path`; close() completes the file."""

    def __init__(self, path):
        self.file = open_output(path)
        self.file.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        self.separator = ""
        self.threads = {}        # tid -> (pid, comm)
        self.processes = {}      # pid -> comm of its main thread, or of its first hit
        self.sites = {}          # site -> (argument names, the head of its instant events)

    def _site(self, record):
        """(argument names, instant event head) of the record's site, made at
        its first hit: the names are the documented ones (providers.py) or argN."""
        site = record[SITE]
        known = self.sites.get(site)
        if known is None:
            from ..discovery.providers import argument_names

            argument_count = len(record[ARGS])
            names = (argument_names(site.provider, site.name, argument_count)
                     or [f"arg{index}" for index in range(argument_count)])
            head = (f'{{"ph": "i", "s": "t", "name": {quote(site.probe)}, '
                    f'"cat": {quote(site.provider)}, ')
            known = self.sites[site] = (names, head)
        return known

    def _arguments(self, record):
        """{name: value} for a hit's arguments."""
        names, _head = self._site(record)
        return {name: finite(value) for name, value in zip(names, record[ARGS])}

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
        args = {"start": self._arguments(start), "end": self._arguments(end)}
        self._event(f'{{"ph": "X", "name": {quote(name)}, "cat": {quote(category)}, '
                    f'"ts": {_micros(start[TS])}, "dur": {_micros(end[TS] - start[TS])}, '
                    f'"pid": {start[PID]}, "tid": {start[TID]}, "args": {json.dumps(args)}}}')

    def instant(self, record):
        """An instant event on the hit's thread."""
        self._note(record)
        _names, head = self._site(record)
        self._event(f'{head}"ts": {_micros(record[TS])}, "pid": {record[PID]}, '
                    f'"tid": {record[TID]}, "args": {json.dumps(self._arguments(record))}}}')

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
        self.timeline = TimelineWriter(path)
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
