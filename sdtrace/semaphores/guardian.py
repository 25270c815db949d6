"""Crash recovery for user-space semaphores: the guardian process and its ledger.

A session that raised SDT semaphores in other processes (manager.py) must
take its increments back even when it is SIGKILLed.  Two mechanisms do it:

1. **The guardian.**  ``GuardianLink`` starts ``python -m sdtrace.semaphores.guardian``
   in its own session (so a Ctrl-C or a terminal hang-up does not reach it)
   and tells it every change of the session's holdings as a JSON line on a
   pipe: ``{"holding": {...}, "count": N}`` (0 = no longer held).  The
   manager writes a counter before it reports a raise, and reports a lower
   before it writes: if the session dies between the two, an increment is
   left behind rather than somebody else's taken.  When the pipe reaches end
   of file without the line ``done``, the session died: the guardian lowers
   everything still held (re-checking each process's start time and mapping
   first, counters.revert_holdings) within moments, removes the ledger and
   exits.  After ``done`` it only removes the ledger.

2. **The ledger file.**  The guardian keeps what it holds in
   ``/run/sdtrace/semaphores-<pid>-<starttime>-<n>.json`` (owner and guardian
   PIDs with their start times, and the holdings), replaced atomically after
   every batch of changes.  If the guardian is killed too, ``sdtrace
   cleanup`` -- or anything calling ``revert_dead_ledgers()`` -- reverts the
   ledgers whose owner and guardian are both gone.

The guardian also undoes the session's code patches: ``-c`` in user mode
plants an int3 in each traced process's loader (engine/command.py), which
would kill the process at its next dlopen once no tracer serves it.  Each
patch is told as ``{"patch": {...}, "planted": true|false}``; when the
session dies the guardian restores every planted byte first
(procmem.CodePatch.undo, which checks process, mapping and byte).  A
process stopped at that trap at the very moment of the death, or one that
reaches it in the milliseconds before the guardian restores it, is not
saved.

The guardian does not follow forks made after the session died: a child
forked from a raised process in the moment before the guardian lowers it
keeps a copy of the increment until it exits.
"""
import fcntl
import glob
import itertools
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import asdict

from ..errors import SdtraceError
from ..kernel.procfs import alive, read_starttime
from ..kernel.procmem import CodePatch
from .counters import RUN_DIR, Holding, ensure_run_dir, log_warning, revert_holdings

LEDGER_PATTERN = "semaphores-*.json"
DONE = b"done"
READY = "ready"
READY_TIMEOUT = 10.0
SCRATCH_SUFFIX = ".tmp"

_ledger_numbers = itertools.count()


def _entry(holding, count):
    """The JSON object of one holding, on the pipe and in the ledger; count 0: no longer held."""
    return {"holding": asdict(holding), "count": count}


def _from_entry(entry):
    """(Holding, count) of a JSON object made by _entry."""
    return Holding(**entry["holding"]), entry["count"]


class GuardianLink:
    """The session's end of the guardian: spawns it and keeps it told."""

    def __init__(self, warn=log_warning):
        ensure_run_dir()
        self._warn = warn
        owner, starttime = os.getpid(), read_starttime(os.getpid())
        self.ledger_path = os.path.join(
            RUN_DIR, f"semaphores-{owner}-{starttime}-{next(_ledger_numbers)}.json")
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [package_root, environment.get("PYTHONPATH")]))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sdtrace.semaphores.guardian", self.ledger_path, str(owner),
                 str(starttime)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                cwd="/", env=environment)
        except OSError as error:
            raise SdtraceError(f"cannot start the semaphore guardian: {error.strerror}") from None
        ready = ""
        if select.select([self.process.stdout], [], [], READY_TIMEOUT)[0]:
            ready = self.process.stdout.readline().decode().strip()
        self.process.stdout.close()
        if ready != READY:
            self.process.kill()
            self.process.wait()
            raise SdtraceError(f"the semaphore guardian did not start (said {ready!r})")

    def record(self, holding, count):
        """Tells the guardian that the session now holds `count` increments of `holding`."""
        self._send(json.dumps(_entry(holding, count)).encode() + b"\n")

    def record_patch(self, patch, planted):
        """Tells the guardian that code patch `patch` is in place (or is gone)."""
        self._send(json.dumps({"patch": asdict(patch), "planted": planted}).encode() + b"\n")

    def finish(self):
        """The session ended cleanly: the guardian drops the ledger and exits."""
        self._send(DONE + b"\n")
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            self.process.stdin = None
        self.process.wait()
        try:
            os.unlink(self.ledger_path)  # normally the guardian's job; not if it died
        except FileNotFoundError:
            pass

    def _send(self, line):
        if self.process.stdin is None:
            return
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except BrokenPipeError:
            self.process.stdin = None
            self._warn(f"the semaphore guardian (process {self.process.pid}) is gone: "
                       f"if this session dies, run 'sdtrace cleanup'")


def write_ledger(path, owner, guardian, holdings):
    """Replaces the ledger at `path` atomically."""
    record = {"owner": owner, "guardian": guardian,
              "holdings": [_entry(holding, count) for holding, count in holdings.items()]}
    scratch = path + SCRATCH_SUFFIX
    with open(scratch, "w") as ledger:
        json.dump(record, ledger)
    os.replace(scratch, path)


def read_ledger(path):
    """(owner, guardian, [(Holding, count)]) from a ledger file."""
    with open(path) as ledger:
        record = json.load(ledger)
    holdings = [_from_entry(entry) for entry in record["holdings"]]
    return record["owner"], record["guardian"], holdings


def revert_dead_ledgers(warn=log_warning):
    """Reverts the ledgers whose session and guardian are both gone; returns how many.

    Each ledger is locked while it is reverted and removed, so two cleanups
    never lower the same increments twice."""
    reverted = 0
    for path in sorted(glob.glob(os.path.join(RUN_DIR, LEDGER_PATTERN))):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another cleanup has it
            if os.fstat(fd).st_nlink == 0:
                continue  # removed (or replaced) while we waited
            try:
                owner, guardian, holdings = read_ledger(path)
            except (OSError, ValueError, KeyError, TypeError) as error:
                warn(f"{path}: unreadable semaphore ledger: {error}")
                continue
            if any(alive(process["pid"], process["starttime"]) for process in (owner, guardian)):
                continue
            revert_holdings(holdings, warn)
            for leftover in (path, path + SCRATCH_SUFFIX):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            reverted += 1
        finally:
            os.close(fd)
    return reverted


def main(argv):
    """The guardian: mirrors the holdings from stdin; reverts them if stdin ends early."""
    ledger_path, owner_pid, owner_starttime = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    owner = {"pid": int(owner_pid), "starttime": int(owner_starttime)}
    guardian = {"pid": os.getpid(), "starttime": read_starttime(os.getpid())}
    holdings, patches = {}, set()
    write_ledger(ledger_path, owner, guardian, holdings)
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    pending, finished = b"", False
    while True:
        chunk = os.read(sys.stdin.fileno(), 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line == DONE:
                finished = True
            elif line.startswith(b'{"patch"'):
                entry = json.loads(line)
                patch = CodePatch(**entry["patch"])
                (patches.add if entry["planted"] else patches.discard)(patch)
            elif line:
                holding, count = _from_entry(json.loads(line))
                if count:
                    holdings[holding] = count
                else:
                    holdings.pop(holding, None)
        write_ledger(ledger_path, owner, guardian, holdings)
    if not finished:
        for patch in patches:            # first: a trap nobody serves kills the process
            patch.undo()
        revert_holdings(holdings.items(), _warn_on_stderr)
    os.unlink(ledger_path)
    return 0


def _warn_on_stderr(message):
    """The guardian is a program of its own: its warnings go to its stderr (the session's)."""
    sys.stderr.write(f"sdtrace guardian: warning: {message}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
