"""``sdtrace gc``: each garbage collection with its generation and duration, then a
histogram of the durations per generation (bcc's ``ugc``).

Java (HotSpot): ``hotspot:gc__begin(full)`` and ``gc__end`` bracket every
collection on the thread that runs it; ``full`` tells a full collection from
a young one.  The collector's name comes from the first
``mem__pool__gc__begin`` inside (its ``manager_name``: MarkSweepCompact,
Copy, G1 Young Generation...), where the executor reads HotSpot's strings
(bpf).  Python: ``python:gc__start(generation)`` and ``gc__done(collected)``,
the generation collected (0, 1, 2) and how many objects it freed.

A begin is paired with the next end of its thread in user space: collections
are rare, every one is a line.  An end whose begin came before the session
is not a collection seen whole and is left out.
"""
import json
import sys
import time

from .runtimes import JAVA, PYTHON

HELP = "garbage collections: each with its duration, then a histogram (like ugc)"
DESCRIPTION = ("Show each garbage collection of a Java (HotSpot) or Python process: its "
               "generation (Java: young or full, and the collector; Python: 0, 1 or 2, and "
               "the objects collected) and its duration, then a histogram of the durations "
               "(ns) per generation. TARGET: a libjvm.so or libpython (system-wide, or with "
               "-p/-c as the objects to search).")
# per runtime: (its begin probe, its end probe, the probes also armed)
PROBES = {JAVA: ("gc__begin", "gc__end", ("mem__pool__gc__begin",)),
          PYTHON: ("gc__start", "gc__done", ())}
HEADER = (f"{'TIME(s)':>10} {'PID':>7}  {'RUNTIME':<7}  {'GENERATION':<10} "
          f"{'DURATION(ms)':>12}  DETAIL\n")


def add_arguments(parser):
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")


class Collections:
    """Pairs begin and end records per thread; writes each collection, keeps the histograms."""

    def __init__(self, as_json, started_ns):
        from ..present.aggregate import Distribution

        self.as_json, self.started_ns = as_json, started_ns
        self.open = {}             # (pid, tid) -> [begin record, collector name]
        self.distributions = {}    # generation -> Distribution
        self.new_distribution = Distribution

    def add(self, records):
        from ..engine.events import ARGS, PID, SITE, TID

        lines = []
        for record in records:
            site, thread = record[SITE], (record[PID], record[TID])
            if site.name in ("gc__begin", "gc__start"):
                self.open[thread] = [record, None]
            elif site.name == "mem__pool__gc__begin":
                collection = self.open.get(thread)
                name = record[ARGS][0]
                if collection is not None and collection[1] is None and isinstance(name, str):
                    collection[1] = name
            elif thread in self.open:
                begin, collector = self.open.pop(thread)
                lines.append(self._collection(begin, record, collector))
        if lines:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    def _collection(self, begin, end, collector):
        from ..engine.events import ARGS, COMM, PID, SITE, TID, TS

        duration = end[TS] - begin[TS]
        java = begin[SITE].provider == JAVA.provider
        full = begin[ARGS][0]
        generation = ("?" if full is None else "full" if full else "young") if java else full
        self.distributions.setdefault(generation, self.new_distribution()).add_counts(
            {duration: 1})
        detail = {"collector": collector} if java else {"collected": end[ARGS][0]}
        if self.as_json:
            return json.dumps({"ts": begin[TS], "pid": begin[PID], "tid": begin[TID],
                               "comm": begin[COMM], "runtime": "java" if java else "python",
                               "generation": generation, "duration_ns": duration,
                               **detail}) + "\n"
        text = (detail["collector"] or "") if java else f"collected {detail['collected']}"
        return (f"{(begin[TS] - self.started_ns) / 1e9:>10.3f} {begin[PID]:>7}  "
                f"{'java' if java else 'python':<7}  {generation!s:<10} "
                f"{duration / 1e6:>12.3f}  {text}".rstrip() + "\n")

    def result(self):
        """The durations per generation, as a HistogramResult keyed by ``generation``."""
        from ..present.aggregate import HistogramResult, parse_key
        from ..present.aggregate.plans import ordered

        rows = ordered(((generation,), distribution.count)
                       for generation, distribution in self.distributions.items())
        return HistogramResult((parse_key("generation"),),
                               [(values, self.distributions[values[0]]) for values, _ in rows])


def run(args):
    from ..present import report, runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, tuple(PROBES)), args)
    specs = [item.spec(probe) for item in found
             for begin, end, also in (PROBES[item.runtime],) for probe in (begin, end, *also)]
    collections = Collections(args.json, time.monotonic_ns())
    if not args.json:
        sys.stdout.write(HEADER)
    session = runner.stream(args, specs, collections.add)
    result = collections.result()
    if args.json:
        sys.stdout.write(report.histograms_json(result))
    elif result.rows:
        sys.stdout.write("\n" + report.histograms_text(result, unit="ns"))
    return session.exit_status or 0
