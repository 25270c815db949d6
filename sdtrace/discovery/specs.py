"""Probe specs -> the probe sites they select.

A spec is ``[TARGET:]PROVIDER:NAME[(TYPE,...)]``:

* ``TARGET`` is a path or a library name (see targets.py);
* ``PROVIDER`` and ``NAME`` are shell globs;
* the optional ``(TYPE,...)`` list is positional and overrides how arguments
  are read: ``str`` reads a NUL-terminated string at the argument's value,
  ``s8``..``u64`` reinterpret it as an integer of that size, an empty entry
  keeps the note's own type.

A spec of one field is a target and selects all of its probes.  A spec with
two fields has no target: the probes are searched in the objects of the
process (``-p``) or command (``-c``) being traced.
"""
import fnmatch
from collections import namedtuple

from ..errors import BadSpec, ProbeNotFound, SdtraceError

ARGUMENT_TYPES = {"str", "s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64"}


class ProbeSpec(namedtuple("ProbeSpec", "text target provider name types")):
    """A parsed spec: `target` is a path or library name (None: search the
    context), `provider` and `name` are globs, `types` holds per argument a
    type from ARGUMENT_TYPES or None."""
    __slots__ = ()

    def matches(self, probe):
        return self.matches_name(probe.provider, probe.name)

    def matches_name(self, provider, name):
        return (fnmatch.fnmatchcase(provider, self.provider)
                and fnmatch.fnmatchcase(name, self.name))


def parse_spec(text):
    """Parse one spec; BadSpec names the spec and what is wrong with it."""
    body, types = text.strip(), ()
    if not body:
        raise BadSpec(text, "empty")
    if body.endswith(")"):
        opening = body.rfind("(")
        if opening < 0:
            raise BadSpec(text, "')' without '('")
        types = tuple(_argument_type(text, entry) for entry in body[opening + 1:-1].split(","))
        body = body[:opening]
    elif "(" in body:
        raise BadSpec(text, "'(' without ')'")
    fields = body.rsplit(":", 2)
    if len(fields) == 1:
        target, provider, name = fields[0], "*", "*"
    elif len(fields) == 2:
        target, (provider, name) = None, fields
    else:
        target, provider, name = fields
    if target == "" or not provider or not name:
        raise BadSpec(text, "expected [TARGET:]PROVIDER:NAME[(TYPE,...)]")
    return ProbeSpec(text, target, provider, name, types)


def _argument_type(text, entry):
    entry = entry.strip()
    if not entry:
        return None
    if entry not in ARGUMENT_TYPES:
        raise BadSpec(text, f"unknown argument type {entry!r} "
                            f"(expected one of {', '.join(sorted(ARGUMENT_TYPES))} or empty)")
    return entry


def context_objects(pid=None, command=None):
    """The objects that specs without a target are searched in: those mapped by
    process `pid`, or those the command `command` (an argv list) will map."""
    from . import targets

    if pid is not None:
        return targets.process_objects(pid)
    if command is not None:
        if not command:
            raise SdtraceError("-c: empty command")
        return targets.command_objects(command[0])
    return ()


def select_probes(specs, context_files=()):
    """[(probe, spec)] for every site that a spec selects, each site once, in order.

    `context_files` are the objects searched by specs without a target.  A
    spec that selects nothing is an error naming the spec and where it looked;
    a site several specs select keeps the first spec (and its types).
    """
    from . import notes, targets

    cache = {}

    def probes_of(path):
        if path not in cache:
            cache[path] = notes.read_probes(path)
        return cache[path]

    selected = {}
    for spec in specs:
        if spec.target is not None:
            files = [targets.resolve_target(spec.target)]
        elif context_files:
            files = list(context_files)
        else:
            raise SdtraceError(f"probe spec {spec.text!r} names no target: "
                               "write TARGET:PROVIDER:NAME or give -p PID / -c CMD")
        found = [(probe, spec) for path in files for probe in probes_of(path) if spec.matches(probe)]
        if not found:
            where = files[0] if len(files) == 1 else f"{len(files)} objects"
            if spec.target is not None and not probes_of(files[0]):
                raise ProbeNotFound(spec.text, where,
                                    f"{files[0]}: no SDT notes (.note.stapsdt) in this file")
            raise ProbeNotFound(spec.text, where)
        for probe, spec in found:
            selected.setdefault((probe.file, probe.offset, probe.provider, probe.name),
                                (probe, spec))
    return list(selected.values())
