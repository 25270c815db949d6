"""Running a session for a command line: open it from the options, stop it on
Ctrl-C, SIGTERM, ``-d`` or the command's exit, and say how it ended.

The subcommands (cli.py) and the language tools (tools/) share it, so each
ends the same way: the warnings of the session, the lines on late semaphore
raises and on the traced command, then ``sdtrace: N events, M lost``.
"""
import sys

from . import output


def warn(message):
    sys.stderr.write(f"sdtrace: warning: {message}\n")


class StopFlag:
    """SIGINT/SIGTERM ask the trace loop to stop at its next turn (within 0.1 s).

    A flag, not KeyboardInterrupt: an exception raised between reading a ring
    and writing its events would lose them.
    """

    def __init__(self):
        import signal

        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request)

    def _request(self, _signum, _frame):
        self.requested = True


def open_session(specs, args, tally=None, stop=None):
    """The engine.session.Session of `specs` that the session options of `args` ask for
    (counting in the kernel by `tally` where the executor can; a StopFlag `stop` also
    ends a wait for specs that wait for a library)."""
    from ..engine.session import Session

    return Session(specs, pid=args.pid, command=args.command,
                   buffer_pages=args.buffer_pages, semaphores=args.semaphores, warn=warn,
                   keep_command=args.keep_command, executor=args.executor,
                   string_size=args.string_size, tally=tally,
                   stop=stop and (lambda: stop.requested))


LATE_RAISES_NAMED = 5     # processes named one per line; beyond, a count and the longest


def say_session_end(session):
    """The lines before the summary: processes whose semaphore user mode raised after
    their exec (hits before it were missed), specs that waited for a library and were
    never armed, and what became of -c's command."""
    late = sorted(session.late_raises, key=lambda raise_: -raise_[2])
    for pid, comm, seconds in late[:LATE_RAISES_NAMED]:
        sys.stderr.write(f"sdtrace: semaphore of {pid} ({comm}) raised {seconds * 1e3:.1f} ms "
                         f"after exec\n")
    if len(late) > LATE_RAISES_NAMED:
        sys.stderr.write(f"sdtrace: and of {len(late) - LATE_RAISES_NAMED} more processes, "
                         f"up to {late[LATE_RAISES_NAMED][2] * 1e3:.1f} ms after exec\n")
    if session.unmatched:
        sys.stderr.write(f"sdtrace: never armed: {', '.join(session.unmatched)}: nothing the "
                         "traced process loaded had it\n")
    if session.command_ending:
        sys.stderr.write(f"sdtrace: {session.command_ending}\n")


def aggregate(args, specs, plan, interval=None, on_interval=None, on_pair=None, exports=None):
    """Run `plan` (present.aggregate) on a session of `specs`; return (its result, the session).

    Ends at -d, Ctrl-C/SIGTERM or the exit of -c's command, always with the
    final result; `on_interval(aggregator, elapsed seconds)` runs every
    `interval` seconds.  `exports` (present.export.Exports) get a snapshot
    every interval, and the pairs.
    """
    import time

    from . import aggregate as aggregations

    if exports is not None:
        interval, on_interval, on_pair = exports.hooks(interval, on_interval, on_pair)
    stop = StopFlag()
    tally = None if on_pair else aggregations.tally_for(         # a timeline needs the records
        plan, getattr(args, "max_keys", None) or aggregations.DEFAULT_MAX_KEYS)
    session = open_session(specs, args, tally, stop)
    with session:
        aggregator = aggregations.KernelExecutor(session).aggregator(plan, on_pair)
        if exports is not None:
            exports.attach(session, aggregator)
        sys.stderr.write(f"sdtrace: tracing {len(session.sites)} site(s); Ctrl-C to end\n")
        started = time.monotonic()
        for batch in session.batches(None, args.duration, lambda: stop.requested, interval,
                                     on_interval and (lambda: on_interval(
                                         aggregator, time.monotonic() - started))):
            aggregator.add(batch)
        aggregator.flush()
    if exports is not None:
        exports.close()        # the last snapshot sent, before the summary line
    if session.lost and session.counting_in_kernel:
        warn(f"{session.lost} hits not counted: the map of keys is full (raise --max-keys)")
    elif session.lost:
        warn(f"{output.lost_warning(session.lost)}: the results are low")
    say_session_end(session)
    sys.stderr.write(output.summary_line(session.received, session.lost))
    return aggregator.result(), session


def stream(args, specs, on_records):
    """Run a session of `specs`, handing each batch of records to `on_records(batch)`;
    return the session once it has ended (at -d, Ctrl-C/SIGTERM or the command's exit),
    its end said as every command says it."""
    stop = StopFlag()
    session = open_session(specs, args, stop=stop)
    armed = False
    reported_lost = 0
    try:
        with session:
            armed = True
            sys.stderr.write(f"sdtrace: tracing {len(session.sites)} site(s); Ctrl-C to end\n")
            for batch in session.batches(None, args.duration, lambda: stop.requested):
                on_records(batch)
                if session.lost != reported_lost:
                    warn(output.lost_warning(session.lost - reported_lost))
                    reported_lost = session.lost
    finally:
        if armed:
            say_session_end(session)
            sys.stderr.write(output.summary_line(session.received, session.lost))
    return session
