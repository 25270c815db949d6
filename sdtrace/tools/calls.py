"""``sdtrace calls``: how often each function or method runs and, with
``--latency``, how long it takes (bcc's ``ucalls``, ``ucalls -L``).

Python: ``python:function__entry`` (and ``function__return``) per file and
function; the session raises ``python:line``'s semaphore without arming it,
since CPython 3.11 fires them for every call only then
(providers.SEMAPHORE_COMPANIONS).  Java (HotSpot): ``hotspot:method__entry``
(and ``method__return``) per class and method, which fire only in a JVM
started with ``-XX:+ExtendedDTraceProbes`` (or ``DTraceMethodProbes``:
providers.RUNTIME_RULES; ``--jvm-probes`` gives it to ``-c``'s JVM); the
names are (pointer, length) strings that only the bpf executor reads.

Counts are a Count plan over the entry probe; ``--latency`` is a Latency
plan from entry to return matched on the function's names, so a recursion
pairs each return with its own entry.  Both are keyed by what the END knows
as its START did (the names, and the thread with ``--by thread``), so the
BPF executor counts and times every call in the kernel, exactly.
"""
import json
import sys

from ..errors import SdtraceError
from .runtimes import JAVA, PYTHON

HELP = "calls per function or method, with --latency their durations (like ucalls)"
DESCRIPTION = ("Count the calls of each Python function or Java method of a process "
               "(-p), a command (-c) or every process running TARGET, and with --latency "
               "their total and mean durations. Python needs nothing; Java needs "
               "-XX:+ExtendedDTraceProbes (--jvm-probes adds it to -c's JVM) and the bpf "
               "executor.")
# per runtime: entry probe, return probe, (argument key, column) of the names
PROBES = {PYTHON: ("function__entry", "function__return",
                   (("filename", "file"), ("funcname", "function"))),
          JAVA: ("method__entry", "method__return",
                 (("class_name_ptr", "class"), ("method_name_ptr", "method")))}


def add_arguments(parser):
    from .runtimes import add_jvm_probes_option

    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")
    parser.add_argument("--latency", action="store_true",
                        help="also time each call (entry to return): total and mean")
    parser.add_argument("--by", choices=("function", "thread"), default="function",
                        help="one row per function (default), or per function and thread")
    parser.add_argument("--top", type=int, metavar="N", help="show the N most called")
    add_jvm_probes_option(parser)


def check_call_probes(args, found, warn):
    """Ends in one line where the runtimes `found` cannot serve their entry and return
    probes: a JVM without the method-probes flag (runtimes.check_rules), or Java's
    names on an executor that cannot read them."""
    from . import runtimes

    runtimes.check_rules(args, found, [probe for item in found
                                       for probe in PROBES[item.runtime][:2]], warn)
    if any(item.runtime == JAVA for item in found):
        runtimes.require_bpf(args, "Java's class and method names are (pointer, length) "
                                   "strings")


def run(args):
    from ..discovery.specs import parse_spec
    from ..present import aggregate, runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, tuple(PROBES)), args)
    if len(found) > 1:         # the keys are the names, whose arguments differ by runtime
        raise SdtraceError(f"calls counts one runtime at a time, and this session could "
                           f"reach {' and '.join(item.runtime.name for item in found)}: name "
                           "the runtime's file as TARGET")
    entry, exit_, names = PROBES[found[0].runtime]
    check_call_probes(args, found, runner.warn)
    name_keys = aggregate.parse_keys(",".join(key for key, _column in names))
    keys = name_keys + (aggregate.parse_keys("tid") if args.by == "thread" else ())
    columns = [column for _key, column in names] + (["tid"] if args.by == "thread" else [])
    if args.latency:
        plan = aggregate.Latency(*(parse_spec(found[0].spec(probe)) for probe in (entry, exit_)),
                                 match=name_keys, keys=keys)
        specs = [item.spec(probe) for item in found for probe in PROBES[item.runtime][:2]]
    else:
        plan = aggregate.Count(keys)
        specs = [item.spec(PROBES[item.runtime][0]) for item in found]
    result, session = runner.aggregate(args, specs, plan)
    rows = [(values, size if isinstance(size, int) else size.count,
             None if isinstance(size, int) else size.total) for values, size in result.rows]
    rows = rows[:args.top] if args.top else rows
    sys.stdout.write(_json(rows, columns) if args.json else _table(rows, columns, args.latency))
    return session.exit_status or 0


def _json(rows, columns):
    lines = []
    for values, count, total in rows:
        record = {**dict(zip(columns, values)), "count": count}
        if total is not None:
            record.update(total_ns=total, mean_ns=total // count if count else None)
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


def _table(rows, columns, latency):
    from ..present.output import table

    header = ["CALLS", *(["TOTAL(ms)", "MEAN(us)"] if latency else []),
              *(column.upper() for column in columns)]
    lines = [[str(count), *([f"{total / 1e6:.3f}", f"{total / count / 1e3:.3f}"]
                            if latency else []), *("?" if value is None else str(value)
                                                   for value in values)]
             for values, count, total in rows]
    return table(header, lines, right=set(range(3 if latency else 1))) + "\n"
