"""-c at the end of a session: the command sdtrace started is ended (SIGTERM, then
SIGKILL), or left running with --keep-command, and the line before the summary says
which; in user mode a command left running is detached unharmed."""
import json
import os
import re
import subprocess

import pytest
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import sdtrace, sdtrace_command, summary_counts, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

FOREVER = "import time\nwhile True: time.sleep(0.005)\n"
DEAF = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + FOREVER
# waits for a file, then loads a library (its loader calls _dl_debug_state, where
# user mode planted an int3) and collects (python:gc__start)
LATER = """import ctypes, gc, os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
ctypes.CDLL("libm.so.6")
gc.collect()
open(sys.argv[1] + ".done", "w").close()
"""
ENDING = re.compile(r"^sdtrace: (ended|left) command (\d+) (.*)$")
MODES = ("kernel", "user")


def command_ending(stderr):
    """(verb, pid, rest) of the line just before the summary's last line (the table of
    counts of trace's summary sits between them)."""
    lines = stderr.strip().splitlines()
    summary_counts(stderr)                   # the last line is still the summary
    endings = [ENDING.match(line) for line in lines if ENDING.match(line)]
    assert len(endings) == 1, stderr
    return endings[0][1], int(endings[0][2]), endings[0][3]


def script(tmp_path, text):
    path = tmp_path / "command.py"
    path.write_text(text)
    return str(path)


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("mode", MODES)
def test_duration_ends_the_command_with_sigterm(tmp_path, mode):
    result = sdtrace("trace", "--semaphores", mode, "-d", "0.5", "-c",
                     f"{PYTHON} {script(tmp_path, FOREVER)}", "python:gc__start")
    assert result.returncode == 0, result.stderr
    verb, pid, how = command_ending(result.stderr)
    assert (verb, how) == ("ended", "(SIGTERM)")
    assert gone(pid)


def test_a_command_deaf_to_sigterm_is_killed():
    result = sdtrace("count", "-d", "0.5", "-c", f"{PYTHON} -c '{DEAF}'", "python:gc__start")
    assert result.returncode == 0, result.stderr
    verb, pid, how = command_ending(result.stderr)
    assert (verb, how) == ("ended", "(SIGKILL after 2 s)")
    assert gone(pid)


def test_count_limit_ends_the_command(tmp_path):
    result = sdtrace("trace", "-n", "1", "-c", f"{PYTHON} {script(tmp_path, FOREVER)}",
                     "python:gc__start")
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stderr) == (1, 0)
    verb, pid, how = command_ending(result.stderr)
    assert (verb, how) == ("ended", "(SIGTERM)") and gone(pid)


def test_a_command_that_exits_by_itself_is_not_named(tmp_path):
    result = sdtrace("trace", "-c", f"{PYTHON} -c 'import gc; gc.collect()'", "python:gc__start")
    assert result.returncode == 0, result.stderr
    assert not any(ENDING.match(line) for line in result.stderr.splitlines())


@pytest.mark.parametrize("mode", MODES)
def test_keep_command_leaves_it_running_unharmed(tmp_path, mode):
    """Left running, the command loads a library and collects after the session: in
    user mode the loader hook's int3 was removed and ptrace let go, so it survives."""
    flag = tmp_path / "go"
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:    # not a pipe: the command left running holds it open
        returncode = subprocess.run(
            sdtrace_command("trace", "--semaphores", mode, "--keep-command", "-d", "0.5",
                            "-c", f"{PYTHON} {script(tmp_path, LATER)} {flag}",
                            "python:gc__start"),
            stdout=subprocess.DEVNULL, stderr=stderr, timeout=60).returncode
    assert returncode == 0, log.read_text()
    verb, pid, how = command_ending(log.read_text())
    assert (verb, how) == ("left", "running")
    with open(f"/proc/{pid}/status") as status:
        state = next(line for line in status if line.startswith("State:"))
    assert "T" not in state.split()[1], state        # not left stopped
    flag.write_text("")
    assert wait_for(lambda: os.path.exists(f"{flag}.done"), timeout=20), \
        "the command died at its dlopen after the session"
    assert wait_for(lambda: gone(pid), timeout=20)


def test_a_killed_session_does_not_kill_its_command_at_dlopen(tmp_path):
    """User mode plants an int3 in the command's loader (_dl_debug_state). SIGKILL
    sdtrace: the guardian restores the byte, so the command's next dlopen does not trap
    with nobody to serve it, and its counter is lowered."""
    flag, log = tmp_path / "go", tmp_path / "stderr"
    with open(log, "w") as stderr:
        tracer = subprocess.Popen(
            sdtrace_command("trace", "--semaphores", "user", "-c",
                            f"{PYTHON} {script(tmp_path, LATER)} {flag}", "python:gc__start"),
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert wait_for(lambda: "Ctrl-C to end" in log.read_text(), timeout=60), log.read_text()
        assert wait_for(lambda: _command_of(tracer.pid, str(flag)), timeout=10)
        command = _command_of(tracer.pid, str(flag))
        assert gc_semaphore(command) == 1
    finally:
        tracer.kill()
        tracer.wait()
    assert wait_for(lambda: gc_semaphore(command) == 0), "the guardian did not lower it"
    assert sdtrace("cleanup").returncode == 0     # the killed session's uprobe definitions
    flag.write_text("")
    assert wait_for(lambda: os.path.exists(f"{flag}.done"), timeout=20), \
        "the command died at its dlopen after sdtrace was killed"


def _command_of(pid, argument):
    """The child of `pid` (sdtrace; any of its threads) that runs with `argument` (not its
    guardian), or None."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            for child in map(int, children.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    if argument.encode() in cmdline.read().split(b"\0"):
                        return child
    return None


def gc_semaphore(pid):
    result = subprocess.run(sdtrace_command("semaphores", "-p", str(pid), "--json",
                                            "python:gc__start"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])["value"]
