"""BPF ring records -> an emitter's items: one generated parser per site and emitter.

The BPF executor's records (codegen.RecordLayout: HEADER, a u64 slot per
argument, the string areas) are read the way the tracefs executor's perf
samples are (events.py): each site gets a parser, generated on its first
record by engine/codegen.py for the emitter at hand, that unpacks the header
and every slot with one precompiled Struct and appends the emitter's item.
The slot's format does the typing: the program leaves an integer of `size`
bytes zero-extended in its u64, so ``<i4x`` reads an s32 straight, ``<f4x``
a float; a string's slot holds its byte count and its bytes are sliced from
the ring and looked up in a cache of their text.  A value the program could
not read (its bit in ``missing``) becomes the emitter's absent value; a
record whose strings were cut (``truncated``) goes through the emitter's
``cut``.
"""
from ... import errors
from .. import codegen as source
from ..events import INT, TEXT, VALUE, Argument, TextCache
from . import codegen

HEADER_LOCALS = {"ts": source.TS, "tid": source.TID, "pid": source.PID, "cpu": source.CPU,
                 "site": None, "comm": source.COMM, "missing": source.Local("missing"),
                 "truncated": source.Local("truncated")}
_INTEGER_SLOTS = {1: "B7x", 2: "H6x", 4: "I4x", 8: "Q"}
_FLOAT_SLOTS = {4: "f4x", 8: "d"}
_SKIPPED_SLOT = "8x"


def slot_format(plan):
    """The struct format of an argument's u64 slot, read as its plan's value."""
    if plan.kind is None:
        return _SKIPPED_SLOT
    if plan.string:
        return "Q"                                  # the byte count
    if plan.is_float:
        return _FLOAT_SLOTS[plan.size]
    code = _INTEGER_SLOTS[plan.size]
    return code[0].lower() + code[1:] if plan.signed else code


class RecordParsers(dict):
    """Site id -> the parser of its records for one emitter, generated on first use.

    `sites` maps a site id to its (events.ArmedSite, codegen.RecordLayout)."""

    def __init__(self, sites, emitter):
        super().__init__()
        self._sites = sites
        self._emitter = emitter
        self._comms = source.Constant(TextCache(emitter.comm_text), "comms")
        self._strings = source.Constant(TextCache(emitter.string_text), "strings")
        self._string_absent = source.Constant(emitter.string_absent, "string_absent")
        self._value_absent = source.Constant(emitter.value_absent, "value_absent")
        self._none = source.Constant(None, "none")
        self._cut = source.Constant(emitter.cut, "cut")

    def __missing__(self, site_id):
        if site_id not in self._sites:
            raise errors.SdtraceError(f"BPF ring: a record of unknown site id {site_id}")
        parser = self[site_id] = self._generate(*self._sites[site_id])
        return parser

    def _generate(self, site, layout):
        slots, arguments = [], []
        for index, plan in enumerate(layout.plans):
            local = source.Local(f"field{index}")
            if plan.kind is None:
                slots.append(None)
                arguments.append(Argument(VALUE, self._none))
            elif plan.string:
                slots.append(source.Slot(local, index, self._string_absent, self._strings,
                                         layout.strings[index], plan.length is None))
                arguments.append(Argument(TEXT, local))
            elif plan.is_float:
                slots.append(source.Slot(local, index, self._none))
                arguments.append(Argument(VALUE, local))
            else:
                slots.append(source.Slot(local, index, self._value_absent))
                arguments.append(Argument(INT, local))
        layout_format = "<" + "".join(code for _name, code in codegen.HEADER) + "".join(
            map(slot_format, layout.plans))
        header = [HEADER_LOCALS[name] for name, _code in codegen.HEADER]
        return source.ring_parser(layout_format, header, slots, self._comms,
                                  self._emitter.item(site, arguments), self._cut)
