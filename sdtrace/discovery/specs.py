"""Probe specs -> the sites they select.

A spec is ``[TARGET:]PROVIDER:NAME[(TYPE,...)]``, or one of the short forms
bpftrace users type:

    FILE                     every probe of FILE
    FILE:*  FILE:NAME        every probe of FILE / any provider's NAME, when
                             FILE has a ``/`` or a ``.`` (a provider, a C
                             identifier, has neither: ``python:*`` is a provider)
    FILE::NAME               NAME of any provider

* ``TARGET``/``FILE`` is a path, a glob of paths or a library name (see
  targets.py);
* ``PROVIDER`` and ``NAME`` are shell globs;
* the optional ``(TYPE,...)`` list is positional and overrides how arguments
  are read: ``str`` reads a NUL-terminated string at the argument's value,
  ``s8``..``u64`` reinterpret it as an integer of that size, an empty entry
  keeps the note's own type.

A spec without a target is searched in the objects of the process (``-p``)
or command (``-c``) being traced (targets.ObjectFile); with them, a target
also names first what that process maps.
"""
import fnmatch
import os
from collections import namedtuple

from ..errors import BadSpec, ProbeNotFound, SdtraceError

ARGUMENT_TYPES = {"str", "s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64"}


class ProbeSpec(namedtuple("ProbeSpec", "text target provider name types")):
    """A parsed spec: `target` is a path or library name (None: search the
    context), `provider` and `name` are globs, `types` holds per argument a
    type from ARGUMENT_TYPES or None."""
    __slots__ = ()

    def matches(self, site):
        return self.matches_name(site.provider, site.name)

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
    if len(fields) == 1:                                    # FILE
        target, provider, name = fields[0], "*", "*"
    elif len(fields) == 2 and ("/" in fields[0] or "." in fields[0]):
        target, provider, name = fields[0], "*", fields[1]  # FILE:NAME
    elif len(fields) == 2:
        target, (provider, name) = None, fields
    else:
        target, provider, name = fields
        if target and not provider:                         # FILE::NAME
            provider = "*"
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


def context_objects(pid=None, command=None, warn=None):
    """The objects that specs without a target are searched in (targets.ObjectFile):
    those mapped by process `pid`, or those the command `command` (an argv list)
    will map.  `warn` hears of a process's files that cannot be opened."""
    from . import targets

    if pid is not None:
        return targets.process_objects(pid, warn)
    if command is not None:
        if not command:
            raise SdtraceError("-c: empty command")
        return targets.command_objects(command[0])
    return ()


def select_probes(specs, context=(), waiting=None):
    """[(site, spec)] for every site that a spec selects, each site once, in order.

    `context` holds the targets.ObjectFiles searched by specs without a target
    (and matched first by a spec's target).  A spec that selects nothing is an
    error naming the spec and where it looked -- unless `waiting` is a list
    and the spec has no target: it then goes in that list, to wait for an
    object the process maps later; a site several specs select keeps the
    first spec (and its types).
    """
    from . import notes, targets

    cache = {}   # path -> ((device, inode), its sites)

    def sites_of(path):
        if path not in cache:
            sites = notes.read_probes(path)
            status = os.stat(path)
            cache[path] = (status.st_dev, status.st_ino), sites
        return cache[path]

    selected = {}
    for spec in specs:
        if spec.target is not None:
            files = targets.resolve_target(spec.target, context)
        elif context:
            files = [item.path for item in context]
        else:
            raise SdtraceError(f"probe spec {spec.text!r} names no target: "
                               "write TARGET:PROVIDER:NAME or give -p PID / -c CMD")
        found, noted = [], False
        for path in files:
            identity, sites = sites_of(path)
            noted = noted or bool(sites)
            found += [(identity, site) for site in sites if spec.matches(site)]
        if not found and waiting is not None and spec.target is None:
            waiting.append(spec)
        elif not found:
            raise _not_found(spec, files, noted, context)
        for identity, site in found:   # one file may be named by several paths (symlinks)
            selected.setdefault((identity, site.offset, site.provider, site.name), (site, spec))
    return list(selected.values())


def _not_found(spec, files, noted, context):
    """The ProbeNotFound for `spec`; when no file searched has notes (`noted`
    false), it says so: the cause is the files, not the spec."""
    where = files[0] if len(files) == 1 else f"{len(files)} objects"
    if noted:
        return ProbeNotFound(spec.text, where)
    if len(files) == 1:
        return ProbeNotFound(spec.text, where,
                             f"{files[0]}: no SDT notes (.note.stapsdt) in this file")
    whose = f"of {context[0].owner}" if spec.target is None else f"that {spec.target} names"
    return ProbeNotFound(spec.text, where, f"no probe matches {spec.text!r}: none of the "
                                           f"{len(files)} ELF objects {whose} has SDT notes")
