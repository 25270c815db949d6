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
the command's first instruction).
"""
import os
import re
import shlex
import signal
import time

from . import events, fetchargs, perf, providers, specs, targets, tracefs
from .errors import SdtraceError


class Session:
    """Arm probe specs and read their events::

        with sdtrace.Session(["libpython3.11:python:function__entry"]) as session:
            for event in session.events(duration=5):
                print(event.comm, event.probe, event.args)
    """

    def __init__(self, probe_specs, pid=None, command=None, buffer_pages=None):
        if pid is not None and command is not None:
            raise SdtraceError("give a PID or a command, not both")
        self.spec_texts = list(probe_specs)
        self.pid = pid
        self.command = shlex.split(command) if isinstance(command, str) else command
        self.buffer_pages = buffer_pages
        self.sites = []
        self.warnings = []
        self.lost = 0            # samples the rings dropped (exact once finish() ran)
        self.received = 0        # samples read from the rings
        self.child = None        # pid of the command, while it runs
        self.exit_status = None  # the command's, once it has exited
        self._group = None
        self._rings = None
        self._decoder = events.Decoder()
        self._release_child = None

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
        tracefs.root()
        tracefs.remove_stale()
        selected = self._select()
        if self.command:
            self.child, self._release_child = _fork_held(self.command)
        self._define(selected)
        self._arm()
        if self._release_child:
            self._release_child()
            self._release_child = None

    def _select(self):
        parsed = [specs.parse_spec(text) for text in self.spec_texts]
        if not parsed:
            raise SdtraceError("no probe spec given")
        if self.pid is not None:
            context = targets.process_objects(self.pid)
        elif self.command:
            context = targets.command_objects(self.command[0])
        else:
            context = ()
        unique = {}
        for probe, spec in specs.select_probes(parsed, context):
            key = (probe.file, probe.offset, probe.provider, probe.name)
            if key not in unique:
                unique[key] = (probe, spec)
        return list(unique.values())

    def _define(self, selected):
        definitions = []
        self._group = tracefs.new_group()
        for index, (probe, spec) in enumerate(selected):
            if probe.semaphore_error:
                raise SdtraceError(f"{probe.file}: {probe.qualified_name}: unusable semaphore: "
                                   f"{probe.semaphore_error}")
            plans = fetchargs.plan_probe(probe, providers.argument_types(probe, spec.types))
            for argument, plan in enumerate(plans):
                if plan.unavailable:
                    self.warnings.append(f"{probe.file}: {probe.qualified_name}: argument "
                                         f"{argument} is unavailable: {plan.unavailable}")
            event = f"e{index}_{_NOT_IDENTIFIER.sub('_', probe.qualified_name)}"
            event = event[:tracefs.MAX_NAME_LENGTH]
            definitions.append(tracefs.UprobeDefinition(
                self._group, event, probe.file, probe.offset, probe.semaphore,
                (events.COMM_FETCH, *fetchargs.fetch_arguments(plans))))
            self.sites.append(events.ProbeSite(probe.qualified_name, probe.file, probe.offset,
                                               event, tuple(plans)))
        tracefs.add_uprobes(definitions)

    def _arm(self):
        self._rings = perf.RingSet(data_pages=self.buffer_pages)
        owners = self._traced_tasks()
        for site in self.sites:
            event_format = tracefs.event_format(self._group, site.event)
            event_id = tracefs.event_id(self._group, site.event)
            for task in owners:
                sample_ids = self._rings.open(
                    event_id, task, inherit=task != -1, enable_on_exec=self.child is not None,
                    wakeup_events=WAKEUP_EVENTS)
                self._decoder.add(sample_ids, site, event_format)
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
            raise SdtraceError(f"process {self.pid} does not exist") from None

    # -- streaming -----------------------------------------------------------

    def read_records(self, timeout=0.1, writer=None):
        """One batch of records (see events.py), waiting up to `timeout` seconds for data.

        With `writer` (an output.EventWriter) the batch holds its formatted
        lines instead, as (ts, probe, text).
        """
        rings = self._rings
        if not rings.pending:
            rings.wait(timeout)
        items, lost = rings.drain(self._decoder.parsers(writer or events.RECORDS), DRAIN_BYTES)
        self.lost += lost
        self.received += len(items)
        self._reap_child()
        return items

    @property
    def running(self):
        """False once a traced command has exited and the backlog (perf.py) is read."""
        return self.child is None or self.exit_status is None or self._rings.pending

    def _reap_child(self):
        if self.child is None or self.exit_status is not None:
            return
        pid, status = os.waitpid(self.child, os.WNOHANG)
        if pid:
            self.exit_status = os.waitstatus_to_exitcode(status)
            if self.exit_status < 0:          # killed by a signal: the shell's convention
                self.exit_status = 128 - self.exit_status

    def events(self, count=None, duration=None):
        """Yield Event objects until `count` events, `duration` seconds, or the command exits."""
        deadline = None if duration is None else time.monotonic() + duration
        seen = 0
        while True:
            running = self.running
            for record in self.read_records(_timeout(deadline)):
                yield events.Event.from_record(record)
                seen += 1
                if count is not None and seen >= count:
                    return
            if not running or (deadline is not None and time.monotonic() >= deadline):
                return

    # -- tear-down -----------------------------------------------------------

    def finish(self, writer=None):
        """Stop sampling and return the records (or `writer`'s lines) still in the rings.

        Call it before close().  Afterwards `lost` is exact: the kernel reports
        a lost sample only at its next write to the ring, so the last losses
        are counted from the events' hit counters instead (hits = received +
        lost).
        """
        self._rings.disable()
        items, lost = self._rings.drain(self._decoder.parsers(writer or events.RECORDS))
        self.received += len(items)
        self.lost = max(self.lost + lost, self._rings.hit_count() - self.received)
        return items

    def close(self):
        """Disarm and delete everything this session armed; safe to call twice."""
        if self._release_child:              # failed before the command could start
            os.kill(self.child, signal.SIGKILL)
            self._release_child = None
            self._reap_child_blocking()
        if self._rings is not None:
            self._rings.close()
        if self._group is not None:
            group, self._group = self._group, None
            tracefs.remove_group(group)

    def stop_command(self):
        """End a traced command that is still running (for -n / -d limits)."""
        if self.child is not None and self.exit_status is None:
            try:
                os.kill(self.child, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._reap_child_blocking()

    def _reap_child_blocking(self):
        if self.exit_status is None:
            _pid, status = os.waitpid(self.child, 0)
            self.exit_status = os.waitstatus_to_exitcode(status)
            if self.exit_status < 0:
                self.exit_status = 128 - self.exit_status


WAKEUP_EVENTS = 64   # samples per ring before poll() wakes us; timeouts pick up the rest
# Bytes of samples decoded per read_records() (~3,000 samples, ~5 ms): a reader behind
# a burst goes back to the rings that often, and the backlog absorbs the burst (perf.py).
DRAIN_BYTES = 256 << 10


def _timeout(deadline, default=0.1):
    if deadline is None:
        return default
    return max(0.0, min(default, deadline - time.monotonic()))


_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_]")


def _fork_held(argv):
    """Fork `argv` held before exec; return (pid, release) -- release() lets it exec."""
    gate_read, gate_write = os.pipe()
    error_read, error_write = os.pipe()
    os.set_inheritable(error_write, False)
    pid = os.fork()
    if pid == 0:  # child: wait for the gate, then exec; report an exec failure
        try:
            os.close(gate_write)
            os.close(error_read)
            os.read(gate_read, 1)
            os.close(gate_read)
            os.execvp(argv[0], argv)
        except OSError as error:
            os.write(error_write, f"{argv[0]}: {error.strerror}".encode())
        finally:
            os._exit(127)
    os.close(gate_read)
    os.close(error_write)

    def release():
        os.write(gate_write, b"x")
        os.close(gate_write)
        message = os.read(error_read, 4096)  # EOF (b"") once exec succeeded
        os.close(error_read)
        if message:  # the child has exited; Session.close() reaps it
            raise SdtraceError(f"cannot run command: {message.decode(errors='replace')}")
    return pid, release
