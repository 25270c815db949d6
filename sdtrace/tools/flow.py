"""``sdtrace flow``: each call and return of a Python or Java program, as it
happens, indented by depth per thread (bcc's ``uflow``), and with
``--perfetto FILE`` each call as a slice on its thread's track.

The probes are those of ``sdtrace calls`` (calls.PROBES, with the same
runtime rules).  Every entry and return is a record: the depth of a thread
is counted here, in user space, from the entries and returns seen since the
session began, so a return from a frame entered before it does not go
below 0.  ``--filter GLOB`` keeps the calls whose ``module.function`` (Python:
file and function) or ``class.method`` (Java) matches, and their returns.
"""
import fnmatch
import json
import sys

from .calls import PROBES, check_call_probes

HELP = "calls and returns as they happen, indented per thread (like uflow)"
DESCRIPTION = ("Print each entry and return of Python functions or Java methods of a "
               "process (-p), a command (-c) or every process running TARGET, indented by "
               "depth per thread; --filter keeps calls whose file.function (class.method) "
               "matches GLOB; --perfetto writes each call as a slice.")
INDENT = "  "
ENTRIES = {entry for entry, _return, _names in PROBES.values()}
# where an entry's or return's names are, per provider: (file or class, function or method)
NAME_ARGUMENTS = {"python": (0, 1), "hotspot": (1, 3)}


def add_arguments(parser):
    from .runtimes import add_jvm_probes_option

    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")
    parser.add_argument("--filter", metavar="GLOB",
                        help="only calls whose module.function or class.method matches GLOB")
    parser.add_argument("--perfetto", metavar="FILE",
                        help="also write each call as a slice (FILE.pftrace: native protobuf, "
                             "else Chrome trace-event JSON)")
    add_jvm_probes_option(parser)


class Flow:
    """Writes entries and returns, indented by the depth of their thread."""

    def __init__(self, args, started_ns, timeline):
        self.json, self.filter, self.started_ns = args.json, args.filter, started_ns
        self.timeline = timeline
        self.stacks = {}        # tid -> [(entry record or None, name)]

    def add(self, records):
        from ..engine.events import ARGS, COMM, PID, SITE, TID, TS

        lines = []
        for record in records:
            site, tid = record[SITE], record[TID]
            stack = self.stacks.setdefault(tid, [])
            owner, function = NAME_ARGUMENTS[site.provider]
            name = f"{record[ARGS][owner]}.{record[ARGS][function]}"
            if site.name in ENTRIES:
                shown = self.filter is None or fnmatch.fnmatchcase(name, self.filter)
                stack.append((record if shown else None, name))
                depth, arrow = len(stack) - 1, "->"
            elif stack:
                start, name = stack.pop()
                shown, depth, arrow = start is not None, len(stack), "<-"
                if shown and self.timeline is not None:
                    self.timeline.slice(name, start, record, site.provider)
            else:
                continue           # the return of a frame entered before the session
            if not shown:
                continue
            if self.json:
                lines.append(json.dumps({"ts": record[TS], "pid": record[PID], "tid": tid,
                                         "comm": record[COMM], "probe": site.probe,
                                         "depth": depth, "call": name,
                                         "event": "entry" if arrow == "->" else "return"})
                             + "\n")
            else:
                lines.append(f"{(record[TS] - self.started_ns) / 1e9:>10.6f} {record[PID]:>7} "
                             f"{tid:>7}  {INDENT * depth}{arrow} {name}\n")
        if lines:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()


def run(args):
    import time

    from ..present import runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, tuple(PROBES)), args)
    check_call_probes(args, found, runner.warn)
    specs = [item.spec(probe) for item in found for probe in PROBES[item.runtime][:2]]
    timeline = None
    if args.perfetto is not None:
        from ..present.perfetto import timeline_writer

        timeline = timeline_writer(args.perfetto)
    if not args.json:
        sys.stdout.write(f"{'TIME(s)':>10} {'PID':>7} {'TID':>7}  CALL\n")
    try:
        session = runner.stream(args, specs, Flow(args, time.monotonic_ns(), timeline).add)
    finally:
        if timeline is not None:
            timeline.close()
    return session.exit_status or 0
