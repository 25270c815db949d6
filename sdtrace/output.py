"""Output: how probes and events are written, for people and for programs.

People get aligned tables and one line per event; programs get JSON lines
(``--json``) whose field names are part of sdtrace's contract.
"""
import json
from json.encoder import encode_basestring_ascii as _quote  # C-accelerated JSON string quoting


def table(header, rows):
    """Rows of strings as aligned columns, the last column left ragged."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


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


def probe_record(probe):
    """The JSON object `sdtrace list --json` writes for one probe site."""
    return {
        "file": probe.file,
        "provider": probe.provider,
        "name": probe.name,
        "offset": probe.offset,
        "address": probe.address,
        "semaphore": probe.semaphore,
        "semaphore_address": probe.semaphore_address or None,
        "semaphore_error": probe.semaphore_error,
        "args": probe.args,
        "operands": [operand_record(operand) for operand in probe.operands],
    }


def probe_json_lines(probes):
    return "".join(json.dumps(probe_record(probe)) + "\n" for probe in probes)


def probe_table(probes):
    from .operands import describe

    rows = [
        [probe.file, probe.qualified_name, f"0x{probe.offset:x}",
         f"0x{probe.semaphore:x}" if probe.semaphore is not None
         else ("!" if probe.semaphore_error else "-"),
         str(len(probe.operands)), "  ".join(describe(operand) for operand in probe.operands)]
        for probe in probes
    ]
    return table(["FILE", "PROBE", "OFFSET", "SEMAPHORE", "ARGS", "OPERANDS"], rows)


# -- events ---------------------------------------------------------------------
# Records are (ts, pid, tid, cpu, comm, site, args); see events.py.  The JSON
# writer precomputes each site's constant part once and formats the rest with
# plain string operations: the hot loop must keep up with the kernel.

def _json_value(value):
    if value is None:
        return "null"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, float):
        return json.dumps(value) if value == value and abs(value) != float("inf") else "null"
    return str(value)


def _human_value(value):
    if value is None:
        return "?"
    if isinstance(value, str):
        return _quote(value)
    return str(value)


def _plain_integers(site):
    """True when every argument of the site is a fetched integer (the common, fast case)."""
    return all(plan.fetched and plan.convert is None and not plan.fetch.endswith(":string")
               for plan in site.plans)


class EventWriter:
    """Formats records as JSON lines or as human lines, one per event."""

    def __init__(self, json_lines):
        self.json_lines = json_lines
        self._prefixes = {}   # site -> (constant text, argument formatter)

    def _site_parts(self, site):
        parts = self._prefixes.get(site)
        if parts is None:
            value = str if _plain_integers(site) else (_json_value if self.json_lines else _human_value)
            separator = ", " if self.json_lines else " "
            if self.json_lines:
                constant = (f'"probe": {_quote(site.probe)}, "file": {_quote(site.file)}, "args": [')
            else:
                constant = f"{site.probe}:"
            parts = self._prefixes[site] = (constant, lambda args: separator.join(map(value, args)))
        return parts

    def format(self, records):
        """The text of a batch of records."""
        site_parts = self._site_parts
        quote = _quote
        lines = []
        append = lines.append
        if self.json_lines:
            for ts, pid, tid, cpu, comm, site, args in records:
                constant, arguments = site_parts(site)
                append(f'{{"ts": {ts}, "pid": {pid}, "tid": {tid}, "cpu": {cpu}, '
                       f'"comm": {quote(comm or "")}, {constant}{arguments(args)}]}}\n')
        else:
            for ts, pid, tid, cpu, comm, site, args in records:
                constant, arguments = site_parts(site)
                append(f"{comm or '?':>16} {pid:>7}/{tid:<7} [{cpu:03d}] "
                       f"{ts // 1000000000}.{ts % 1000000000 // 1000:06d}: {constant} "
                       f"{arguments(args)}\n")
        return "".join(lines)


def summary(counts, lost):
    """The end-of-trace summary for stderr; its last line is fixed for scripts."""
    lines = [f"{count:>10}  {probe}" for probe, count in
             sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    total = sum(counts.values())
    lines.append(f"sdtrace: {total} events, {lost} lost")
    return "\n".join(lines) + "\n"
