"""Item descriptions -> a site's parser: the one module that writes Python source.

Each armed site gets a *parser* (events.py), a function generated from the
layout of its samples, so that the hot loop runs straight-line code with no
loop over fields.  What the parser appends, its *item*, is chosen by an
emitter (events.Emitter), which does not write source: it describes the item
with the small vocabulary below, and ``parser`` turns layout and description
into source, compiles it and returns the function::

    Tuple(TS, Constant(site.probe, "probe"),
          Text('{"ts": ', TS, ', "pid": ', PID, ..., Call(Constant(json_value), value)))

becomes ``(ts, probe, f'{{"ts": {ts}, "pid": {pid}, ... {json_value(field2)}]}}\\n')``.

* ``Local`` -- a variable of the parser: ``TS``, ``PID``, ``TID``, ``CPU``,
  ``COMM`` and the sample's fetched fields (``field1``...);
* ``Constant(value, hint)`` -- any Python value (a site, a converter, the
  text of a probe's name and file): it reaches the parser as a name of the
  parser's namespace (``hint``, numbered if taken), never as source;
* ``Call(function, *arguments)``, ``Arithmetic(left, "//" or "%", int)``;
* ``Text(*pieces)`` -- an f-string: a str piece is literal text (escaped
  here; only the emitter's own text, never data), any other piece a value,
  ``Format(value, spec)`` one with a format spec (``">7"``, ``"06d"``);
* ``Tuple(*items)`` and ``List(*items)``.

The parser of a sample whose raw fields are comm (a string) and one integer,
appending records::

    def parse(data, position, append):
        size, _, pid, tid, ts, cpu, _, comm, field1, = unpack(data, position)
        raw = position + 44
        if comm >> 16:
            start = raw + (comm & 0xFFFF)
            comm = comms[data[start:start + (comm >> 16)]]
        else:
            comm = comm_absent
        append((ts, pid, tid, cpu, comm, site, [field1]))
        return size

``unpack`` is one precompiled Struct spanning the whole PERF_RECORD_SAMPLE:
perf's header fields, then the event's raw fields.  A string field
(``String``) is a ``__data_loc`` word, length << 16 | offset from the start of
the raw record, the length counting the NUL; its bytes (NUL included) are
sliced from the ring data and looked up in a mapping of their text (events.py
caches them), or the field becomes its ``absent`` value when the kernel could
not read the string.  Sites whose source is equal share one code object.
"""
import re
import struct

from ..kernel import perf


class Local:
    """A variable of the parser."""
    __slots__ = ("name",)

    def __init__(self, name):
        if not name.isidentifier():
            raise ValueError(f"not a parser variable: {name!r}")
        self.name = name


TS, PID, TID, CPU, COMM = (Local(name) for name in ("ts", "pid", "tid", "cpu", "comm"))


class Constant:
    """A value the parser reads from its namespace, under the name `hint` (numbered if taken)."""
    __slots__ = ("value", "hint")

    def __init__(self, value, hint="constant"):
        if not hint.isidentifier():
            raise ValueError(f"not a name: {hint!r}")
        self.value, self.hint = value, hint


class Call:
    """`function` (a description, usually a Constant) applied to `arguments`."""
    __slots__ = ("function", "arguments")

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments


class Arithmetic:
    """`left` OPERATOR `right`: an integer quotient or remainder by a literal int."""
    __slots__ = ("left", "operator", "right")
    OPERATORS = ("//", "%")

    def __init__(self, left, operator, right):
        if operator not in self.OPERATORS or type(right) is not int:
            raise ValueError(f"unsupported arithmetic: {operator} {right!r}")
        self.left, self.operator, self.right = left, operator, right


class Format:
    """A value of a Text with a format spec."""
    __slots__ = ("value", "spec")
    _SPEC = re.compile(r"[<>^=+\- #0-9,_.a-zA-Z%]*")

    def __init__(self, value, spec=""):
        if not self._SPEC.fullmatch(spec):
            raise ValueError(f"unsupported format spec: {spec!r}")
        self.value, self.spec = value, spec


class Text:
    """An f-string: str pieces are literal text, others values (or Formats)."""
    __slots__ = ("pieces",)

    def __init__(self, *pieces):
        self.pieces = pieces


class Tuple:
    __slots__ = ("items",)

    def __init__(self, *items):
        self.items = items


class List:
    __slots__ = ("items",)

    def __init__(self, *items):
        self.items = items


class String:
    """A fetched string field `local`: its text from the mapping `texts` (the
    bytes with their NUL -> text), or `absent`; both are Constants."""
    __slots__ = ("local", "texts", "absent")

    def __init__(self, local, texts, absent):
        self.local, self.texts, self.absent = local, texts, absent


class Scope:
    """The samples a parser keeps: those whose pid has a span (first, end) in the
    mapping `spans` with first <= ts < end; it counts the others in `outside` (a
    one-item list) and returns.  Both are Constants."""
    __slots__ = ("spans", "outside")

    def __init__(self, spans, outside):
        self.spans, self.outside = spans, outside


def parser(layout, fields, item, scope=None):
    """The parse function of samples whose raw fields are `layout` (a struct
    format), unpacked into `fields` (a Local, or a String, per field), that
    appends `item` (a description) for the samples `scope` (a Scope) keeps, or
    for every sample."""
    source = _Source([_local(field) for field in fields])
    unpack = source.value(Constant(struct.Struct(perf.SAMPLE_RECORD.format + layout).unpack_from,
                                   "unpack"))
    names = [source.value(_local(field)) for field in fields]
    lines = ["def parse(data, position, append):",
             f"    size, _, pid, tid, ts, cpu, _, {', '.join(names)}, = {unpack}(data, position)"]
    if scope is not None:
        lines += [f"    span = {source.value(scope.spans)}.get(pid)",
                  "    if span is None or not span[0] <= ts < span[1]:",
                  f"        {source.value(scope.outside)}[0] += 1",
                  "        return size"]
    lines.append(f"    raw = position + {perf.SAMPLE_RECORD.size}")
    for field in fields:
        if isinstance(field, String):
            name = source.value(field.local)
            lines += [f"    if {name} >> 16:",
                      f"        start = raw + ({name} & 0xFFFF)",
                      f"        {name} = {source.value(field.texts)}"
                      f"[data[start:start + ({name} >> 16)]]",
                      "    else:",
                      f"        {name} = {source.value(field.absent)}"]
    lines += [f"    append({source.value(item)})", "    return size"]
    return _compiled_parser(lines, source)


class Slot:
    """An argument's u64 slot in a BPF ring record (engine/bpf/codegen.RecordLayout),
    unpacked into `local`: `absent` (a Constant) when bit `index` of the record's
    ``missing`` word is set.  A string's slot holds its byte count (with its NUL if
    `terminated`) and its bytes are at `text_at` in the record: `local` becomes
    their text from the mapping `texts` (a Constant)."""
    __slots__ = ("local", "index", "absent", "texts", "text_at", "terminated")

    def __init__(self, local, index, absent, texts=None, text_at=None, terminated=True):
        self.local, self.index, self.absent = local, index, absent
        self.texts, self.text_at, self.terminated = texts, text_at, terminated


def ring_parser(layout, header, slots, comms, item, cut):
    """The parse function of BPF ring records: `layout` (a struct format) holds the
    header's fields, named by `header` (Locals; None for one the parser skips; it
    must name ``comm``, ``missing`` and ``truncated``), then one field per Slot of
    `slots` (None for a slot to skip).  The comm's 16 bytes become their text from
    the mapping `comms`; the item is `item`, passed through the Constant `cut`
    with the ``truncated`` word when a string was cut.  parse(data, position,
    append) reads the record at `position` (after the ring's own 8-byte header)."""
    locals_ = [name for name in header if name is not None]
    locals_ += [slot.local for slot in slots if slot is not None]
    source = _Source(locals_)
    unpack = source.value(Constant(struct.Struct(layout).unpack_from, "unpack"))
    names = [source.value(name) if name is not None else "_"
             for name in (*header, *(slot and slot.local for slot in slots))]
    comm = source.value(COMM)
    lines = ["def parse(data, position, append):",
             f"    {', '.join(names)}, = {unpack}(data, position)",
             f"    {comm} = {source.value(comms)}[{comm}]"]
    numbers = [slot for slot in slots if slot is not None and slot.texts is None]
    if numbers:
        lines.append("    if missing:")
        lines += [f"        if missing & {1 << slot.index}: {source.value(slot.local)} = "
                  f"{source.value(slot.absent)}" for slot in numbers]
    for slot in slots:
        if slot is None or slot.texts is None:
            continue
        name = source.value(slot.local)
        end = f"{name} - 1" if slot.terminated else name
        lines += [f"    if missing & {1 << slot.index}:",
                  f"        {name} = {source.value(slot.absent)}",
                  "    else:",
                  f"        start = position + {slot.text_at}",
                  f"        {name} = {source.value(slot.texts)}[data[start:start + {end}]]"]
    lines += [f"    item = {source.value(item)}",
              f"    append(item if not truncated else {source.value(cut)}(item, truncated))"]
    return _compiled_parser(lines, source)


def _compiled_parser(lines, source):
    text = "\n".join(lines) + "\n"
    code = _compiled.get(text)
    if code is None:
        code = _compiled[text] = compile(text, "<sdtrace parser>", "exec")
    namespace = source.namespace
    exec(code, namespace)
    return namespace["parse"]


def _local(field):
    return field.local if isinstance(field, String) else field


_PARSER_NAMES = {"data", "position", "append", "size", "raw", "start", "parse", "item", "span",
                 "_"}
_compiled = {}      # parser source -> code object


class _Source:
    """Renders descriptions as expressions, naming their Constants in `namespace`."""

    def __init__(self, locals_):
        self.namespace = {}
        self._names = {}        # (id of a Constant's value, its hint) -> its name
        self._taken = _PARSER_NAMES | {"ts", "pid", "tid", "cpu"} | {
            local.name for local in locals_}

    def value(self, description):
        kind = type(description)
        if kind is Local:
            if description.name not in self._taken:
                raise ValueError(f"not a parser variable: {description.name!r}")
            return description.name
        if kind is Constant:
            return self._constant(description)
        if kind is Call:
            arguments = ", ".join(map(self.value, description.arguments))
            return f"{self.value(description.function)}({arguments})"
        if kind is Arithmetic:
            left = self.value(description.left)
            if type(description.left) is Arithmetic:
                left = f"({left})"
            return f"{left} {description.operator} {description.right}"
        if kind is Text:
            return "f" + repr("".join(map(self._piece, description.pieces)))
        if kind is Tuple:
            items = [self.value(item) for item in description.items]
            return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
        if kind is List:
            return f"[{', '.join(map(self.value, description.items))}]"
        raise TypeError(f"not an item description: {description!r}")

    def _piece(self, piece):
        if isinstance(piece, str):
            return piece.replace("{", "{{").replace("}", "}}")
        if type(piece) is Format:
            return (f"{{{self.value(piece.value)}:{piece.spec}}}" if piece.spec
                    else f"{{{self.value(piece.value)}}}")
        return f"{{{self.value(piece)}}}"

    def _constant(self, constant):
        key = (id(constant.value), constant.hint)
        name = self._names.get(key)
        if name is None:
            name, number = constant.hint, 1
            while name in self._taken:
                number += 1
                name = f"{constant.hint}{number}"
            self._taken.add(name)
            self._names[key] = name
            self.namespace[name] = constant.value
        return name
