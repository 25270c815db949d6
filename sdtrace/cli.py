"""The ``sdtrace`` command line: argument parsing and error reporting only.

Each subcommand is a thin layer over the library; every SdtraceError becomes
one line ``sdtrace: MESSAGE`` on stderr and exit status 1, never a traceback.
Modules are imported inside the subcommands so that start-up stays cheap.
"""
import argparse
import os
import sys

from . import __version__
from .errors import SdtraceError


class _Parser(argparse.ArgumentParser):
    """argparse with a help formatter that sizes itself without importing shutil
    (argparse builds formatters while options are added: ~3 ms of start-up)."""

    def __init__(self, **options):
        options.setdefault("formatter_class", _formatter)
        super().__init__(**options)


def _formatter(prog):
    import os

    try:
        width = os.get_terminal_size(2).columns - 2
    except OSError:
        width = 78
    return _Formatter(prog, width=width)


class _Formatter(argparse.HelpFormatter):
    """Wraps a one-line description; keeps a text of several lines (SPEC_FORMS) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


SPEC_FORMS = """\
SPEC forms (PROVIDER, NAME and FILE may be shell globs):
  PROVIDER:NAME              searched in the objects of -p/-c (or given as TARGET)
  TARGET:PROVIDER:NAME       TARGET is a path, a glob of paths or a library name
  FILE  FILE:*               every probe of FILE (FILE has a '/' or a '.')
  FILE:NAME  FILE::NAME      NAME of any provider in FILE
  ...(TYPE,...)              read arguments as str, s8..u64 (empty: the note's type)
examples: /usr/bin/python3.11::function__entry  'libpython3.11:python:gc*'
          '/usr/lib/*/libstdc++.so.6:*'  '/usr/bin/python3.11:python:line(str,str)'"""


def _add_target_options(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-p", "--pid", type=int, help="search (and trace) the objects of process PID")
    group.add_argument("-c", "--command", metavar="CMD",
                       help="search (and trace) the objects of command CMD")
    parser.add_argument("--json", action="store_true", help="write JSON lines")


def _add_session_options(parser):
    """The options of every command that arms probes."""
    _add_target_options(parser)
    parser.add_argument("-d", "--duration", type=float, metavar="SECONDS",
                        help="stop after SECONDS")
    parser.add_argument("--keep-command", action="store_true",
                        help="leave -c's command running when the session ends (default: "
                             "SIGTERM, then SIGKILL after 2 s)")
    parser.add_argument("--buffer-pages", type=int, metavar="N",
                        help="ring buffer data pages per CPU, a power of two (default 1024: 4 MiB)")
    # session.SEMAPHORE_MODES, written out to keep the session modules out of start-up
    parser.add_argument("--semaphores", choices=("auto", "kernel", "user"), default="auto",
                        help="who counts SDT semaphores: the kernel (ref_ctr_offset), sdtrace "
                             "through /proc/PID/mem, or auto (the kernel when it can). In user "
                             "mode a process that starts during a system-wide or -p session is "
                             "raised shortly after it starts (its first hits are missed; the "
                             "summary says how late); -c commands are held until raised")
    # session.EXECUTORS, written out for the same reason
    parser.add_argument("--executor", choices=("auto", "bpf", "tracefs"),
                        default=os.environ.get("SDTRACE_EXECUTOR") or "auto",
                        help="what arms the sites and reads their hits: bpf (one generated "
                             "program and uprobe_multi link per file, one BPF ring), tracefs "
                             "(uprobe events, perf rings), or auto (bpf where `sdtrace info` "
                             "says it runs; a fallback is said in one warning). Default: "
                             "$SDTRACE_EXECUTOR, else auto")
    parser.add_argument("--string-size", type=int, metavar="BYTES",
                        help="bpf executor: read at most BYTES of a string argument (default "
                             "64, like bpftrace); a string cut short is marked (JSON: "
                             "\"truncated\": [argument indexes])")


def _add_export_options(parser, max_keys=True):
    """--prometheus, --otlp and --metric of count, hist and latency (present/export)."""
    parser.add_argument("--prometheus", metavar="[HOST:]PORT",
                        help="serve the results at http://HOST:PORT/metrics while tracing, "
                             "refreshed every second (count: every --interval); HOST is "
                             "127.0.0.1 unless given. Needs sdtrace[prometheus]")
    parser.add_argument("--otlp", metavar="ENDPOINT",
                        help="push the results as OTLP metrics, and latency pairs as spans, to "
                             "an OTLP/HTTP collector: http://HOST:PORT or [HOST:]PORT. Needs "
                             "sdtrace[otlp]")
    parser.add_argument("--metric", metavar="NAME",
                        help="the exported metric's name (default: sdtrace_ and the probe)")
    if max_keys:
        parser.add_argument("--max-keys", type=int, metavar="N",
                            help="count at most N keys in the kernel (bpf executor) and export "
                                 "at most N key sets (default 65536)")


DEBUG_HELP = ("log what sdtrace decides and does (semaphore mode, uprobe definitions, perf "
              "fds, counters, timings) to stderr")


def build_parser():
    parser = _Parser(prog="sdtrace", description="Trace USDT (SystemTap SDT) markers.")
    parser.add_argument("--version", action="version", version=f"sdtrace {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # prog= spares argparse a HelpFormatter at start-up; subcommands are _Parsers too
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", prog="sdtrace")
    commands.required = True

    listing = commands.add_parser(
        "list", help="list probe sites",
        description="List SDT probe sites. SPEC is [TARGET:]PROVIDER:NAME, a path or a library name.",
        epilog=SPEC_FORMS)
    _add_target_options(listing)
    listing.add_argument("specs", nargs="*", metavar="SPEC")
    listing.set_defaults(run=run_list)

    trace = commands.add_parser(
        "trace", help="trace probe hits",
        description="Trace SDT probes. SPEC is [TARGET:]PROVIDER:NAME[(TYPE,...)]; "
                    "without -p/-c the trace is system-wide on the files named.",
        epilog=SPEC_FORMS)
    _add_session_options(trace)
    trace.add_argument("-n", "--count", type=int, help="stop after COUNT events")
    trace.add_argument("-o", "--output", metavar="FILE", help="write events to FILE")
    trace.add_argument("--perfetto", metavar="FILE",
                       help="also write a timeline to FILE: Perfetto's native protobuf trace "
                            "if FILE ends in .pftrace or .perfetto-trace, else Chrome "
                            "trace-event JSON")
    trace.add_argument("specs", nargs="+", metavar="SPEC")
    trace.set_defaults(run=run_trace)

    count = commands.add_parser(
        "count", help="count probe hits per key",
        description="Count hits per probe, or per KEY: probe, pid, tid, comm, argN or an "
                    "argument's name. SPEC is [TARGET:]PROVIDER:NAME[(TYPE,...)].",
        epilog=SPEC_FORMS)
    _add_session_options(count)
    count.add_argument("--by", default="probe", metavar="KEY[,KEY...]",
                       help="count per KEY (default: probe)")
    count.add_argument("--top", type=int, metavar="N", help="show the N largest counts")
    count.add_argument("--max-keys", type=int, metavar="N",
                       help="bpf executor: count at most N keys in the kernel (default 65536); "
                            "hits of keys beyond are counted as not counted, never silently; "
                            "--prometheus and --otlp export at most N key sets")
    count.add_argument("--interval", type=float, metavar="S",
                       help="also print the counts of every S seconds")
    _add_export_options(count, max_keys=False)
    count.add_argument("specs", nargs="+", metavar="SPEC")
    count.set_defaults(run=run_count)

    hist = commands.add_parser(
        "hist", help="histogram of a numeric argument",
        description="A power-of-two (or --linear) histogram of argument N, with count, min, "
                    "max, mean and percentiles.",
        epilog=SPEC_FORMS)
    _add_session_options(hist)
    hist.add_argument("--arg", required=True, metavar="N",
                      help="the argument: its number, or its name")
    hist.add_argument("--by", metavar="KEY[,KEY...]", help="one histogram per KEY")
    hist.add_argument("--linear", metavar="MIN,MAX,STEP", help="linear buckets")
    _add_export_options(hist)
    hist.add_argument("specs", nargs="+", metavar="SPEC")
    hist.set_defaults(run=run_hist)

    latency = commands.add_parser(
        "latency", help="time from a START probe to its END probe",
        description="Pair each END hit with the innermost open START hit of its thread "
                    "(with --match, the innermost whose keys are equal) and show the "
                    "durations in ns.",
        epilog=SPEC_FORMS)
    _add_session_options(latency)
    latency.add_argument("--match", metavar="KEY[,KEY...]",
                         help="START and END pair only if these keys are equal")
    latency.add_argument("--by", metavar="KEY[,KEY...]",
                         help="one histogram per KEY of the START")
    latency.add_argument("--linear", metavar="MIN,MAX,STEP", help="linear buckets (ns)")
    latency.add_argument("--arm", action="append", default=[], metavar="SPEC",
                         help="also arm SPEC, without measuring it (CPython 3.11 fires "
                              "function__entry for every frame only while python:line is armed)")
    latency.add_argument("--perfetto", metavar="FILE",
                         help="also write the pairs as a timeline to FILE: Perfetto's native "
                              "protobuf trace if FILE ends in .pftrace or .perfetto-trace, "
                              "else Chrome trace-event JSON")
    _add_export_options(latency)
    latency.add_argument("start", metavar="START_SPEC")
    latency.add_argument("end", metavar="END_SPEC")
    latency.set_defaults(run=run_latency)

    cleanup = commands.add_parser(
        "cleanup", help="remove what dead sdtrace sessions left behind",
        description="Remove uprobe definitions of sdtrace sessions whose owner has exited.")
    cleanup.set_defaults(run=run_cleanup)

    semaphores = commands.add_parser(
        "semaphores", help="show SDT semaphores in running processes",
        description="Show every SDT semaphore of every process (or PID): its address, value, "
                    "whether a site of its probe is armed (int3 in place), and LEAKED when "
                    "it is above 0 with nothing armed. SPEC is [TARGET:]PROVIDER:NAME.",
        epilog=SPEC_FORMS)
    semaphores.add_argument("-p", "--pid", type=int, help="only process PID")
    semaphores.add_argument("--json", action="store_true", help="write JSON lines")
    semaphores.add_argument("specs", nargs="*", metavar="SPEC")
    semaphores.set_defaults(run=run_semaphores)

    info = commands.add_parser(
        "info", help="what this kernel can do, and what sdtrace would pick",
        description="Show the kernel release, each kernel feature sdtrace uses (and the "
                    "release that brought it), the executor --executor=auto and the "
                    "semaphore mode --semaphores=auto pick, and why.")
    info.add_argument("--json", action="store_true", help="write one JSON object")
    info.set_defaults(run=run_info)
    from .tools import TOOLS, tool

    for name in TOOLS:
        module = tool(name)
        parser_of_tool = commands.add_parser(name, help=module.HELP,
                                             description=module.DESCRIPTION)
        _add_session_options(parser_of_tool)
        module.add_arguments(parser_of_tool)
        parser_of_tool.set_defaults(run=module.run)
    for subcommand in commands.choices.values():   # --debug after the command too, as in perf
        subcommand.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help=DEBUG_HELP)
    return parser


def listed_probes(args):
    """The probe sites `sdtrace list` shows, each once, in order."""
    from .discovery.specs import context_objects, parse_spec, select_probes
    from .present import runner

    specs = [parse_spec(text) for text in args.specs]
    command = None
    if args.command is not None:
        import shlex

        command = shlex.split(args.command)
    objects = context_objects(args.pid, command, runner.warn)
    if not specs:
        if not objects:
            raise SdtraceError("nothing to list: give a TARGET, a SPEC, -p PID or -c CMD")
        specs = [parse_spec("*:*")]
    return [site for site, _spec in select_probes(specs, objects)]


def run_list(args):
    from .present import output, runner

    probes = listed_probes(args)
    for probe in probes:
        for operand in probe.operands:
            if operand.error:
                runner.warn(f"{probe.file}: {probe.qualified_name}: argument {operand.text!r} "
                            f"is unavailable: {operand.error}")
        if probe.semaphore_error:
            runner.warn(f"{probe.file}: {probe.qualified_name}: unusable semaphore: {probe.semaphore_error}")
        if probe.site_error:
            runner.warn(f"{probe.file}: {probe.qualified_name}: cannot be armed: {probe.site_error}")
    text = output.probe_json_lines(probes) if args.json else output.probe_table(probes) + "\n"
    sys.stdout.write(text)
    return 0


def run_trace(args):
    import collections

    from .present import output, runner

    stop = runner.StopFlag()
    session = runner.open_session(args.specs, args, stop=stop)
    sink = sys.stdout if args.output is None else output.open_output(args.output)
    lines = output.LineEmitter(args.json)
    timeline = None
    if args.perfetto is not None:
        from .present.perfetto import TraceTimeline

        timeline = TraceTimeline(args.perfetto, session, lines)
    counts = collections.Counter()
    written = reported_lost = 0
    armed = False
    try:
        with session:
            armed = True
            sys.stderr.write(f"sdtrace: tracing {len(session.sites)} site(s); Ctrl-C to end\n")
            for items in session.batches(timeline or lines, args.duration,
                                         lambda: stop.requested or written == args.count):
                written += _emit(items, args.count, written, sink, counts, timeline)
                if session.lost != reported_lost:
                    sys.stderr.write(f"sdtrace: {output.lost_warning(session.lost - reported_lost)}\n")
                    reported_lost = session.lost
    finally:
        sink.flush()
        if sink is not sys.stdout:
            sink.close()
        if timeline is not None:
            timeline.close()
        if armed:
            runner.say_session_end(session)
            sys.stderr.write(output.summary(counts, session.lost))
    return session.exit_status or 0


def _emit(lines, limit, written, sink, counts, timeline=None):
    """Write (ts, probe, text) lines (up to the -n limit); return how many were written."""
    import operator

    if limit is not None and written + len(lines) > limit:
        lines = lines[:limit - written]
    if lines:
        sink.write("".join(map(operator.itemgetter(2), lines)))
        counts.update(map(operator.itemgetter(1), lines))
    if timeline is not None:
        timeline.add(lines)
    return len(lines)


def _exported(args, specs, plan, *hooks, **named_hooks):
    """runner.aggregate, exporting as --prometheus and --otlp ask (present/export)."""
    from .present import runner
    from .present.export import open_exports

    with open_exports(args, plan) as exports:
        return runner.aggregate(args, specs, plan, *hooks, exports=exports, **named_hooks)


def run_count(args):
    from .present import aggregate, report, runner

    plan = aggregate.Count(aggregate.parse_keys(args.by))
    previous = []

    def on_interval(aggregator, elapsed):
        result = aggregator.result()
        delta = result.minus(previous[0]) if previous else result
        previous[:] = [result]
        if args.json:
            sys.stdout.write(report.count_json(delta, args.top, {"interval": round(elapsed, 3)}))
        else:
            sys.stdout.write(f"{elapsed:.3f} s\n{report.count_table(delta, args.top)}\n")
        sys.stdout.flush()

    result, session = _exported(args, args.specs, plan, args.interval,
                                 on_interval if args.interval else None)
    sys.stdout.write(report.count_json(result, args.top) if args.json
                     else report.count_table(result, args.top))
    return session.exit_status or 0


def run_hist(args):
    from .present import aggregate, report, runner

    plan = aggregate.Histogram(
        aggregate.parse_key(args.arg),
        aggregate.parse_keys(args.by) if args.by else (),
        aggregate.parse_linear(args.linear) if args.linear else None)
    result, session = _exported(args, args.specs, plan)
    if result.missing:
        runner.warn(f"{result.missing} hits had no value (the argument was unavailable)")
    sys.stdout.write(report.histograms_json(result) if args.json
                     else report.histograms_text(result))
    return session.exit_status or 0


def run_latency(args):
    import json

    from .discovery.specs import parse_spec
    from .engine import events
    from .present import aggregate, report, runner

    plan = aggregate.Latency(
        parse_spec(args.start), parse_spec(args.end),
        aggregate.parse_keys(args.match) if args.match else (),
        aggregate.parse_keys(args.by) if args.by else (),
        aggregate.parse_linear(args.linear) if args.linear else None)
    timeline = on_pair = None
    if args.perfetto is not None:
        from .present.perfetto import timeline_writer

        timeline = timeline_writer(args.perfetto)
        on_pair = lambda start, end, label: timeline.slice(  # noqa: E731
            label, start, end, start[events.SITE].probe)
    try:
        result, session = _exported(args, [args.start, args.end, *args.arm], plan,
                                     on_pair=on_pair)
    finally:
        if timeline is not None:
            timeline.close()
    if args.json:
        sys.stdout.write(report.histograms_json(result)
                         + json.dumps(report.latency_summary(result)) + "\n")
    else:
        sys.stdout.write(report.histograms_text(result, unit="ns")
                         + report.latency_summary_text(result))
    return session.exit_status or 0


def run_cleanup(_args):
    from .kernel import tracefs
    from .present import runner
    from .semaphores import guardian

    removed = tracefs.remove_stale()
    for group in removed:
        sys.stderr.write(f"sdtrace: removed stale uprobe group {group}\n")
    reverted = guardian.revert_dead_ledgers(warn=runner.warn)
    sys.stderr.write(f"sdtrace: {len(removed)} stale group(s) removed, "
                     f"{reverted} semaphore ledger(s) of dead sessions reverted\n")
    return 0


def run_info(args):
    import json

    from .present import info

    report = info.report()
    sys.stdout.write(json.dumps(report) + "\n" if args.json else info.text(report))
    return 0


def run_semaphores(args):
    import json

    from .discovery.specs import parse_spec
    from .present import output, runner
    from .semaphores import audit

    specs = [parse_spec(text) for text in args.specs]
    states = audit.audit(args.pid, specs, warn=runner.warn)
    if args.json:
        sys.stdout.write("".join(json.dumps(output.semaphore_state_record(state)) + "\n" for state in states))
    elif states:
        sys.stdout.write(output.semaphore_state_table(states) + "\n")
    return 0


# Options that must be above 0, by argparse destination.
POSITIVE_OPTIONS = {"count": "-n", "duration": "-d", "buffer_pages": "--buffer-pages",
                    "string_size": "--string-size", "max_keys": "--max-keys",
                    "top": "--top", "interval": "--interval"}


def _check_positive(args):
    for name, option in POSITIVE_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise SdtraceError(f"{option}: must be above 0, not {value}")


def _log_to_stderr():
    """--debug: the library's loggers (kernel/log.py) write to stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sdtrace: debug: %(name)s: %(message)s"))
    root = logging.getLogger("sdtrace")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.debug:
        _log_to_stderr()
    stdout = sys.stdout
    try:
        _check_positive(args)
        from .present.output import whole_lines

        sys.stdout = whole_lines(stdout)
        try:
            return args.run(args)
        finally:
            sys.stdout.flush()
            sys.stdout = stdout
    except SdtraceError as error:
        sys.stderr.write(f"sdtrace: {error}\n")
        return 1
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): not an error
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
