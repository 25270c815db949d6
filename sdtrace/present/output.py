"""Output: how probes and events are written, for people and for programs.

People get aligned tables and one line per event; programs get JSON lines
(``--json``) whose field names are part of sdtrace's contract.
"""
import functools
import json
import os
import select
from dataclasses import asdict
from json.encoder import encode_basestring_ascii as quote  # a str as a JSON string (in C)


def table(header, rows, right=()):
    """Rows of strings as aligned columns: the columns whose indexes are in
    `right` right-justified, the others left-justified, the last one ragged."""
    rows = [header, *rows]
    last = len(header) - 1
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if column in right else cell if column == last
                 else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def open_output(path):
    """`path` opened for writing events (block-buffered); SdtraceError if it cannot be."""
    from ..errors import SdtraceError

    try:
        return open(path, "w", buffering=1 << 20)
    except OSError as error:
        raise SdtraceError(f"{path}: {error.strerror}") from None


class WholeLines:
    """A text stream over `stream`'s file descriptor that hands the kernel whole lines
    only, at most PIPE_BUF bytes per write(2) where the lines allow (a write that size is
    atomic on a pipe): text after the last newline waits for its newline, or for
    flush().  A -c command shares sdtrace's stdout; its output then falls between
    sdtrace's lines, never inside one (through a block buffer it could: a flow --json
    line once came cut by a java program's output)."""

    def __init__(self, stream):
        stream.flush()
        self._fd = stream.fileno()
        self._encoding, self._errors = stream.encoding, stream.errors
        self._tail = b""

    def write(self, text):
        data = self._tail + text.encode(self._encoding, self._errors)
        end = data.rfind(b"\n") + 1
        self._tail = data[end:]
        self._write(memoryview(data)[:end])
        return len(text)

    def flush(self):
        tail, self._tail = self._tail, b""
        self._write(memoryview(tail))

    def _write(self, data):
        for chunk in line_chunks(data, select.PIPE_BUF):
            while chunk:
                chunk = chunk[os.write(self._fd, chunk):]


def whole_lines(stream):
    """A WholeLines over `stream`, or `stream` itself if it has no file descriptor (a
    StringIO, pytest's capture)."""
    try:
        return WholeLines(stream)
    except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation is both
        return stream


def line_chunks(data, limit):
    """`data` (bytes or a memoryview) cut after newlines into pieces of at most `limit`
    bytes; a line longer than that is a piece alone."""
    start, end = 0, len(data)
    while start < end:
        stop = end
        if end - start > limit:
            stop = start + (bytes(data[start:start + limit]).rfind(b"\n") + 1
                            or bytes(data[start:]).find(b"\n") + 1 or end - start)
        yield data[start:stop]
        start = stop


def finite(value):
    """`value` as JSON can hold it: None for a float NaN or infinity."""
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return None
    return value


def operand_record(operand):
    """The JSON form of one typed operand (only the fields its kind uses)."""
    record = {"text": operand.text, "size": operand.size, "signed": operand.signed,
              "float": operand.is_float, "kind": operand.kind}
    for field in ("register", "base", "index", "symbol", "error"):
        value = getattr(operand, field)
        if value is not None:
            record[field] = value
    if operand.kind == "sib":
        record["scale"] = operand.scale
    if operand.kind in ("memory", "sib", "rip"):
        record["offset"] = operand.offset
    if operand.bit_offset:
        record["bit_offset"] = operand.bit_offset
    if operand.value is not None:
        record["value"] = operand.value
    if operand.address is not None:
        record["address"] = operand.address
    return record


def _probe_json_line(probe):
    """The JSON object `sdtrace list --json` writes for one probe site, as a line."""
    head = json.dumps({
        "file": probe.file,
        "provider": probe.provider,
        "name": probe.name,
        "offset": probe.offset,
        "address": probe.address,
        "site_error": probe.site_error,
        "semaphore": probe.semaphore,
        "semaphore_address": probe.semaphore_address or None,
        "semaphore_error": probe.semaphore_error,
        "args": probe.args,
    })
    return (f'{head[:-1]}, "operands": {_operands_json(probe.operands)}, '
            f'"arg_names": {json.dumps(_argument_names(probe))}}}\n')


@functools.lru_cache(maxsize=4096)   # sites repeat a few hundred operand lists: encode each once
def _operands_json(operands):
    return json.dumps([operand_record(operand) for operand in operands])


def _argument_names(probe):
    """The documented argument names of a known provider's probe (providers.py), or None."""
    from ..discovery.providers import argument_names

    names = argument_names(probe.provider, probe.name, len(probe.operands))
    return list(names) if names else None


def probe_json_lines(probes):
    return "".join(map(_probe_json_line, probes))


def probe_table(probes):
    from ..discovery.operands import describe

    def operands(probe):
        names = _argument_names(probe) or [""] * len(probe.operands)
        return "  ".join(f"{name}={describe(operand)}" if name else describe(operand)
                         for name, operand in zip(names, probe.operands))

    rows = [
        [probe.file, probe.qualified_name, f"0x{probe.offset:x}",
         f"0x{probe.semaphore:x}" if probe.semaphore is not None
         else ("!" if probe.semaphore_error else "-"),
         str(len(probe.operands)), operands(probe)]
        for probe in probes
    ]
    return table(["FILE", "PROBE", "OFFSET", "SEMAPHORE", "ARGS", "OPERANDS"], rows)


# -- events ---------------------------------------------------------------------
# A LineEmitter is an emitter for events.py's generated parsers: each sample
# becomes (ts, probe, text) with its line already formatted by one f-string per
# site, whose constant part (probe, file) is computed once.  Fetched strings
# arrive quoted (cached per distinct value), ints are formatted by the
# f-string itself; only converted values (floats) and constants go through
# _json_value / _human_value.

def _json_value(value):
    if value is None:
        return "null"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, float):
        return json.dumps(finite(value))
    return str(value)


def _human_value(value):
    if value is None:
        return "?"
    if isinstance(value, str):
        return quote(value)
    return str(value)


def _human_comm(comm):
    return f"{comm:>16}"


def _joined(groups, separator):
    """Text pieces: each group's (a piece, or a tuple of pieces), with `separator` between."""
    joined = []
    for group in groups:
        if joined:
            joined.append(separator)
        joined += group if isinstance(group, tuple) else (group,)
    return joined


class LineEmitter:
    """Formats events as JSON lines or as human lines, one per event (an events.Emitter)."""

    def __init__(self, json_lines):
        self.json_lines = json_lines
        if json_lines:
            self.comm_text = self.string_text = quote
            self.comm_absent, self.string_absent = '""', "null"
        else:
            self.comm_text, self.string_text = _human_comm, quote
            self.comm_absent, self.string_absent = _human_comm("?"), "?"
        self.value_absent = self.string_absent

    def cut(self, item, truncated):
        """The line of an event with strings cut at the string size says which:
        ``"truncated": [indexes]`` in JSON, ``[truncated: indexes]`` for people."""
        from ..engine.events import truncated_indexes

        ts, probe, text = item
        indexes = truncated_indexes(truncated)
        if self.json_lines:
            return ts, probe, f'{text[:-2]}, "truncated": {indexes}}}\n'
        return ts, probe, f"{text[:-1]} [truncated: {', '.join(map(str, indexes))}]\n"

    def item(self, site, arguments, comm=None):
        """The (ts, probe, text) item of `site`'s events (a codegen description).

        `comm` describes the comm the line shows (the parser's comm if None).
        The item holds only a str and ints: the cyclic GC untracks such tuples
        at its first pass instead of carrying them through its generations.
        """
        from ..discovery.providers import argument_names
        from ..engine import codegen
        from ..engine.events import VALUE

        comm = codegen.COMM if comm is None else comm
        formatter = codegen.Constant(_json_value if self.json_lines else _human_value,
                                     "json_value" if self.json_lines else "human_value")
        values = [codegen.Call(formatter, argument.value) if argument.kind == VALUE
                  else argument.value for argument in arguments]
        if self.json_lines:
            site_text = f'"probe": {quote(site.probe)}, "file": {quote(site.file)}, "args": ['
            pieces = ['{"ts": ', codegen.TS, ', "pid": ', codegen.PID, ', "tid": ', codegen.TID,
                      ', "cpu": ', codegen.CPU, ', "comm": ', comm, ", ",
                      codegen.Constant(site_text, "site_text"), *_joined(values, ", "), "]"]
            names = argument_names(site.provider, site.name, len(values))
            if names:   # a known provider's argument names (providers.py), our own text
                named = [(f"{quote(name)}: ", value) for name, value in zip(names, values)]
                pieces += [', "named": {', *_joined(named, ", "), "}"]
            pieces.append("}\n")
        else:
            seconds = codegen.Arithmetic(codegen.TS, "//", 1_000_000_000)
            micros = codegen.Arithmetic(codegen.Arithmetic(codegen.TS, "%", 1_000_000_000),
                                        "//", 1000)
            pieces = [comm, " ", codegen.Format(codegen.PID, ">7"), "/",
                      codegen.Format(codegen.TID, "<7"), " [", codegen.Format(codegen.CPU, "03d"),
                      "] ", seconds, ".", codegen.Format(micros, "06d"), ": ",
                      codegen.Constant(f"{site.probe}:", "site_text"), " ",
                      *_joined(values, " "), "\n"]
        return codegen.Tuple(codegen.TS, codegen.Constant(site.probe, "probe"),
                             codegen.Text(*pieces))


def summary_line(events, lost):
    """The line that ends every session's stderr; its form is fixed for scripts."""
    return f"sdtrace: {events} events, {lost} lost\n"


def lost_warning(count):
    """The warning for `count` events the rings had no room for (without "sdtrace: ")."""
    return f"lost {count} events (ring full; try --buffer-pages)"


def summary(counts, lost):
    """The end-of-trace summary for stderr: hits per probe, then summary_line."""
    lines = [f"{count:>10}  {probe}\n" for probe, count in
             sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return "".join(lines) + summary_line(sum(counts.values()), lost)


# -- semaphore audit ------------------------------------------------------------

def semaphore_state_record(state):
    """The JSON object `sdtrace semaphores --json` writes for one semaphore of one process."""
    return asdict(state)


def semaphore_state_table(states):
    """The table `sdtrace semaphores` prints: one row per semaphore of a process (audit.py)."""
    rows = [[str(state.pid), state.comm, state.file, state.qualified_name,
             f"0x{state.semaphore:x}", f"0x{state.address:x}", str(state.value),
             "yes" if state.armed else "no", "LEAKED" if state.leaked else ""]
            for state in states]
    return table(["PID", "COMM", "FILE", "PROBE", "SEMAPHORE", "ADDRESS", "VALUE", "ARMED",
                  "LEAKED"], rows)
