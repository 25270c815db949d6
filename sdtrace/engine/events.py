"""Raw perf samples -> events: who hit which probe, when, with which arguments.

Every armed site is one trace event with its own kernel sample id (one per
CPU).  A ``Decoder`` maps each sample id to the site's ``ArmedSite`` and its
``tracefs.EventFormat``.  The first fetched field of every event is the
thread's ``comm`` (fetched by the kernel at the hit, so it is right even for
a process that has exited since); the others are the arguments that the
site's fetch plans (fetchargs.py) fetch, in order; the plans supply the rest:
constants, conversions and unavailable (None) arguments.

This is the hot loop: a burst of hits reaches hundreds of thousands of
samples per second, and the reader must keep up in pure Python.  So each
site gets a *parser* (see perf.walk), generated on its first sample from
its layout by codegen.py, and a *decoder* (``Decoder``) finds the parser of
a sample by its id.  Fetched strings repeat (comms, function and file
names): their bytes are looked up in a bounded cache of their text, so
decoding and quoting happen once per distinct value.

What a parser appends, its *item*, is up to an *emitter* (``Emitter``):
``RECORDS`` appends the record tuples ``(ts, pid, tid, cpu, comm, site,
args)`` of the Python API; output.LineEmitter appends ``(ts, probe, text)``
with the event already formatted.  An emitter says what a fetched comm or
string argument becomes, from its str (``comm_text``, ``string_text``) and
when the kernel could not read it (``comm_absent``, ``string_absent``), and
describes its item for a site (``item(site, arguments)``, in codegen.py's
vocabulary).  ``arguments`` gives, per argument, an ``Argument``: its kind
(INT: an int; TEXT: an already converted string; VALUE: any Python value,
None included) and the description of its value.  Emitters never write
source, and no data from a probe or a file ever becomes source.

Records are plain tuples because of that volume; ``Event`` is the friendly
object the Python API hands out.
"""
import dataclasses
from typing import Callable, NamedTuple, Protocol, Sequence

from ..errors import SdtraceError
from . import codegen

COMM_FETCH = "comm=$comm:string"
INT, TEXT, VALUE = "int", "text", "value"      # argument kinds, for emitters
TEXT_CACHE_ENTRIES = 1024                       # distinct strings remembered per cache


@dataclasses.dataclass(frozen=True, eq=False)
class ArmedSite:
    """One armed site (a notes.Site given a trace event and fetch plans), as
    records refer to it; hashed by identity: it keys counters."""
    provider: str
    name: str
    file: str
    event: str                  # the trace event's name in the session's group (tracefs)
    plans: tuple                # the executor's plan per argument
    string_arguments: frozenset = frozenset()  # indexes of the arguments read as strings
    probe: str = dataclasses.field(init=False, repr=False)   # "provider:name", as JSON shows it

    def __post_init__(self):
        object.__setattr__(self, "probe", f"{self.provider}:{self.name}")


class Truncated(str):
    """A string argument cut at the executor's string size (``--string-size``)."""
    __slots__ = ()


class Event:
    """One probe hit.  Attributes are the keys of ``sdtrace trace --json`` (all
    but ``named``, which providers.argument_names gives for the probe, and
    ``truncated``, the indexes of the string arguments cut short, a property here)."""
    __slots__ = ("ts", "pid", "tid", "cpu", "comm", "probe", "file", "args")

    def __init__(self, ts, pid, tid, cpu, comm, probe, file, args):
        self.ts, self.pid, self.tid, self.cpu = ts, pid, tid, cpu
        self.comm, self.probe, self.file, self.args = comm, probe, file, args

    @classmethod
    def from_record(cls, record):
        ts, pid, tid, cpu, comm, site, args = record
        return cls(ts, pid, tid, cpu, comm, site.probe, site.file, args)

    @property
    def truncated(self):
        """The indexes of the string arguments that were cut at the string size."""
        return [index for index, value in enumerate(self.args) if type(value) is Truncated]

    def __repr__(self):
        return (f"Event(ts={self.ts}, pid={self.pid}, tid={self.tid}, cpu={self.cpu}, "
                f"comm={self.comm!r}, probe={self.probe!r}, args={self.args!r})")


class Argument(NamedTuple):
    """One argument as an emitter sees it: its kind (INT, TEXT, VALUE) and value (codegen)."""
    kind: str
    value: object


class Emitter(Protocol):
    """What an event becomes: the item a site's parser appends per sample."""
    comm_text: Callable[[str], object]      # a fetched comm -> what the item holds
    string_text: Callable[[str], object]    # a fetched string argument -> the same
    comm_absent: object                     # the comm the kernel could not read
    string_absent: object                   # a string argument the kernel could not read
    value_absent: object                    # an INT argument the BPF executor could not read

    def item(self, site: ArmedSite, arguments: Sequence[Argument]) -> object:
        """The codegen description of the item of `site`'s samples."""

    def cut(self, item: object, truncated: int) -> object:
        """`item` marked as having its string arguments of the bits of `truncated` cut
        short (bit i: argument i); called on the few items that have some."""


def truncated_indexes(truncated):
    """The argument indexes of the bits of a record's ``truncated`` word."""
    return [index for index in range(truncated.bit_length()) if truncated >> index & 1]


class RecordEmitter:
    """Parsers append record tuples (ts, pid, tid, cpu, comm, site, args)."""
    comm_text = string_text = str
    comm_absent = string_absent = value_absent = None

    @staticmethod
    def cut(record, truncated):
        args = list(record[ARGS])
        for index in truncated_indexes(truncated):
            args[index] = Truncated(args[index])
        return (*record[:ARGS], args)

    def item(self, site, arguments):
        return codegen.Tuple(codegen.TS, codegen.PID, codegen.TID, codegen.CPU, codegen.COMM,
                             codegen.Constant(site, "site"),
                             codegen.List(*(argument.value for argument in arguments)))


RECORDS = RecordEmitter()
# The fields of a record, by index (aggregate and perfetto read records).
TS, PID, TID, CPU, COMM, SITE, ARGS = range(7)


class Decoder:
    """Sample id -> site and format, and the parsers that turn samples into items
    (of the samples `tree`, a tracefs.scope.ProcessTree, holds, or of every sample)."""

    def __init__(self, tree=None):
        self.sites = {}          # sample id -> (site, format)
        self._parsers = {}       # emitter -> its _Parsers
        self._scope = None if tree is None else codegen.Scope(
            codegen.Constant(tree.spans, "spans"), codegen.Constant(tree.outside, "outside"))

    def add(self, sample_ids, site, event_format):
        """Register the sample ids of `site`, whose raw samples `event_format` describes."""
        if not event_format.args or event_format.args[0].name != "comm":
            raise SdtraceError(f"uprobe {event_format.group}/{event_format.event}: its first "
                               f"field is not the comm ({COMM_FETCH})")
        for sample_id in sample_ids:
            self.sites[sample_id] = (site, event_format)

    def parsers(self, emitter: Emitter = RECORDS):
        """perf.walk's parsers that append `emitter`'s items."""
        parsers = self._parsers.get(emitter)
        if parsers is None:
            parsers = self._parsers[emitter] = _Parsers(self.sites, emitter, self._scope)
        return parsers


class TextCache(dict):
    """A fetched string's bytes -> its text by `translate`, its bytes decoded up to the
    first NUL if any; emptied when full."""

    def __init__(self, translate):
        super().__init__()
        self._translate = translate

    def __missing__(self, raw):
        if len(self) >= TEXT_CACHE_ENTRIES:
            self.clear()
        text = self[raw] = self._translate(raw.split(b"\0", 1)[0].decode(errors="replace"))
        return text


class _Parsers(dict):
    """Sample id -> the parser of its site for one emitter, generated on first use."""

    def __init__(self, sites, emitter, scope):
        super().__init__()
        self._sites = sites
        self._emitter = emitter
        self._scope = scope
        self._comm = codegen.Constant(TextCache(emitter.comm_text), "comms")
        self._comm_absent = codegen.Constant(emitter.comm_absent, "comm_absent")
        self._strings = codegen.Constant(TextCache(emitter.string_text), "strings")
        self._string_absent = codegen.Constant(emitter.string_absent, "string_absent")

    def __missing__(self, sample_id):
        if sample_id not in self._sites:
            raise SdtraceError(f"perf sample with unknown id {sample_id}")
        site, event_format = self._sites[sample_id]
        parser = self[sample_id] = self._generate(site, event_format)
        return parser

    def _generate(self, site, event_format):
        _comm, *fields = event_format.args
        values = [codegen.Local(f"field{index}") for index in range(1, len(event_format.args))]
        unpacked = [codegen.String(codegen.COMM, self._comm, self._comm_absent)]
        unpacked += [codegen.String(value, self._strings, self._string_absent)
                     if field.is_string else value for value, field in zip(values, fields)]
        arguments = []
        fetched = iter(zip(values, fields))
        for plan in site.plans:
            if not plan.fetched:                       # an immediate, or unavailable (None)
                arguments.append(Argument(VALUE, codegen.Constant(plan.constant)))
                continue
            value, field = next(fetched)
            if plan.convert is not None:
                arguments.append(Argument(VALUE, codegen.Call(
                    codegen.Constant(plan.convert, "convert"), value)))
            elif field.is_string:
                arguments.append(Argument(TEXT, value))
            else:
                arguments.append(Argument(INT if field.struct_code in "bBhHiIqQ" else VALUE,
                                          value))
        return codegen.parser(event_format.layout, unpacked,
                              self._emitter.item(site, arguments), self._scope)
