"""Specs that wait for a library: with -c or -p, a spec without a target that
matches nothing yet is armed once an object that has it is mapped (dlopen),
instead of failing; one that never matches ends the session in one line."""
import json
import os
import signal
import subprocess

import pytest

from helpers import LIBJVM, TRACING, Target, sdtrace, sdtrace_command, summary_counts

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

TICKS = 7
WAITING = "sdtrace: warning: waiting for semlib:tick: nothing"


def _ticks(stdout):
    """The COUNT of semlib:tick in a --json count's output (other lines are the command's)."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {row["probe"]: row["count"] for row in rows}.get("semlib:tick", 0)


@pytest.mark.parametrize("semaphores", ["kernel", "user"])
def test_a_command_is_armed_at_the_dlopen_of_the_library(fixtures, semaphores):
    library = fixtures.path("libsdtsem.so")
    result = sdtrace("count", "--json", "--semaphores", semaphores, "-c",
                     f"{fixtures.path('semuser')} {library}", "semlib:tick",
                     stdin=f"fire 1\nload\nfire {TICKS}\nsem\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:8] == ["error library not loaded", "done", "done",
                                              "enabled 1", "done", "sem 1", "done"]
    assert _ticks(result.stdout) == TICKS
    assert result.stderr.startswith(WAITING), result.stderr
    assert summary_counts(result.stderr) == (TICKS, 0)


def test_a_process_is_armed_once_it_maps_the_library(fixtures):
    library = fixtures.path("libsdtsem.so")
    with Target(fixtures.path("semuser"), library) as target:
        tracer = subprocess.Popen(sdtrace_command("count", "--json", "-p", str(target.pid),
                                                  "semlib:tick"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert tracer.stderr.readline().startswith(WAITING)
            target.send("load")
            assert tracer.stderr.readline().startswith(TRACING)     # armed, and reading
            assert target.send("sem") == ["sem 1"]
            assert target.send(f"fire {TICKS}") == ["enabled 1"]
            tracer.send_signal(signal.SIGINT)
            out, err = tracer.communicate(timeout=60)
            assert tracer.returncode == 0, err
            assert _ticks(out) == TICKS
        finally:
            if tracer.poll() is None:
                tracer.kill()
                tracer.communicate()


def test_a_spec_that_never_matches_ends_the_session_in_one_line(fixtures):
    result = sdtrace("count", "-c", f"{fixtures.path('semuser')} {fixtures.path('libsdtsem.so')}",
                     "semlib:no_such_probe", stdin="fire 1\n")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1] == ("sdtrace: semlib:no_such_probe: matched nothing in what the command "
                         "loaded before it exited"), result.stderr


@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17 is not installed")
def test_java_method_entries_are_counted_without_a_path(java_classes, executor):
    calls = 5000
    key = "method_name_ptr" if executor == "bpf" else "probe"    # tracefs: names are pointers
    result = sdtrace("count", "--json", "--by", key, "-c",
                     f"java -XX:+ExtendedDTraceProbes -cp {java_classes} Calls {calls}",
                     "hotspot:method__entry")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if executor == "bpf":
        counts = {row[key]: row["count"] for row in rows}
        assert counts["f"] == counts["g"] == calls
    else:
        [row] = rows
        assert row["count"] >= 2 * calls


def test_the_first_spec_that_comes_is_armed_and_the_others_said(fixtures):
    result = sdtrace("count", "--json", "-c",
                     f"{fixtures.path('semuser')} {fixtures.path('libsdtsem.so')}",
                     "semlib:tick", "hotspot:method__entry", stdin=f"load\nfire {TICKS}\n")
    assert result.returncode == 0, result.stderr
    assert _ticks(result.stdout) == TICKS
    lines = result.stderr.splitlines()
    assert lines[-2:] == ["sdtrace: never armed: hotspot:method__entry: nothing the traced "
                          "process loaded had it", f"sdtrace: {TICKS} events, 0 lost"]


def test_a_library_loaded_by_a_child_of_the_command(fixtures):
    result = sdtrace("count", "--json", "-c",
                     f"sh -c '{fixtures.path('semuser')} {fixtures.path('libsdtsem.so')}; true'",
                     "semlib:tick", stdin=f"load\nfire {TICKS}\n")
    assert result.returncode == 0, result.stderr
    assert _ticks(result.stdout) == TICKS


def test_a_spec_refused_when_it_comes_ends_the_session_and_lets_the_command_go(fixtures):
    result = sdtrace("count", "-c", f"{fixtures.path('semuser')} {fixtures.path('libsdtsem.so')}",
                     "semlib:tick(str,str,str,str)", stdin=f"load\nfire {TICKS}\n", timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == ("sdtrace: semlib:tick: 4 types given but the "
                                              "probe has 2 arguments")
