"""``sdtrace stat``: a top-like view of runtime events per process, every
interval (bcc's ``ustat``).

Per process: calls, garbage collections, object allocations, class loads
and thread starts, each the hits of one probe of its runtime (COLUMNS).
CPython 3.11 has calls (``function__entry``, with python:line's semaphore
raised by the session), collections (``gc__start``) and module loads
(``import__find__load__start``), and no allocation or thread probe; HotSpot
has them all, its calls and allocations only under -XX:+DTraceMethodProbes
and -XX:+DTraceAllocProbes (providers.RUNTIME_RULES): where a JVM lacks a
flag, that column is left out in one line, and ``--jvm-probes`` gives the
flags to ``-c``'s JVM.  Neither runtime has an exception probe.  A column a
runtime has no probe for shows ``-``.

The counts are one Count plan keyed by (pid, comm, probe), counted in the
kernel on the bpf executor, and shown per process; every ``--interval`` the
view shows the difference from the last one as rates, and at the end the
totals.
"""
import json
import sys

from .runtimes import JAVA, PYTHON

HELP = "runtime events per process every interval: calls, GC, allocations... (like ustat)"
DESCRIPTION = ("Show per process, every --interval, the rate of calls, garbage collections, "
               "object allocations, class loads and thread starts of Python and Java "
               "(HotSpot) processes (-p, -c, or every process running TARGET), then the "
               "totals. Java's calls and allocations need -XX:+DTraceMethodProbes and "
               "-XX:+DTraceAllocProbes (--jvm-probes adds them to -c's JVM).")
COLUMNS = ("calls", "gc", "objnew", "cload", "threads")
# per runtime: column -> its probe (a column absent here has no probe in that runtime)
PROBES = {PYTHON: {"calls": "function__entry", "gc": "gc__start",
                   "cload": "import__find__load__start"},
          JAVA: {"calls": "method__entry", "gc": "gc__begin", "objnew": "object__alloc",
                 "cload": "class__loaded", "threads": "thread__start"}}
RUNTIME_NAMES = {PYTHON.provider: "python", JAVA.provider: "java"}


def add_arguments(parser):
    from .runtimes import add_jvm_probes_option

    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="show the rates of every S seconds (default 1)")
    add_jvm_probes_option(parser)


def _probes(args, found, warn):
    """[(found item, column, probe)] to arm: a column whose probe needs what the runtime
    lacks (a JVM flag) is left out, in one line."""
    import shlex

    from ..discovery import rules
    from .runtimes import give_jvm_flag

    chosen = []
    for item in found:
        for column, probe in PROBES[item.runtime].items():
            rule = rules.needed([(item.runtime.provider, probe)])
            lack = None
            for need in rule:
                if args.command is not None and getattr(args, "jvm_probes", False):
                    give_jvm_flag(need)
                elif args.pid is not None or args.command is not None:
                    lack = rules.unmet(need, args.pid, None if args.command is None
                                       else shlex.split(args.command))
            if lack is not None:
                warn(f"no {column} column: {lack}")
                continue
            chosen.append((item, column, probe))
    return chosen


class View:
    """Turns Count results keyed by (pid, comm, probe) into per-process rows."""

    def __init__(self, columns_of_probe, as_json):
        self.columns_of_probe, self.as_json = columns_of_probe, as_json
        self.names = {}          # pid -> its comm, read while it ran

    def rows(self, result):
        """{(pid, comm): (runtime, {column: count})} of a CountResult; a process is one
        row whatever its threads' names, named by its comm (read once, while it runs;
        for one gone before, the name of its thread with most hits)."""
        from ..kernel.procfs import process_name

        counts_of, busiest = {}, {}
        for (pid, comm, probe), count in result.rows:          # largest first
            provider, column = self.columns_of_probe[probe]
            runtime, counts = counts_of.setdefault(pid, (RUNTIME_NAMES[provider], {}))
            counts[column] = counts.get(column, 0) + count
            busiest.setdefault(pid, comm)
        for pid in counts_of:
            if pid not in self.names:
                name = process_name(pid)
                self.names[pid] = busiest[pid] if name == "?" else name
        return {(pid, self.names[pid]): row for pid, row in counts_of.items()}

    def render(self, rows, seconds=None, extra=None):
        """Rows as JSON lines or a table: rates per second if `seconds`, else counts."""
        present = {column for _provider, column in self.columns_of_probe.values()}
        if self.as_json:
            return "".join(json.dumps({**(extra or {}), "pid": pid, "comm": comm,
                                       "runtime": runtime, **counts}) + "\n"
                           for (pid, comm), (runtime, counts) in sorted(rows.items()))
        from ..present.output import table

        def shown(counts, column):
            if column not in present:
                return "-"
            count = counts.get(column, 0)
            return f"{count / seconds:.0f}" if seconds else str(count)
        suffix = "/s" if seconds else ""
        header = ["PID", "COMM", "RUNTIME", *(column.upper() + suffix for column in COLUMNS)]
        lines = [[str(pid), comm or "?", runtime, *(shown(counts, column)
                                                    for column in COLUMNS)]
                 for (pid, comm), (runtime, counts) in sorted(rows.items())]
        return table(header, lines, right={0, *range(3, 3 + len(COLUMNS))}) + "\n"


def run(args):
    from ..present import aggregate, runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, tuple(PROBES)), args)
    chosen = _probes(args, found, runner.warn)
    if not chosen:
        from ..errors import SdtraceError

        raise SdtraceError("nothing to count: every column needs what the runtime lacks")
    view = View({f"{item.runtime.provider}:{probe}": (item.runtime.provider, column)
                 for item, column, probe in chosen}, args.json)
    plan = aggregate.Count(aggregate.parse_keys("pid,comm,probe"))
    last = []

    def on_interval(aggregator, elapsed):
        result = aggregator.result()
        delta = result.minus(last[0]) if last else result
        seconds = elapsed - (last[1] if last else 0.0)
        last[:] = [result, elapsed]
        text = view.render(view.rows(delta), seconds, {"interval": round(elapsed, 3)})
        sys.stdout.write(text if args.json else f"{elapsed:.3f} s\n{text}\n")
        sys.stdout.flush()

    specs = [item.spec(probe) for item, _column, probe in chosen]
    result, session = runner.aggregate(args, specs, plan, args.interval, on_interval)
    sys.stdout.write(view.render(view.rows(result), extra={"total": True}) if args.json
                     else f"total\n{view.render(view.rows(result))}")
    return session.exit_status or 0
