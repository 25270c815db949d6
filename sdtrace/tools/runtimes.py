"""Which runtime a tool is asked about, and the probe specs that reach it.

A tool names the probes it needs per runtime (``Runtime.provider`` and the
probe names); this module finds which runtimes are there and writes the
specs:

* with TARGETs (paths, globs or library names), the runtimes whose
  provider has notes in those files, each spec on its file
  (``/usr/lib/postgresql/15/bin/postgres:postgresql:query__start``);
* with ``-p PID``, the runtimes whose provider has notes in an object the
  process maps;
* with ``-c CMD``, those in an object the command will load -- and, since a
  runtime may come later by dlopen (the ``java`` launcher loads libjvm.so
  so), every other runtime the tool serves, as specs that wait for it
  (engine/session.py).

No runtime found is one line naming what was searched and the runtimes the
tool serves.
"""
from dataclasses import dataclass

from ..errors import SdtraceError


@dataclass(frozen=True)
class Runtime:
    """A runtime as the tools see it: its name for people and its USDT provider."""
    name: str
    provider: str


PYTHON = Runtime("Python", "python")
JAVA = Runtime("Java (HotSpot)", "hotspot")
POSTGRESQL = Runtime("PostgreSQL", "postgresql")


@dataclass(frozen=True)
class Found:
    """A runtime a session will reach: through `target` (None: the objects of -p/-c),
    `waiting` when it is not loaded yet (-c) and its specs wait for it."""
    runtime: Runtime
    target: str = None
    waiting: bool = False

    def spec(self, probe, types=""):
        """The spec of `probe` of this runtime: ``[TARGET:]PROVIDER:PROBE[(TYPES)]``."""
        head = f"{self.target}:" if self.target else ""
        return f"{head}{self.runtime.provider}:{probe}{f'({types})' if types else ''}"


def find(args, runtimes):
    """[Found] for the runtimes (of `runtimes`, in order) that the tool's session
    reaches, from args.targets, args.pid or args.command."""
    from ..discovery import notes, specs, targets

    served = ", ".join(runtime.name for runtime in runtimes)
    targets_given = getattr(args, "targets", None) or []
    if targets_given:
        found = []
        for text in targets_given:
            providers = {site.provider for path in targets.resolve_target(text)
                         for site in notes.read_probes(path)}
            found += [Found(runtime, text) for runtime in runtimes
                      if runtime.provider in providers]
            if not any(item.target == text for item in found):
                raise SdtraceError(f"{text}: no probes of {served} in it")
        return found
    if args.pid is None and args.command is None:
        raise SdtraceError(f"give -p PID, -c CMD or a TARGET file of {served}")
    command = None
    if args.command is not None:
        import shlex

        command = shlex.split(args.command)
    objects = specs.context_objects(args.pid, command)
    providers = {site.provider for item in objects for site in notes.read_probes(item.path)}
    found = [Found(runtime) for runtime in runtimes if runtime.provider in providers]
    if command is not None:
        found += [Found(runtime, waiting=True) for runtime in runtimes
                  if runtime.provider not in providers]
    if not found:
        raise SdtraceError(f"process {args.pid} runs none of {served}: no probes of theirs "
                           f"in the {len(objects)} objects it maps")
    return found
