"""Runtimes' quirks, handled by the session for every command (discovery/providers.py).

CPython 3.11 fires function__entry/function__return for Python-to-Python calls
only while python:line's semaphore is raised: the session raises it without
arming python:line, once per process, and lowers it at the end, in both
semaphore modes and on both executors.  HotSpot fires its method probes only
under a flag: a session says in one line when the JVM it traces lacks it.
"""
import json
import os
import subprocess

import pytest

from helpers import (LIBJVM, PYTHON_CALLS, SYSTEM_PYTHON, counter, holds_for, sdtrace,
                     sdtrace_command, semaphore_offsets, summary_counts, until_armed)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor"),
              pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON),
                                 reason="Debian's python3.11 is not installed")]

CALLS = 20_000
COMPANION_LINE = "raising python:line's semaphore without arming it"


def _line_semaphore():
    [offset] = set(semaphore_offsets(SYSTEM_PYTHON, "line").values())
    return offset


@pytest.mark.parametrize("semaphores", ["kernel", "user"])
def test_every_python_call_is_counted_without_arming_line(semaphores):
    result = sdtrace("count", "--json", "--semaphores", semaphores, "--by", "funcname",
                     "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} {CALLS}", "python:function__entry")
    assert result.returncode == 0, result.stderr
    counts = {row["funcname"]: row["count"] for row in map(json.loads, result.stdout.splitlines())}
    assert counts["f"] == counts["g"] == CALLS
    lines = result.stderr.splitlines()
    assert sum(COMPANION_LINE in line for line in lines) == 1, result.stderr
    assert "sdtrace: tracing 1 site(s); Ctrl-C to end" in lines    # function__entry's alone
    assert summary_counts(result.stderr)[1] == 0


@pytest.mark.parametrize("semaphores", ["kernel", "user"])
def test_the_line_semaphore_is_raised_once_and_lowered(semaphores):
    offset = _line_semaphore()
    target = subprocess.Popen([SYSTEM_PYTHON, PYTHON_CALLS, str(CALLS), "1", "wait"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        assert target.stdout.readline() == "ready\n"
        assert counter(target.pid, SYSTEM_PYTHON, offset) == 0
        tracer = subprocess.Popen(
            sdtrace_command("count", "--json", "--semaphores", semaphores, "--by", "funcname",
                            "-p", str(target.pid), "python:function__entry"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert until_armed(tracer)
        assert counter(target.pid, SYSTEM_PYTHON, offset) == 1
        assert holds_for(lambda: counter(target.pid, SYSTEM_PYTHON, offset) == 1, 0.5)
        target.stdin.write("go\n")
        target.stdin.flush()
        assert target.stdout.readline() == "done\n"
        tracer.send_signal(2)
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        assert counter(target.pid, SYSTEM_PYTHON, offset) == 0      # lowered at the end
        counts = {row["funcname"]: row["count"] for row in map(json.loads,
                                                               out.splitlines())}
        assert counts["f"] == counts["g"] == CALLS
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.communicate()
        target.kill()
        target.communicate()


def test_a_line_traced_too_is_armed_as_usual():
    result = sdtrace("count", "-c", f"{SYSTEM_PYTHON} {PYTHON_CALLS} 100", "python:function__entry",
                     "python:line")
    assert result.returncode == 0, result.stderr
    assert COMPANION_LINE not in result.stderr


RULE_LINE = "hotspot:method__entry will not fire; start it with -XX:+DTraceMethodProbes"


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
@pytest.mark.parametrize("flag", [None, "-XX:+ExtendedDTraceProbes"])
def test_a_jvm_command_without_the_method_probes_flag_is_said(java_classes, flag):
    command = " ".join(word for word in ("java", flag, "-cp", java_classes, "Calls", "10")
                       if word)
    result = sdtrace("count", "-c", command, "hotspot:method__entry")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if RULE_LINE in line]
    assert said == ([] if flag else [f"sdtrace: warning: the command's JVM runs without "
                                     f"-XX:+DTraceMethodProbes: {RULE_LINE}"])


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
def test_a_running_jvm_without_the_flag_is_said_from_its_memory(java_classes):
    jvm = subprocess.Popen(["java", "-cp", java_classes, "Work"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert jvm.stdout.readline() == "ready\n"
        result = sdtrace("count", "-d", "0.2", "-p", str(jvm.pid), "hotspot:method__entry")
        assert result.returncode == 0, result.stderr
        assert (f"sdtrace: warning: process {jvm.pid}'s JVM runs without "
                f"-XX:+DTraceMethodProbes (read from its memory): {RULE_LINE}"
                in result.stderr.splitlines()), result.stderr
    finally:
        jvm.kill()
        jvm.communicate()
