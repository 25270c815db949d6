"""`sdtrace cleanup` after sessions that were killed: their owners are dead even unreaped.

A killed session whose parent does not reap it stays a zombie: its /proc/PID
entry and its start time are still there.  It is dead all the same (its perf
fds are closed, its semaphores no longer raised by it), so cleanup must revert
its ledger and remove its uprobe definitions while the zombies still exist.

The sessions run under a small parent that makes itself a child subreaper and
never reaps, so the session and its guardian (reparented to it when the
session dies) both stay zombies until the test lets the parent go.
"""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import Target, sdtrace, sdtrace_command, sdtrace_uprobe_events, wait_for

from sdtrace.kernel import procfs

PR_SET_CHILD_SUBREAPER = 36
# argv: log file, then the command; prints the command's PID, then waits for
# stdin to close and exits without ever calling wait().
NON_REAPING_PARENT = f"""
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl({PR_SET_CHILD_SUBREAPER}, 1, 0, 0, 0)
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.execv(sys.argv[2], sys.argv[2:])
print(pid, flush=True)
sys.stdin.read()
"""


def state(pid):
    """The state letter of /proc/PID/stat ("Z" for a zombie), None if the PID is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None


class UnreapedSession:
    """`sdtrace trace ARGS` as the child of a parent that never reaps."""

    def __init__(self, tmp_path, *args):
        self.log = tmp_path / f"session-{len(os.listdir(tmp_path))}.log"
        self.parent = subprocess.Popen(
            [sys.executable, "-c", NON_REAPING_PARENT, str(self.log),
             *sdtrace_command("trace", *args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.parent.stdout.readline())
        self.killed = {self.pid}
        armed = wait_for(lambda: "sdtrace: tracing" in self.log.read_text(), timeout=60)
        assert armed, self.log.read_text()

    def group(self):
        """The session's uprobe group, from its definitions."""
        [group] = {group for group in sdtrace_uprobe_events().values()
                   if group.startswith(f"sdtrace_{self.pid}_")}
        return group

    def kill(self, pid=None):
        """SIGKILLs the session (or one of its processes) and waits until it is a zombie."""
        pid = self.pid if pid is None else pid
        self.killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: state(pid) == "Z"), state(pid)

    def release(self):
        """Lets the parent exit and waits until init has reaped the zombies."""
        if self.parent.poll() is None:
            self.parent.stdin.close()
            self.parent.wait(timeout=30)
        self.parent.stdout.close()
        if state(self.pid) not in (None, "Z"):
            os.kill(self.pid, signal.SIGKILL)    # a test that failed before killing it
        assert wait_for(lambda: all(state(pid) is None for pid in self.killed), timeout=30)


def test_an_unreaped_process_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    starttime = procfs.read_starttime(child.pid)
    try:
        assert wait_for(lambda: state(child.pid) == "Z")
        assert not procfs.alive(child.pid, starttime)
    finally:
        child.wait()


# The main thread exits (pthread_exit) while another thread waits for stdin to close.
MAIN_THREAD_EXITS = """
import ctypes, sys, threading
threading.Thread(target=sys.stdin.read).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_alive():
    child = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS], stdin=subprocess.PIPE)
    try:
        starttime = procfs.read_starttime(child.pid)
        assert wait_for(lambda: state(child.pid) == "Z")     # the leader is a zombie ...
        assert procfs.alive(child.pid, starttime)           # ... its process is not
        child.stdin.close()
        assert wait_for(lambda: not procfs.alive(child.pid, starttime))
    finally:
        child.kill()
        child.wait()


def tick_states(pid, library):
    """The `sdtrace semaphores` audit rows of semlib:tick in process `pid`."""
    result = sdtrace("semaphores", "-p", str(pid), "--json", f"{library}:semlib:tick")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def ledger_of(owner):
    [path] = glob.glob(f"/run/sdtrace/semaphores-{owner}-*.json")
    with open(path) as ledger:
        return path, json.load(ledger)


@pytest.mark.kernel
def test_cleanup_reverts_a_user_mode_session_whose_owner_and_guardian_are_zombies(
        fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        session = UnreapedSession(tmp_path, "--executor", "tracefs", "--semaphores", "user",
                                  "-p", str(target.pid), f"{library}:semlib:tick")
        try:
            group = session.group()
            ledger, record = ledger_of(session.pid)
            guardian = record["guardian"]["pid"]
            session.kill(guardian)        # first, or it would revert the counter itself
            session.kill()
            [row] = tick_states(target.pid, library)
            assert (row["value"], row["leaked"]) == (1, True)
            result = sdtrace("cleanup")
            assert result.returncode == 0, result.stderr
            assert (state(session.pid), state(guardian)) == ("Z", "Z")   # still unreaped
            [row] = tick_states(target.pid, library)
            assert (row["value"], row["leaked"]) == (0, False)
            assert not os.path.exists(ledger)
            assert group not in sdtrace_uprobe_events().values()
            assert f"removed stale uprobe group {group}" in result.stderr
            assert target.send("fire 1") == ["enabled 0"]
        finally:
            session.release()
            sdtrace("cleanup")


@pytest.mark.kernel
def test_cleanup_removes_the_definitions_of_a_zombie_kernel_mode_session(fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        # the definitions a dead session leaves are the tracefs executor's
        session = UnreapedSession(tmp_path, "--executor", "tracefs", "--semaphores", "kernel",
                                  f"{library}:semlib:tick")
        try:
            group = session.group()
            session.kill()
            assert wait_for(lambda: tick_states(target.pid, library)[0]["value"] == 0)
            result = sdtrace("cleanup")
            assert result.returncode == 0, result.stderr
            assert state(session.pid) == "Z"
            assert group not in sdtrace_uprobe_events().values()
            assert f"removed stale uprobe group {group}" in result.stderr
        finally:
            session.release()
            sdtrace("cleanup")
