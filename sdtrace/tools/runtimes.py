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


JVM_PROBES_HELP = ("with -c: start the JVM with the -XX:+DTrace*Probes flag the tool's probes "
                   "need, put in JAVA_TOOL_OPTIONS")


def add_jvm_probes_option(parser):
    """--jvm-probes, for a tool whose HotSpot probes fire only under a flag."""
    parser.add_argument("--jvm-probes", action="store_true", help=JVM_PROBES_HELP)


def check_rules(args, found, probes, warn):
    """Ends with a one-line error when a runtime the session reaches cannot fire
    `probes` (its provider's probe names) for want of what providers.RUNTIME_RULES
    names (discovery/rules.py): a JVM flag -p's JVM was started without or -c's
    command does not give (--jvm-probes gives it, in JAVA_TOOL_OPTIONS), an
    environment variable.  System-wide, `warn` says once what the processes need."""
    import shlex

    from ..discovery import providers, rules

    for item in found:
        needed = rules.needed((item.runtime.provider, probe) for probe in probes)
        for rule, probe in needed.items():
            setting = rules.setting(rule)
            if args.pid is None and args.command is None:
                warn(f"{probe} fires only in processes started with {setting}")
                continue
            if rule.kind == providers.JVM_FLAG and args.command is not None \
                    and getattr(args, "jvm_probes", False):
                give_jvm_flag(rule)
                continue
            lack = rules.unmet(rule, args.pid,
                               None if args.command is None else shlex.split(args.command))
            if lack is None:
                continue
            if args.pid is not None:
                raise SdtraceError(f"{lack}: {probe} never fires in it; restart it with "
                                   f"{setting}")
            if rule.kind == providers.JVM_FLAG:
                raise SdtraceError(f"{probe} fires only in a JVM started with {setting}: add "
                                   f"--jvm-probes (puts it in JAVA_TOOL_OPTIONS) or put it in "
                                   f"the command")
            raise SdtraceError(f"{probe} fires only with {setting} in the environment, and "
                               f"the command runs without it")


def give_jvm_flag(rule):
    """--jvm-probes: the JVM flag of `rule` goes in JAVA_TOOL_OPTIONS, for -c's JVM."""
    import os

    from ..discovery import rules

    options = os.environ.get("JAVA_TOOL_OPTIONS", "")
    os.environ["JAVA_TOOL_OPTIONS"] = f"{options} {rules.setting(rule)}".strip()


def require_bpf(args, why):
    """Ends with a one-line error unless the session will run on the bpf executor
    (--executor, or what auto takes here): `why` says what the tool reads that the
    tracefs executor cannot."""
    import platform

    from ..engine.session import choose_executor

    executor, reason = choose_executor(args.executor, {platform.machine()})
    if executor != "bpf":
        raise SdtraceError(f"{why}: it needs the bpf executor, and the session would run on "
                           f"tracefs ({reason})")


def present(found, args):
    """The runtimes of `found` already there, if any: a -c command that maps one runtime
    is not waited on for another (a spec that waits holds every spec back until the
    session arms).  If all wait, a command whose program is a JDK's launcher waits for
    Java alone (discovery/jvm.java_home); otherwise all of them wait, and the session
    arms the first that comes."""
    there = [item for item in found if not item.waiting]
    if there or args.command is None:
        return there or found
    import shlex

    from ..discovery import jvm

    if jvm.java_home(shlex.split(args.command)[0]) is not None:
        return [item for item in found if item.runtime == JAVA] or found
    return found


def no_probe_for(found, what):
    """One line when every runtime found is Python: CPython 3.11 has no `what` probe."""
    if all(item.runtime == PYTHON for item in found):
        raise SdtraceError(f"Python has no {what} probe: CPython 3.11's python provider has "
                           "function__entry/return, line, gc__start/done, import__find__load__"
                           "start/done and audit; this tool serves Java (HotSpot)")
