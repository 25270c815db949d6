"""A tracing session: select sites, arm them with an executor, stream events, disarm.

The life of a session, in order:

1. **select** -- specs become probe sites (discovery/specs.py, notes.py);
2. **arm** -- an *executor* arms every site and will read its hits:
   ``"tracefs"`` (tracefs/executor.py: a uprobe event per site, perf rings,
   the kernel's fetch-args) or ``"bpf"`` (bpf/executor.py: one generated BPF
   program and one uprobe_multi link per file, one BPF ring buffer).  Both
   are owned by file descriptors: if this process dies, even by SIGKILL,
   the kernel disarms everything.  ``"auto"`` takes bpf where the kernel
   has what it needs and the sites' machine is one it generates code for
   (``choose_executor()`` says which and why; a fallback is one warning);
3. **stream** -- the executor's records, or an emitter's items (events.py);
4. **disarm** -- finish() reads the rest and makes ``lost`` exact, close()
   disarms.

Both executors hand out the same items: the same fields, the same decoded
values (the suite runs against both).  What differs: the BPF executor reads
SIB operands and HotSpot's (pointer, length) strings, cuts strings at
``string_size`` bytes (marked), and arms hundreds of sites at once.

Scope: system-wide (every process mapping the files, now or later), one
process (``pid``: each of its threads; the tracefs executor also follows its
children, tracefs/scope.py), or a command (``command``: forked, held before
exec until the sites are armed, so the semaphore is raised before the
command's first instruction; the BPF executor follows the command's process
tree in a map the kernel keeps, bpf/scope.py, the tracefs executor from the
proc connector; see command.py).  A command
still running when the session closes is ended (SIGTERM, then SIGKILL), or
left running with ``keep_command``; ``command_ending`` says which.

Semaphores are counted by the kernel (``semaphores="kernel"``: ref_ctr in
tracefs, ref_ctr_offsets in the BPF link) or by sdtrace itself (``"user"``:
no ref_ctr, and semaphores.manager.SemaphoreManager raises each counter once
per process through /proc/PID/mem; a command is then held by ptrace at exec
and at each library load so the counters are raised before it can test
them).  ``"auto"`` takes the kernel when it supports ref_ctr_offset
(``auto_semaphores()`` says which and why, from kernel/features.py).

The library never writes to stderr: every warning (an argument that cannot be
fetched, a process whose counter cannot be written, ...) is appended to
``warnings`` and, as it happens, passed to the ``warn`` callback if one was
given (the CLI prints it).  Decisions and timings are logged at DEBUG on
this module's logger (kernel/log.py).
"""
import mmap
import shlex
import time

from ..discovery import specs
from ..errors import SdtraceError
from ..kernel import tracefs
from ..kernel.log import logger
from . import events

_log = logger(__name__)


class Session:
    """Arm probe specs and read their events::

        with sdtrace.Session(["libpython3.11:python:function__entry"]) as session:
            for event in session.events(duration=5):
                print(event.comm, event.probe, event.args)
    """

    def __init__(self, probe_specs, pid=None, command=None, buffer_pages=None,
                 semaphores="auto", warn=None, keep_command=False, executor="auto",
                 string_size=None, tally=None, stop=None):
        if pid is not None and command is not None:
            raise SdtraceError("give a PID or a command, not both")
        for label, value, choices in (("semaphores", semaphores, SEMAPHORE_MODES),
                                      ("executor", executor, EXECUTORS)):
            if value not in choices:
                raise SdtraceError(f"{label}: {value!r} is not one of {', '.join(choices)}")
        if string_size is not None and not 1 <= string_size <= MAX_STRING_SIZE:
            raise SdtraceError(f"string size: {string_size} is not between 1 and "
                               f"{MAX_STRING_SIZE}")
        self.semaphores = semaphores    # "kernel" or "user" once started
        self.executor = executor        # "bpf" or "tracefs" once started
        self.string_size = string_size
        self.tally = tally      # sites -> bpf.tally.Tally: the bpf executor counts, no records
        self.spec_texts = list(probe_specs)
        self.pid = pid
        self.command = shlex.split(command) if isinstance(command, str) else command
        if self.command is not None and not self.command:
            raise SdtraceError("-c: empty command")
        self.buffer_pages = buffer_pages
        self.sites = []
        self.warnings = _Warnings(warn)
        self.child = None        # pid of the command
        self._command = None     # its command.Command
        self.keep_command = keep_command   # at close(): leave the command running, not end it
        self.command_ending = None         # at close(): what became of a command still running
        self._command_closed = False
        self.late_raises = []    # user mode, at close(): (pid, comm, seconds) raised after exec
        self._manager = None     # semaphores.manager.SemaphoreManager, in user mode
        self._executor = None    # the executor's object, once armed
        self._parsed = None      # the specs, parsed once (specs.ProbeSpec)
        self._loaded = None      # a command's specs waiting for an object: _Loaded
        self.unmatched = []      # specs that waited and were not armed: nothing matched them
        self.stop = stop         # stop(): true when the user asked to stop (while waiting)

    @property
    def lost(self):
        """Hits with no record: the buffers had no room (exact once finish() ran)."""
        return self._executor.lost if self._executor is not None else 0

    @property
    def received(self):
        """Records read."""
        return self._executor.received if self._executor is not None else 0

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
        tracefs.root()      # mounted if missing; what an unprivileged user hears first
        if self.semaphores == "auto":
            self.semaphores, why = auto_semaphores()
            _log.debug("semaphores: %s, chosen by auto: %s", self.semaphores, why)
        else:
            _log.debug("semaphores: %s, as asked", self.semaphores)
        selected, waiting = self._select()
        companions = [] if waiting else self._companions(selected)
        if self.command is not None:
            from .command import Command

            holding = waiting or self.semaphores == "user" or bool(companions)
            self._command = Command(self.command, on_load=self._on_load if holding else None,
                                    on_patch=self._guard_patch if holding else None)
            self.child = self._command.start()
        if waiting:
            selected = self._wait_for(waiting, selected)
            companions = self._companions(selected)
        try:
            self._arm_selected(selected, companions)
        finally:
            self._let_loaded_go()
        if self._command is not None:
            if not waiting:
                self._command.release()
            self.warnings.extend(self._command.warnings)
        _log.debug("attached %d site(s) with the %s executor in %.3f s", len(self.sites),
                   self.executor, time.monotonic() - started)

    def _arm_selected(self, selected, companions):
        """Choose the executor, start raising what sdtrace raises itself (the semaphores
        of `companions` too), arm `selected`."""
        self.executor, why = choose_executor(self.executor,
                                             {site.machine for site, _spec in selected})
        _log.debug("executor: %s (%s)", self.executor, why)
        if self.executor == "tracefs" and why.startswith(FALLBACK):
            self.warnings.append(f"executor: tracefs, {why}")
        if self.executor == "tracefs" and self.string_size is not None:
            self.warnings.append("--string-size applies to the bpf executor: the tracefs "
                                 "executor reads whole strings")
        self._say_unmet_rules(selected)
        user_mode = self.semaphores == "user"
        if user_mode or companions:          # sdtrace writes counters itself
            from ..kernel import procfs
            from ..semaphores import guardian, manager

            guardian.revert_dead_ledgers(self.warnings.append)
            if self.child is not None:
                scope = lambda pid: procfs.descends_from(pid, self.child)  # noqa: E731
            else:
                scope = None if self.pid is None else {self.pid}
            armed = [probe for probe, _spec in selected] if user_mode else []
            self._manager = manager.SemaphoreManager.for_probes(
                armed + companions, scope=scope, warn=self.warnings.append)
        self._executor = self._arm(selected)
        self.sites = self._executor.sites
        self.warnings.extend(self._executor.warnings)
        self._executor.enable()
        if self._manager is not None:
            self._manager.start()

    def _wait_for(self, waiting, selected):
        """The sites of the specs, selected in the objects of the traced process once
        one of `waiting` (specs that matched nothing yet) is mapped there too.

        A command runs, stopped at each of its library loads (command.py) until one
        of its processes maps an object a waiting spec selects in; it stays stopped
        there while the session arms that process and the children it forks from
        then on, so no hit of theirs after that load is missed.  A process (-p) is re-read
        every WAIT_POLL seconds.  Hits of the specs that matched from the start are
        not seen before then; specs that still match nothing are said, and left out
        (a tool names every runtime it serves: the one that comes is armed)."""
        names = ", ".join(spec.text for spec in waiting)
        whose = "-c's command" if self.command is not None else f"process {self.pid}"
        self.warnings.append(f"waiting for {names}: nothing {whose} maps has it yet; armed "
                             "when an object that has it is loaded")
        if selected:
            self.warnings.append("the other specs are armed then too: their hits before "
                                 "are not seen")
        parsed = self._parsed
        if self.command is not None:
            self._loaded = _Loaded(waiting)
            self._command.release()
            while not self._loaded.matched.wait(WAIT_POLL):
                if self._command.exit_status is not None:
                    raise SdtraceError(f"{names}: matched nothing in what the command loaded "
                                       "before it exited")
                self._check_stop(names)
            return self._select_loaded(parsed, self._loaded.objects)
        from ..discovery import targets
        from ..kernel import procfs

        starttime = procfs.read_starttime(self.pid)
        known = {}               # path -> its sites: each object's notes are read once
        while True:
            try:
                objects = targets.process_objects(self.pid, self.warnings.append)
            except SdtraceError:
                objects = None
            if objects is not None and _any_match(waiting, objects, known):
                return self._select_loaded(parsed, objects)
            if not procfs.alive(self.pid, starttime):
                raise SdtraceError(f"{names}: matched nothing in what process {self.pid} "
                                   "mapped before it exited")
            self._check_stop(names)
            time.sleep(WAIT_POLL)

    def _select_loaded(self, parsed, objects):
        """The sites `parsed` select in `objects`, the specs that select none said."""
        unmatched = []
        selected = specs.select_probes(parsed, objects, unmatched)
        self.unmatched = [spec.text for spec in unmatched]
        return selected

    def _let_loaded_go(self):
        """The command stopped at the load that armed the session goes on (armed or not:
        a session that failed to arm must not leave it waiting)."""
        if self._loaded is not None:
            self._loaded.armed.set()

    def _check_stop(self, names):
        if self.stop is not None and self.stop():
            raise SdtraceError(f"stopped while waiting for {names}")

    def _on_load(self, pid):
        """At a stop of the command after it mapped objects (its thread): arm what waited
        for them, or raise sdtrace's counters in that process."""
        loaded = self._loaded
        if loaded is not None and not loaded.matched.is_set():
            from ..discovery import targets

            try:
                objects = targets.process_objects(pid)
            except SdtraceError:
                return
            if _any_match(loaded.waiting, objects):
                loaded.objects, loaded.pid = objects, pid
                loaded.matched.set()
                loaded.armed.wait()          # the session arms; this process stands still
            return
        if self._manager is not None:
            self._manager.rescan([pid])

    def _arm(self, selected):
        sites = [site for site, _spec in selected]
        kernel_semaphores = self.semaphores == "kernel"
        if self.executor == "tracefs":
            from .tracefs.executor import TracefsExecutor

            running = self._loaded is not None        # a command past its exec: as -p
            return TracefsExecutor(sites, [spec.types for _site, spec in selected],
                                   pid=self._loaded.pid if running else self.pid,
                                   child=None if running else self.child,
                                   kernel_semaphores=kernel_semaphores,
                                   buffer_pages=self.buffer_pages, warn=self.warnings.append)
        from . import fetchargs
        from .bpf import codegen
        from .bpf.executor import BpfExecutor

        types = [fetchargs.argument_types(site, spec.types, codegen.plan_argument)
                 for site, spec in selected]
        root = self.child if self.child is not None else self.pid
        if self._loaded is not None:     # the process of the command that loaded them, and
            root = self._loaded.pid      # its children from then on
        return BpfExecutor(sites, types, pid=root or 0, children=self.child is not None,
                           ring_bytes=_ring_bytes(self.buffer_pages),
                           string_length=self.string_size or codegen.DEFAULT_STRING_LENGTH,
                           kernel_semaphores=kernel_semaphores,
                           tally=self.tally and self.tally(sites))

    @property
    def counting_in_kernel(self):
        """Whether the hits are counted in kernel maps (a tally on the bpf executor)."""
        return getattr(self._executor, "tally", None) is not None

    def tally_counts(self):
        """With counting_in_kernel: the counts so far by raw key, or the histograms
        (engine/bpf/tally.py)."""
        return self._executor.counts()

    def tally_spans(self):
        """With counting_in_kernel latencies: the span counters (engine/bpf/tally.py)."""
        return self._executor.spans()

    def tally_missing(self):
        """With counting_in_kernel a histogram: the hits whose value could not be read."""
        return self._executor.missing()

    def _guard_patch(self, patch, planted):
        """User mode: the guardian undoes the command's loader int3 if this process dies."""
        if self._manager is not None:
            self._manager.guard_patch(patch, planted)

    def _say_unmet_rules(self, selected):
        """One line per runtime rule (providers.RUNTIME_RULES) a selected probe needs and
        the traced process or command lacks (discovery/rules.py: a JVM flag, an
        environment variable); system-wide, what the processes need."""
        from ..discovery import rules

        needed = rules.needed(dict.fromkeys((site.provider, site.name)
                                            for site, _spec in selected))
        for rule, probe in needed.items():
            if self.pid is None and self.command is None:
                self.warnings.append(f"{probe} fires only in processes started with "
                                     f"{rules.setting(rule)}")
                continue
            lack = rules.unmet(rule, self.pid, self.command)
            if lack is not None:
                self.warnings.append(f"{lack}: {probe} will not fire; start it with "
                                     f"{rules.setting(rule)}")

    def _companions(self, selected):
        """The sites whose semaphore is raised without arming them, because a selected
        probe fires only while it is (providers.SEMAPHORE_COMPANIONS); each is said
        in one line.  A companion selected itself is armed as usual."""
        from ..discovery import notes, providers

        chosen = {(site.file, site.provider, site.name) for site, _spec in selected}
        needed = {}          # (file, provider, companion) -> the name of a probe needing it
        for site, _spec in selected:
            companion = providers.semaphore_companion(site.provider, site.name)
            key = (site.file, site.provider, companion)
            if companion is not None and key not in chosen:
                needed.setdefault(key, site.name)
        companions = []
        for (path, provider, companion), name in needed.items():
            sites = [site for site in notes.read_probes(path) if site.provider == provider
                     and site.name == companion and site.semaphore is not None]
            if sites:
                companions += sites
                self.warnings.append(
                    f"raising {provider}:{companion}'s semaphore without arming it: "
                    f"{provider}:{name} fires for every call only while it is raised")
        return companions

    def _select(self):
        """(the sites the specs select now, the specs that wait: -p/-c only)."""
        parsed = self._parsed = [specs.parse_spec(text) for text in self.spec_texts]
        if not parsed:
            raise SdtraceError("no probe spec given")
        waiting = [] if self.pid is not None or self.command is not None else None
        selected = specs.select_probes(
            parsed, specs.context_objects(self.pid, self.command, self.warnings.append), waiting)
        for site, _spec in selected:
            site.check_armable()
        return selected, waiting

    # -- streaming -----------------------------------------------------------

    def read_records(self, timeout=0.1, emitter=None):
        """One batch of records (see events.py), waiting up to `timeout` seconds for data.

        With `emitter` (an events.Emitter, e.g. output.LineEmitter) the batch
        holds its items instead, e.g. formatted lines as (ts, probe, text).
        """
        return self._executor.read(timeout, emitter or events.RECORDS, DRAIN_BYTES)

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
        has exited, and what the executor holds is read.  A system-wide session
        runs until it is stopped."""
        if self._executor.pending:
            return True
        if self._command is not None:
            return self._command.exit_status is None
        if self.pid is not None:
            return self._executor.alive
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
        """Stop tracing and return the records (or `emitter`'s items) still buffered.

        Call it before close().  Afterwards `lost` is exact: received + lost
        counts every hit.
        """
        return self._executor.finish(emitter or events.RECORDS)

    def close(self):
        """Disarm and delete everything this session armed; safe to call twice."""
        started, armed = time.monotonic(), self._executor is not None
        self._let_loaded_go()
        if self._command is not None and not self._command_closed:
            self._end_command()
        if self._executor is not None:
            self._executor.close()
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.stop()
            if self._command is None or self._command.on_load is None:
                self.late_raises = manager.late_raises()   # a held command has no window
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


class _Loaded:
    """Between a command's thread and the session: the specs waiting for an object, the
    objects of the process that maps one's (set with `matched`), and `armed`, set once
    the session has armed them."""

    def __init__(self, waiting):
        import threading

        self.waiting = waiting
        self.objects = None
        self.pid = None          # the process that mapped them: what is traced from then on
        self.matched = threading.Event()
        self.armed = threading.Event()


def _any_match(waiting, objects, known=None):
    """Whether a spec of `waiting` selects a site in `objects` (targets.ObjectFiles);
    `known` ({path: sites}) keeps the sites read for the next call."""
    from ..discovery import notes

    known = {} if known is None else known
    for item in objects:
        if item.path not in known:
            known[item.path] = notes.read_probes(item.path)
    return any(spec.matches(site) for item in objects for site in known[item.path]
               for spec in waiting)


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


def choose_executor(choice, machines):
    """(executor, why): "bpf" or "tracefs" for `choice` ("auto", "bpf", "tracefs") and
    the machines of the files to arm (e.g. {"x86_64"}).  "bpf" where it cannot run is an
    error naming the cause; "auto" then takes tracefs, and why starts with FALLBACK (or,
    where only this user may not use BPF, says so: tracefs will ask for root itself)."""
    if choice == "tracefs":
        return "tracefs", "as asked"
    from ..kernel import features
    from .bpf import codegen

    missing = [feature for feature in map(features.check, BPF_FEATURES)
               if not feature.available]
    links = [features.check(name) for name in BPF_LINKS]
    if not any(feature.available for feature in links):
        missing += links
    machines = sorted(set(machines) - set(codegen.REGISTERS))
    if missing:
        why = "; ".join(f"{feature.name} (Linux {feature.kernel}): {feature.detail}"
                        for feature in missing)
    elif machines:
        why = f"it generates code for {', '.join(codegen.REGISTERS)}, not {', '.join(machines)}"
    else:
        how = ("uprobe_multi links" if links[0].available else
               "uprobe perf events with BPF perf links (no uprobe_multi links)")
        return "bpf", ("as asked" if choice == "bpf" else
                       f"the kernel has BPF ring buffers and {how}")
    if choice == "bpf":
        raise SdtraceError(f"the bpf executor cannot run here: {why}")
    if missing and all(feature.detail.endswith(features.BPF_PERMISSION) for feature in missing):
        # not the kernel's lack but the user's: tracefs will say what it needs in turn
        return "tracefs", f"BPF is denied to this user: {why}"
    return "tracefs", f"{FALLBACK} {why}"


def auto_semaphores():
    """(mode, why): who counts SDT semaphores when "auto" is asked, on this kernel."""
    from ..kernel import features

    ref_ctr = features.check("tracefs_ref_ctr")
    if ref_ctr.available:
        return "kernel", f"the kernel counts them (ref_ctr_offset in tracefs: {ref_ctr.detail})"
    return "user", (f"the kernel cannot count them ({ref_ctr.detail}): sdtrace writes them "
                    "through /proc/PID/mem")


def _ring_bytes(buffer_pages):
    """The BPF ring's size: as much as the tracefs executor's rings together (`buffer_pages`
    data pages per CPU, 4 MiB if None), a power of two."""
    from ..kernel import perf
    from ..kernel.bpf import possible_cpus

    per_cpu = perf.DEFAULT_RING_BYTES if buffer_pages is None else buffer_pages * mmap.PAGESIZE
    wanted = per_cpu * possible_cpus()
    return 1 << max(wanted - 1, mmap.PAGESIZE).bit_length()


SEMAPHORE_MODES = ("auto", "kernel", "user")
EXECUTORS = ("auto", "bpf", "tracefs")
BPF_FEATURES = ("bpf", "bpf_ringbuf")
BPF_LINKS = ("bpf_uprobe_multi", "uprobe_pmu")    # either arms sites (bpf/executor.LINKS)
FALLBACK = "since the bpf executor cannot run here:"
MAX_STRING_SIZE = 4096
WAIT_POLL = 0.1          # seconds between checks of specs that wait for an object
# Bytes of records decoded per read_records() (~3,000 records, ~5 ms): a reader behind
# a burst goes back to the buffers that often, and they absorb the burst.
DRAIN_BYTES = 256 << 10
