"""Raw perf samples -> events: who hit which probe, when, with which arguments.

Every armed site is one trace event with its own kernel sample id (one per
CPU).  A ``Decoder`` maps each sample id to the site's ``ProbeSite`` and its
``tracefs.EventFormat``.  The first fetched field of every event is the
thread's ``comm`` (fetched by the kernel at the hit, so it is right even for
a process that has exited since); the others are the arguments that the
site's fetch plans (fetchargs.py) fetch, in order; the plans supply the rest:
constants, conversions and unavailable (None) arguments.

This is the hot loop: a burst of hits reaches hundreds of thousands of
samples per second, and the reader must keep up in pure Python.  So each
site gets a *parser* (see perf.walk) generated from its layout on its first
sample, straight-line code without a loop over fields::

    def parse(data, position, append):
        size, _, pid, tid, ts, cpu, _, comm, field1, field2, = unpack(data, position)
        raw = position + RAW_OFFSET
        if comm >> 16:
            start = raw + (comm & 0xFFFF)
            comm = comms[data[start:start + (comm >> 16)]]
        else:
            comm = comm_absent
        ...                                    # the same for field2, a string
        append((ts, pid, tid, cpu, comm, site, [field1, field2]))
        return size

``unpack`` is one precompiled Struct spanning the whole PERF_RECORD_SAMPLE:
perf's header fields, then the event's raw fields (its format's ``layout``).
A string field is a ``__data_loc`` word, length << 16 | offset from the start
of the raw record, the length counting the NUL; the bytes (NUL included)
are sliced straight from the ring data and looked up in a bounded cache of
their text (fetched strings repeat: comms, function and file names), so
decoding and quoting happen once per distinct value.

What a parser appends is up to an *emitter*: ``RECORDS`` appends the record
tuples ``(ts, pid, tid, cpu, comm, site, args)`` of the Python API;
``output.EventWriter`` appends ``(ts, probe, text)`` with the event already
formatted.  An emitter has ``comm_text`` and ``string_text`` (what a fetched
comm / string argument becomes, from its str), ``comm_absent`` and
``string_absent`` (the same for a string the kernel could not read), and
``item(site, arguments)``, which returns the source of the appended
expression and the names it uses.  ``arguments`` gives, per argument, its
kind (INT: an int; TEXT: an already converted string; VALUE: any Python
value, None included) and the expression of its value.  Generated source
only ever holds names, never data from a probe or a file; sites with the
same layout share one compiled code object.

Records are plain tuples because of that volume; ``Event`` is the friendly
object the Python API hands out.
"""
import struct
from dataclasses import dataclass

from ..errors import SdtraceError
from ..kernel import perf

COMM_FETCH = "comm=$comm:string"
INT, TEXT, VALUE = "int", "text", "value"      # argument kinds, for emitters
TEXT_CACHE_ENTRIES = 1024                       # distinct strings remembered per cache


@dataclass(frozen=True, eq=False)
class ProbeSite:
    """One armed site as events refer to it (hashed by identity: it keys counters)."""
    probe: str                  # "provider:name"
    file: str
    event: str                  # the trace event's name in the session's group
    plans: tuple                # fetchargs.ArgumentPlan per argument


class Event:
    """One probe hit.  Attributes are the keys of ``sdtrace trace --json`` (all
    but ``named``, which providers.argument_names gives for the probe)."""
    __slots__ = ("ts", "pid", "tid", "cpu", "comm", "probe", "file", "args")

    def __init__(self, ts, pid, tid, cpu, comm, probe, file, args):
        self.ts, self.pid, self.tid, self.cpu = ts, pid, tid, cpu
        self.comm, self.probe, self.file, self.args = comm, probe, file, args

    @classmethod
    def from_record(cls, record):
        ts, pid, tid, cpu, comm, site, args = record
        return cls(ts, pid, tid, cpu, comm, site.probe, site.file, args)


    def __repr__(self):
        return (f"Event(ts={self.ts}, pid={self.pid}, tid={self.tid}, cpu={self.cpu}, "
                f"comm={self.comm!r}, probe={self.probe!r}, args={self.args!r})")


class RecordEmitter:
    """Parsers append record tuples (ts, pid, tid, cpu, comm, site, args)."""
    comm_text = string_text = str
    comm_absent = string_absent = None

    def item(self, site, arguments):
        values = ", ".join(expression for _kind, expression in arguments)
        return f"(ts, pid, tid, cpu, comm, site, [{values}])", {}


RECORDS = RecordEmitter()
# The fields of a record, by index (aggregate.py and perfetto.py read records).
TS, PID, TID, CPU, COMM, SITE, ARGS = range(7)


class Decoder:
    """Sample id -> site and format, and the parsers that turn samples into items."""

    def __init__(self):
        self.sites = {}          # sample id -> (site, format)
        self._parsers = {}       # emitter -> its _Parsers

    def add(self, sample_ids, site, event_format):
        """Register the sample ids of `site`, whose raw samples `event_format` describes."""
        if not event_format.args or event_format.args[0].name != "comm":
            raise SdtraceError(f"uprobe {event_format.group}/{event_format.event}: its first "
                               f"field is not the comm ({COMM_FETCH})")
        for sample_id in sample_ids:
            self.sites[sample_id] = (site, event_format)

    def parsers(self, emitter=RECORDS):
        """perf.walk's parsers that append `emitter`'s items."""
        parsers = self._parsers.get(emitter)
        if parsers is None:
            parsers = self._parsers[emitter] = _Parsers(self.sites, emitter)
        return parsers


class _TextCache(dict):
    """A fetched string's bytes (with their NUL) -> its text by `translate`; emptied when full."""

    def __init__(self, translate):
        super().__init__()
        self._translate = translate

    def __missing__(self, raw):
        if len(self) >= TEXT_CACHE_ENTRIES:
            self.clear()
        text = self[raw] = self._translate(raw[:-1].decode(errors="replace"))
        return text


class _Parsers(dict):
    """Sample id -> the parser of its site for one emitter, generated on first use."""

    def __init__(self, sites, emitter):
        super().__init__()
        self._sites = sites
        self._emitter = emitter
        self._comms = _TextCache(emitter.comm_text)
        self._strings = _TextCache(emitter.string_text)

    def __missing__(self, sample_id):
        if sample_id not in self._sites:
            raise SdtraceError(f"perf sample with unknown id {sample_id}")
        site, event_format = self._sites[sample_id]
        parser = self[sample_id] = self._generate(site, event_format)
        return parser

    def _generate(self, site, event_format):
        emitter = self._emitter
        comm, *fields = event_format.args
        names = ["comm"] + [f"field{index}" for index in range(1, len(event_format.args))]
        namespace = {
            "unpack": _sample_struct(event_format.layout).unpack_from,
            "RAW_OFFSET": perf.SAMPLE_RECORD.size, "site": site,
            "comms": self._comms, "comm_absent": emitter.comm_absent,
            "strings": self._strings, "string_absent": emitter.string_absent}
        arguments = []
        fetched = iter(zip(names[1:], fields))
        for index, plan in enumerate(site.plans):
            if not plan.fetched:                       # an immediate, or unavailable (None)
                namespace[f"constant{index}"] = plan.constant
                arguments.append((VALUE, f"constant{index}"))
                continue
            name, field = next(fetched)
            if plan.convert is not None:
                namespace[f"convert{index}"] = plan.convert
                arguments.append((VALUE, f"convert{index}({name})"))
            elif field.is_string:
                arguments.append((TEXT, name))
            else:
                arguments.append((INT if field.struct_code in "bBhHiIqQ" else VALUE, name))
        item, item_names = emitter.item(site, arguments)
        namespace.update(item_names)
        strings = [name for name, field in zip(names, event_format.args) if field.is_string]
        exec(_compile(_parser_source(names, strings, item)), namespace)
        return namespace["parse"]


def _sample_struct(layout):
    """One Struct for a whole PERF_RECORD_SAMPLE whose raw fields are `layout`."""
    return struct.Struct(perf.SAMPLE_RECORD.format + layout)


def _parser_source(names, strings, item):
    """The source of `parse` for fields `names` (strings among them replaced by their text)."""
    lines = ["def parse(data, position, append):",
             f"    size, _, pid, tid, ts, cpu, _, {', '.join(names)}, = unpack(data, position)",
             "    raw = position + RAW_OFFSET"]
    for name in strings:
        cache, absent = ("comms", "comm_absent") if name == "comm" else ("strings",
                                                                         "string_absent")
        lines += [f"    if {name} >> 16:",
                  f"        start = raw + ({name} & 0xFFFF)",
                  f"        {name} = {cache}[data[start:start + ({name} >> 16)]]",
                  "    else:",
                  f"        {name} = {absent}"]
    lines += [f"    append({item})", "    return size"]
    return "\n".join(lines) + "\n"


_compiled = {}      # parser source -> code object


def _compile(source):
    code = _compiled.get(source)
    if code is None:
        code = _compiled[source] = compile(source, "<sdtrace parser>", "exec")
    return code
