"""``sdtrace stat``: a top-like view of runtime events per process, every
interval (bcc's ``ustat``).

Per process: calls, garbage collections, object allocations, class loads
and thread starts, each the hits of one probe of its runtime (PROBES).
CPython 3.11 has calls (``function__entry``, with python:line's semaphore
raised by the session), collections (``gc__start``) and module loads as its
class loads (``import__find__load__start``: a module found and executed,
not one already in sys.modules), and no allocation or thread probe; HotSpot
has them all, its calls and allocations only under -XX:+DTraceMethodProbes
and -XX:+DTraceAllocProbes (providers.RUNTIME_RULES).  Neither runtime has
an exception probe, so there is no exceptions column.  A column a runtime
has no probe for shows ``-`` (null in JSON); one whose flag the JVM lacks
shows ``flag`` (null in JSON), said in one line: with -p and -c it is not
armed, and ``--jvm-probes`` gives the flags to ``-c``'s JVM; system-wide
each JVM's flags are read from its memory when it first shows.

The counts are one Count plan keyed by (pid, comm, probe), counted in the
kernel on the bpf executor, and shown per process; every ``--interval`` the
view shows the difference from the last one as rates (JSON: the counts of
the interval), and at the end the totals.
"""
import json
import sys

from .runtimes import JAVA, PYTHON

HELP = "runtime events per process every interval: calls, GC, allocations... (like ustat)"
DESCRIPTION = ("Show per process, every --interval, the rate of calls, garbage collections, "
               "object allocations, class (Python: module) loads and thread starts of Python "
               "and Java (HotSpot) processes (-p, -c, or every process running TARGET), then "
               "the totals. Java's calls and allocations need -XX:+DTraceMethodProbes and "
               "-XX:+DTraceAllocProbes (--jvm-probes adds them to -c's JVM).")
# column: its heading in the table (the JSON key is the column)
COLUMNS = {"calls": "CALLS", "gc": "GC", "objnew": "OBJNEW", "cload": "CLOAD",
           "threads": "THREAD"}
# per runtime: column -> its probe (a column absent here has no probe in that runtime)
PROBES = {PYTHON: {"calls": "function__entry", "gc": "gc__start",
                   "cload": "import__find__load__start"},
          JAVA: {"calls": "method__entry", "gc": "gc__begin", "objnew": "object__alloc",
                 "cload": "class__loaded", "threads": "thread__start"}}
RUNTIME_NAMES = {PYTHON.provider: "python", JAVA.provider: "java"}
NO_PROBE, NEEDS_FLAG = "-", "flag"


def add_arguments(parser):
    from .runtimes import add_jvm_probes_option

    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="show the rates of every S seconds (default 1)")
    add_jvm_probes_option(parser)


def _rules(provider, columns):
    """{column: the rule its probe needs} of `columns` (column -> probe) of `provider`."""
    from ..discovery import providers

    rules = {column: providers.runtime_rule(provider, probe) for column, probe in columns}
    return {column: rule for column, rule in rules.items() if rule is not None}


def _probes(args, found, warn):
    """([(found item, column, probe)] to arm, {provider: {column: lack}} of the columns
    not counted): with -p or -c, a column whose probe needs a flag the JVM lacks is not
    armed, in one line."""
    import shlex

    from ..discovery import rules
    from .runtimes import give_jvm_flag

    chosen, lacking = [], {}
    for item in found:
        needs = _rules(item.runtime.provider, PROBES[item.runtime].items())
        for column, probe in PROBES[item.runtime].items():
            lack = None
            if column in needs and args.command is not None and args.jvm_probes:
                give_jvm_flag(needs[column])
            elif column in needs and (args.pid is not None or args.command is not None):
                lack = rules.unmet(needs[column], args.pid, None if args.command is None
                                   else shlex.split(args.command))
            if lack is None:
                chosen.append((item, column, probe))
            else:
                lacking.setdefault(item.runtime.provider, {})[column] = lack
    for columns in lacking.values():
        hint = "--jvm-probes gives the flags" if args.command is not None else \
            "restart it with the flags"
        warn(f"{_not_counted(columns)}; {hint}")
    return chosen, lacking


class View:
    """Turns Count results keyed by (pid, comm, probe) into per-process rows."""

    def __init__(self, columns_of_probe, lacking, system_wide, warn):
        self.columns_of_probe, self.lacking = columns_of_probe, lacking
        self.system_wide, self.warn = system_wide, warn
        self.names, self.flags = {}, {}     # pid -> its comm, {column: lack}: read once

    def rows(self, result):
        """{(pid, comm): (runtime, {column: count, or NO_PROBE or NEEDS_FLAG})} of a
        CountResult; a process is one row whatever its threads' names, named by its
        comm (read once, while it runs; for one gone before, the name of its thread with
        most hits)."""
        from ..kernel.procfs import process_name

        counts_of, busiest = {}, {}
        for (pid, comm, probe), count in result.rows:          # largest first
            provider, column = self.columns_of_probe[probe]
            counts = counts_of.setdefault(pid, (provider, {}))[1]
            counts[column] = counts.get(column, 0) + count
            busiest.setdefault(pid, comm)
        rows = {}
        for pid, (provider, counts) in counts_of.items():
            if pid not in self.names:
                name = process_name(pid)
                self.names[pid] = busiest[pid] if name == "?" else name
            rows[pid, self.names[pid]] = (RUNTIME_NAMES[provider],
                                          self._cells(pid, provider, counts))
        return rows

    def _cells(self, pid, provider, counts):
        """{column: count, NO_PROBE or NEEDS_FLAG} of process `pid`."""
        served = {column for known, column in self.columns_of_probe.values()
                  if known == provider}
        lacking = self._lacking(pid, provider)
        return {column: NEEDS_FLAG if column in lacking else counts.get(column, 0)
                if column in served else NO_PROBE for column in COLUMNS}

    def _lacking(self, pid, provider):
        """{column: what lacks} of process `pid`: -p's and -c's from the start, and
        system-wide a JVM's flags read when it first shows (one line if it lacks any)."""
        if not self.system_wide:
            return self.lacking.get(provider, {})
        if pid not in self.flags:
            from ..discovery import rules
            from ..errors import SdtraceError

            needs = _rules(provider, ((column, probe.split(":", 1)[1])
                                      for probe, (known, column) in
                                      self.columns_of_probe.items() if known == provider))
            try:
                lacks = {column: rules.unmet(rule, pid) for column, rule in needs.items()}
            except (OSError, SdtraceError):     # gone: nothing known of it
                lacks = {}
            self.flags[pid] = {column: lack for column, lack in lacks.items() if lack}
            if self.flags[pid]:
                self.warn(_not_counted(self.flags[pid]))
        return self.flags[pid]

    @staticmethod
    def render(rows, seconds=None, extra=None, as_json=False):
        """Rows as JSON lines (counts; null where not counted) or a table (rates per
        second if `seconds`)."""
        if as_json:
            return "".join(json.dumps({**(extra or {}), "pid": pid, "comm": comm,
                                       "runtime": runtime,
                                       **{column: cell if isinstance(cell, int) else None
                                          for column, cell in cells.items()}}) + "\n"
                           for (pid, comm), (runtime, cells) in sorted(rows.items()))
        from ..present.output import table

        def shown(cell):
            if not isinstance(cell, int):
                return cell
            return f"{cell / seconds:.0f}" if seconds else str(cell)
        suffix = "/s" if seconds else ""
        header = ["PID", "COMM", "RUNTIME", *(heading + suffix for heading in COLUMNS.values())]
        lines = [[str(pid), comm or "?", runtime, *(shown(cells[column]) for column in COLUMNS)]
                 for (pid, comm), (runtime, cells) in sorted(rows.items())]
        return table(header, lines, right={0, *range(3, 3 + len(COLUMNS))}) + "\n"


def _not_counted(lacking):
    """The line on the columns that `lacking` ({column: what lacks}) leaves out."""
    return f"not counted (shown as {NEEDS_FLAG!r}): " + "; ".join(
        f"{column}: {lack}" for column, lack in lacking.items())


def _idle(rows, totals):
    """`rows` of an interval, and a row of zeros for each process of `totals` (the rows
    so far) still running that had no hit in it."""
    import os

    idle = {key: (runtime, {column: 0 if isinstance(cell, int) else cell
                            for column, cell in cells.items()})
            for key, (runtime, cells) in totals.items()
            if key not in rows and os.path.exists(f"/proc/{key[0]}")}
    return {**rows, **idle}


def run(args):
    from ..errors import SdtraceError
    from ..present import aggregate, runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, tuple(PROBES)), args)
    chosen, lacking = _probes(args, found, runner.warn)
    if not chosen:
        raise SdtraceError("nothing to count: every column needs what the runtime lacks")
    view = View({f"{item.runtime.provider}:{probe}": (item.runtime.provider, column)
                 for item, column, probe in chosen}, lacking,
                args.pid is None and args.command is None, runner.warn)
    plan = aggregate.Count(aggregate.parse_keys("pid,comm,probe"))
    last = []

    def on_interval(aggregator, elapsed):
        result = aggregator.result()
        delta = result.minus(last[0]) if last else result
        seconds = elapsed - (last[1] if last else 0.0)
        last[:] = [result, elapsed]
        text = view.render(_idle(view.rows(delta), view.rows(result)), seconds,
                           {"interval": round(elapsed, 3)}, args.json)
        sys.stdout.write(text if args.json else f"{elapsed:.3f} s\n{text}\n")
        sys.stdout.flush()

    specs = [item.spec(probe) for item, _column, probe in chosen]
    result, session = runner.aggregate(args, specs, plan, args.interval, on_interval)
    rows = view.rows(result)
    sys.stdout.write(view.render(rows, extra={"total": True}, as_json=True) if args.json
                     else f"total\n{view.render(rows)}")
    return session.exit_status or 0
