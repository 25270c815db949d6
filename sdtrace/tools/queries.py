"""``sdtrace queries``: PostgreSQL's queries, timed per query text (bcc's dbstat and dbslower).

A query is the span from ``postgresql:query__start(query)`` to
``postgresql:query__done(query)`` of one backend: PostgreSQL 15 fires both
in exec_simple_query only (the simple protocol: psql, pgbench's default;
the extended protocol's Execute fires neither).  The plan is a Latency
paired on the query text per thread and keyed by it, so a backend's spans
pair exactly, and on the BPF executor in the kernel: a query that fails
raises an ERROR out of exec_simple_query before its query__done, and its
START stays open on its own text's stack instead of stealing the next
query's END (the open ones are reported).  The default is the table of
query texts with their count, total, mean and maximum time, and the
histogram of all of them; ``--slower MS`` streams each query slower than
MS as it ends (its pairs come through records, so that its text, pid and
duration can be printed).

Without TARGET, -p or -c the session is system-wide on the executables of
the running ``postgres`` processes, so that backends forked later are seen
too; no PostgreSQL running is one line.
"""

HELP = "PostgreSQL queries: count and time per query text, or each slow query (dbstat, dbslower)"
DESCRIPTION = ("Time PostgreSQL's queries (postgresql:query__start to query__done, the simple "
               "query protocol) per query text: COUNT, total, mean and max milliseconds, and a "
               "histogram of them all (ns), at the end; or, with --slower MS, each query "
               "slower than MS as it completes. Without TARGET, -p or -c: system-wide on the "
               "executables of the running postgres processes. Query texts are cut at "
               "--string-size on the bpf executor.")
NS_PER_MS = 1_000_000


def add_arguments(parser):
    parser.add_argument("--slower", type=float, metavar="MS",
                        help="print each query slower than MS milliseconds as it completes "
                             "(TIME(s) since the start, PID, MS, QUERY)")
    parser.add_argument("--top", type=int, metavar="N",
                        help="show the N query texts of the largest total time")
    parser.add_argument("--max-keys", type=int, metavar="N",
                        help="bpf executor: time at most N query texts in the kernel (default "
                             "65536); hits beyond are counted as not counted")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a postgres executable (path, glob or name): system-wide on it")


def run(args):
    import sys
    import time

    from ..discovery.specs import parse_spec
    from ..errors import SdtraceError
    from ..present import aggregate, runner
    from . import runtimes

    if args.slower is not None and args.slower < 0:
        raise SdtraceError(f"--slower: must be 0 or above, not {args.slower}")
    if not (args.targets or args.pid is not None or args.command is not None):
        args.targets = running_postgres()
    found = runtimes.find(args, (runtimes.POSTGRESQL,))
    starts = [item.spec("query__start") for item in found]
    ends = [item.spec("query__done") for item in found]
    query = aggregate.parse_key("query")
    plan = aggregate.Latency(parse_spec(starts[0]), parse_spec(ends[0]), (query,), (query,))
    began = time.monotonic_ns()
    on_pair = None
    if args.slower is not None:
        threshold = args.slower * NS_PER_MS
        if not args.json:
            sys.stdout.write(f"{'TIME(s)':<9} {'PID':>7} {'MS':>10} QUERY\n")
        on_pair = lambda start, end, label: _slow(start, end, label, threshold,  # noqa: E731
                                                  began, args.json)
    result, session = runner.aggregate(args, [*starts, *ends], plan, on_pair=on_pair)
    if args.slower is None:
        sys.stdout.write(_json(result, args.top) if args.json else _text(result, args.top))
    return session.exit_status or 0


def running_postgres():
    """The executables of the running processes named ``postgres``, or a one-line error."""
    import os

    from ..errors import SdtraceError
    from ..kernel import procfs

    executables = set()
    for name in os.listdir("/proc"):
        if not name.isdecimal():
            continue
        try:
            if procfs.process_name(int(name)) == "postgres":
                executables.add(os.readlink(f"/proc/{name}/exe"))
        except OSError:
            continue                  # gone meanwhile, or a kernel thread
    if not executables:
        raise SdtraceError("no postgres process is running: give -p PID, -c CMD or a "
                           "TARGET (the postgres executable)")
    return sorted(executables)


def _slow(start, end, query, threshold, began, json_lines):
    """Print the pair of one query if it took at least `threshold` ns."""
    import json
    import sys

    from ..engine.events import COMM, PID, TID, TS

    duration = end[TS] - start[TS]
    if duration < threshold:
        return
    if json_lines:
        line = json.dumps({"ts": end[TS], "pid": start[PID], "tid": start[TID],
                           "comm": start[COMM], "query": query, "duration": duration}) + "\n"
    else:
        line = (f"{(end[TS] - began) / 1e9:<9.3f} {start[PID]:>7} "
                f"{duration / NS_PER_MS:>10.3f} {_one_line(query)}\n")
    sys.stdout.write(line)
    sys.stdout.flush()


def _one_line(query):
    """A query text for a line of text: its runs of white space (newlines too) one space."""
    return "?" if query is None else " ".join(query.split())


def _rows(result, top):
    """(query, Distribution) by total time, largest first; the `top` first."""
    rows = sorted(result.rows, key=lambda row: (-row[1].total, -row[1].count, str(row[0][0])))
    return [(values[0], distribution) for values, distribution in rows[:top or None]]


def _text(result, top):
    from ..present import report
    from ..present.aggregate import Distribution
    from ..present.output import table

    lines = [[str(distribution.count), f"{distribution.total / NS_PER_MS:.3f}",
              f"{distribution.mean / NS_PER_MS:.3f}", f"{distribution.maximum / NS_PER_MS:.3f}",
              _one_line(query)] for query, distribution in _rows(result, top)]
    every = Distribution()
    for _values, distribution in result.rows:
        every.merge(distribution)
    return (table(["COUNT", "TOTAL_MS", "MEAN_MS", "MAX_MS", "QUERY"], lines,
                  right={0, 1, 2, 3}) + "\n\n"
            + (report.histogram_text(every, "all queries", unit="ns") if every.count
               else "no queries\n")
            + _unfinished_text(result))


def _unfinished_text(result):
    if not result.open_starts:
        return ""
    return (f"{result.open_starts} queries began without ending: failed (an ERROR ends a "
            "query before query__done), or still running\n")


def _json(result, top):
    """A line per query text (report.statistics, ns, and the total), then the pairing's counts."""
    import json

    from ..present import report

    lines = [json.dumps({"query": query, **report.statistics(distribution),
                         "total": distribution.total}) + "\n"
             for query, distribution in _rows(result, top)]
    return "".join(lines) + json.dumps(report.latency_summary(result)) + "\n"
