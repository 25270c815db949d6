"""A tracing session: select sites, arm them, stream events, disarm.

The life of a session, in order:

1. **select** -- specs become probe sites (specs.py, notes.py); every argument
   gets a fetch plan (fetchargs.py) and unavailable ones become warnings;
2. **define** -- one uprobe event per site in a group named after this
   session (tracefs.py), with the semaphore's file offset as ``ref_ctr``
   so that the kernel counts the semaphore exactly once per process;
3. **arm** -- open every event with perf_event_open on every CPU, redirected
   into one ring per CPU (perf.py).  From here the breakpoints and the
   semaphore increments are owned by our file descriptors: if this process
   dies, even by SIGKILL, the kernel closes them and disarms everything;
4. **stream** -- drain the rings, decode samples into events (events.py);
5. **disarm** -- close the fds, then delete the definitions.  Definitions
   left by a session that was killed are deleted by the next session or by
   ``sdtrace cleanup``.

Scope: system-wide (every process mapping the files, now or later), one
process (``pid``: each of its threads, inherited by later threads and
children), or a command (``command``: forked, held before exec until the
events are open and set to enable on exec, so the semaphore is raised before
the command's first instruction; see command.py).  A command still running
when the session closes is ended (SIGTERM, then SIGKILL), or left running
with ``keep_command``; ``command_ending`` says which.

Semaphores are counted by the kernel (``semaphores="kernel"``: ref_ctr, as
above) or by sdtrace itself (``"user"``: the uprobes are defined without
ref_ctr and semaphores.manager.SemaphoreManager raises each counter once per process
through /proc/PID/mem; a command is then held by ptrace at exec and at each
library load so the counters are raised before it can test them).  ``"auto"``
takes the kernel when it supports ref_ctr_offset (``auto_semaphores()`` says
which and why, from kernel/features.py).

The library never writes to stderr: every warning (an argument that cannot be
fetched, a process whose counter cannot be written, ...) is appended to
``warnings`` and, as it happens, passed to the ``warn`` callback if one was
given (the CLI prints it).  Decisions and timings are logged at DEBUG on
this module's logger (kernel/log.py).
"""
import os
import re
import shlex
import time

from ..discovery import specs
from ..errors import NoSuchProcess, SdtraceError
from ..kernel import perf, tracefs
from ..kernel.log import logger
from . import events, fetchargs

_log = logger(__name__)


class Session:
    """Arm probe specs and read their events::

        with sdtrace.Session(["libpython3.11:python:function__entry"]) as session:
            for event in session.events(duration=5):
                print(event.comm, event.probe, event.args)
    """

    def __init__(self, probe_specs, pid=None, command=None, buffer_pages=None,
                 semaphores="auto", warn=None, keep_command=False):
        if pid is not None and command is not None:
            raise SdtraceError("give a PID or a command, not both")
        if semaphores not in SEMAPHORE_MODES:
            raise SdtraceError(f"semaphores: {semaphores!r} is not one of "
                               f"{', '.join(SEMAPHORE_MODES)}")
        self.semaphores = semaphores    # "kernel" or "user" once started
        self.spec_texts = list(probe_specs)
        self.pid = pid
        self.command = shlex.split(command) if isinstance(command, str) else command
        if self.command is not None and not self.command:
            raise SdtraceError("-c: empty command")
        self.buffer_pages = buffer_pages
        self.sites = []
        self.warnings = _Warnings(warn)
        self.lost = 0            # samples the rings dropped (exact once finish() ran)
        self.received = 0        # samples read from the rings
        self.child = None        # pid of the command
        self._command = None     # its command.Command
        self.keep_command = keep_command   # at close(): leave the command running, not end it
        self.command_ending = None         # at close(): what became of a command still running
        self._command_closed = False
        self.late_raises = []    # user mode, at close(): (pid, comm, seconds) raised after exec
        self._manager = None     # semaphores.manager.SemaphoreManager, in user mode
        self._group = None
        self._rings = None
        self._decoder = events.Decoder()

    # -- set-up ------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        started = time.monotonic()
        tracefs.root()
        tracefs.remove_stale()
        if self.semaphores == "auto":
            self.semaphores, why = auto_semaphores()
            _log.debug("semaphores: %s, chosen by auto: %s", self.semaphores, why)
        else:
            _log.debug("semaphores: %s, as asked", self.semaphores)
        _log.debug("executor: %s", EXECUTOR)
        selected = self._select()
        user_mode = self.semaphores == "user"
        if self.command is not None:
            from .command import Command

            self._command = Command(self.command, on_load=self._raise_in if user_mode else None,
                                    on_patch=self._guard_patch if user_mode else None)
            self.child = self._command.start()
        if user_mode:
            from ..kernel import procfs
            from ..semaphores import guardian, manager

            guardian.revert_dead_ledgers(self.warnings.append)
            if self.child is not None:
                scope = lambda pid: procfs.descends_from(pid, self.child)  # noqa: E731
            else:
                scope = None if self.pid is None else {self.pid}
            self._manager = manager.SemaphoreManager.for_probes(
                [probe for probe, _spec in selected], scope=scope, warn=self.warnings.append)
        self._define(selected)
        self._arm()
        if self._manager is not None:
            self._manager.start()
        if self._command is not None:
            self._command.release()
            self.warnings.extend(self._command.warnings)
        _log.debug("attached %d site(s) in %.3f s", len(self.sites), time.monotonic() - started)

    def _raise_in(self, pid):
        """User mode: raise the session's counters in process `pid` (and keep them raised)."""
        self._manager.rescan([pid])

    def _guard_patch(self, patch, planted):
        """User mode: the guardian undoes the command's loader int3 if this process dies."""
        if self._manager is not None:
            self._manager.guard_patch(patch, planted)

    def _select(self):
        parsed = [specs.parse_spec(text) for text in self.spec_texts]
        if not parsed:
            raise SdtraceError("no probe spec given")
        selected = specs.select_probes(
            parsed, specs.context_objects(self.pid, self.command, self.warnings.append))
        for site, _spec in selected:
            site.check_armable()
        return selected

    def _define(self, selected):
        definitions = []
        self._group = tracefs.new_group()
        for index, (probe, spec) in enumerate(selected):
            plans = fetchargs.plan_probe(probe, fetchargs.argument_types(probe, spec.types))
            for argument, plan in enumerate(plans):
                if plan.unavailable:
                    self.warnings.append(f"{probe.file}: {probe.qualified_name}: argument "
                                         f"{argument} is unavailable: {plan.unavailable}")
            event = f"e{index}_{_NOT_IDENTIFIER.sub('_', probe.qualified_name)}"
            event = event[:tracefs.MAX_NAME_LENGTH]
            definitions.append(tracefs.UprobeDefinition(
                self._group, event, probe.file, probe.offset,
                probe.semaphore if self.semaphores == "kernel" else None,
                (events.COMM_FETCH, *fetchargs.fetch_arguments(plans))))
            self.sites.append(events.ArmedSite(probe.provider, probe.name, probe.file,
                                               event, tuple(plans)))
        tracefs.add_uprobes(definitions)

    def _arm(self):
        self._rings = perf.RingSet(data_pages=self.buffer_pages)
        owners = self._traced_tasks()
        for site in self.sites:
            event_format = tracefs.event_format(self._group, site.event)
            event_id = tracefs.event_id(self._group, site.event)
            opened = 0
            for task in owners:
                sample_ids = self._rings.open(
                    event_id, task, inherit=task != -1, enable_on_exec=self.child is not None,
                    wakeup_events=WAKEUP_EVENTS)
                self._decoder.add(sample_ids, site, event_format)
                opened += len(sample_ids)
            _log.debug("%s/%s: %d perf fd(s) opened", self._group, site.event, opened)
        if self.child is None:
            self._rings.enable()

    def _traced_tasks(self):
        if self.child is not None:
            return [self.child]
        if self.pid is None:
            return [-1]
        try:
            return sorted(int(tid) for tid in os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            raise NoSuchProcess(self.pid) from None

    # -- streaming -----------------------------------------------------------

    def read_records(self, timeout=0.1, emitter=None):
        """One batch of records (see events.py), waiting up to `timeout` seconds for data.

        With `emitter` (an events.Emitter, e.g. output.LineEmitter) the batch
        holds its items instead, e.g. formatted lines as (ts, probe, text).
        """
        rings = self._rings
        if not rings.pending:
            rings.wait(timeout)
        items, lost = rings.drain(self._decoder.parsers(emitter or events.RECORDS), DRAIN_BYTES)
        self.lost += lost
        self.received += len(items)
        return items

    @property
    def exit_status(self):
        """The command's exit status once it has exited by itself (128+N if killed by
        signal N); None if the session ended it or left it running."""
        if self._command is None or self.command_ending is not None:
            return None          # no command, or the session ended it or left it running
        return self._command.exit_status

    @property
    def running(self):
        """False once the traced command, or every thread of the traced process,
        has exited, and the backlog (perf.py) is read.  A system-wide session runs
        until it is stopped."""
        if self._rings.pending:
            return True
        if self._command is not None:
            return self._command.exit_status is None
        if self.pid is not None:
            return self._rings.alive
        return True

    def batches(self, emitter=None, duration=None, stop=None, interval=None,
                on_interval=None):
        """Yield batches of records (or `emitter`'s items, see read_records) until
        `stop()` is true, `duration` seconds pass, or the traced command or
        process ends; the last batch is what finish() collects.  A batch comes
        at least every 0.1 s (empty if nothing happened); `on_interval()` is
        called every `interval` seconds, after the batch that reaches it.
        """
        now = time.monotonic()
        deadline = None if duration is None else now + duration
        next_tick = None if interval is None else now + interval
        while stop is None or not stop():
            running = self.running
            wakeups = [moment - now for moment in (deadline, next_tick) if moment is not None]
            yield self.read_records(max(0.0, min([0.1, *wakeups])), emitter)
            now = time.monotonic()
            if next_tick is not None and now >= next_tick:
                on_interval()
                next_tick += interval * (1 + (now - next_tick) // interval)
            if not running or (deadline is not None and now >= deadline):
                break
        yield self.finish(emitter)

    def events(self, count=None, duration=None):
        """Yield Event objects until `count` events, `duration` seconds, or the end."""
        seen = 0
        for batch in self.batches(duration=duration):
            for record in batch:
                yield events.Event.from_record(record)
                seen += 1
                if seen == count:
                    return

    # -- tear-down -----------------------------------------------------------

    def finish(self, emitter=None):
        """Stop sampling and return the records (or `emitter`'s items) still in the rings.

        Call it before close().  Afterwards `lost` is exact: the kernel reports
        a lost sample only at its next write to the ring, so the last losses
        are counted from the events' hit counters instead (hits = received +
        lost).
        """
        self._rings.disable()
        items, lost = self._rings.drain(self._decoder.parsers(emitter or events.RECORDS))
        self.received += len(items)
        self.lost = max(self.lost + lost, self._rings.hit_count() - self.received)
        return items

    def close(self):
        """Disarm and delete everything this session armed; safe to call twice."""
        started, armed = time.monotonic(), self._group is not None
        if self._command is not None and not self._command_closed:
            self._end_command()
        if self._rings is not None:
            self._rings.close()
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.stop()
            if self._command is None or self._command.on_load is None:
                self.late_raises = manager.late_raises()   # a held command has no window
        if self._group is not None:
            group, self._group = self._group, None
            tracefs.remove_group(group)
        if armed:
            _log.debug("detached in %.3f s", time.monotonic() - started)


    def _end_command(self):
        """A command does not outlive its session, unless `keep_command` says so."""
        command, self._command_closed = self._command, True
        if self.keep_command and command.leave():
            self.command_ending = f"left command {command.pid} running"
        else:
            ended = command.terminate()
            if ended is not None:
                self.command_ending = f"ended command {command.pid} ({ended})"
        if self.command_ending:
            _log.debug("%s", self.command_ending)


class _Warnings(list):
    """The session's warnings: each one added is also passed to the `warn` callback."""

    def __init__(self, warn):
        super().__init__()
        self._warn = warn

    def append(self, message):
        super().append(message)
        if self._warn is not None:
            self._warn(message)

    def extend(self, messages):
        for message in messages:
            self.append(message)


def auto_semaphores():
    """(mode, why): who counts SDT semaphores when "auto" is asked, on this kernel."""
    from ..kernel import features

    ref_ctr = features.check("tracefs_ref_ctr")
    if ref_ctr.available:
        return "kernel", f"the kernel counts them (ref_ctr_offset in tracefs: {ref_ctr.detail})"
    return "user", (f"the kernel cannot count them ({ref_ctr.detail}): sdtrace writes them "
                    "through /proc/PID/mem")


SEMAPHORE_MODES = ("auto", "kernel", "user")
# The one executor of this version: uprobes defined in tracefs, read through perf rings.
EXECUTOR = "tracefs"
WAKEUP_EVENTS = 64   # samples per ring before poll() wakes us; timeouts pick up the rest
# Bytes of samples decoded per read_records() (~3,000 samples, ~5 ms): a reader behind
# a burst goes back to the rings that often, and the backlog absorbs the burst (perf.py).
DRAIN_BYTES = 256 << 10


_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_]")
