"""The Java (HotSpot) side of the language tools: gc, objnew and threads, against a real JVM.

The programs (tests/fixtures/java) do a known number of things: Gc calls
System.gc() N times, Alloc allocates N AllocItem objects, Threads starts N
threads named sdtrace-worker-I.  Each runs in the three scopes: under -c,
as -p of a JVM that waits for a line before it works, and system-wide on
the JDK's libjvm.so (found from javac, never written out).  The JVM's own
work fires the same probes (its threads, the JDK's classes, -- with G1 --
collections of its own), so the tests count only what is the program's:
its class, its thread names, its pid; and run the JVM with -XX:+UseSerialGC
and a 256 MiB young-enough heap, in which these programs never collect on
their own.  HotSpot's flag rule (providers.RUNTIME_RULES) is checked in
both directions: a JVM without -XX:+DTraceAllocProbes is refused in one
line, read from its memory; --jvm-probes gives the flag to -c's JVM.
"""
import json
import os
import subprocess

import pytest

from helpers import SYSTEM_PYTHON, Background, jdk_home, one_line_error, sdtrace

from sdtrace.discovery import jvm, providers

JVM_OPTIONS = ("-XX:+UseSerialGC", "-Xms256m", "-Xmx256m")
GCS, ALLOCATIONS, THREADS = 5, 100_000, 4
SCOPES = ("command", "pid", "system")


@pytest.fixture(scope="module")
def java():
    """(the java launcher, its libjvm.so) of the JDK whose javac built the fixtures."""
    home = jdk_home()
    assert home is not None, "javac is not installed (openjdk-17-jdk-headless)"
    return os.path.join(home, "bin", "java"), os.path.join(home, *jvm.LIBJVM)


def _java_command(java, classes, program, count, *options, waits=False):
    return [java[0], *JVM_OPTIONS, *options, "-cp", classes, program, str(count),
            *(["wait"] if waits else [])]


def run_tool(scope, java, classes, tool, program, count, *tool_options, jvm_options=()):
    """(sdtrace's CompletedProcess, the pid of the JVM) for `tool` --json on `program`
    run in `scope`: -c (the libjvm.so as TARGET), -p, or system-wide on libjvm.so."""
    if scope == "command":
        command = " ".join(_java_command(java, classes, program, count, *jvm_options))
        result = sdtrace(tool, "--json", *tool_options, "-c", command, java[1])
        return result, None
    waits = scope == "pid"
    target = subprocess.Popen(_java_command(java, classes, program, count, *jvm_options,
                                            waits=waits),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) \
        if waits else None
    tracer = None
    try:
        if waits:
            assert target.stdout.readline().strip() == "ready"
            tracer = Background(tool, "--json", *tool_options, "-p", str(target.pid))
            target.stdin.write("go\n")
            target.stdin.flush()
        else:
            tracer = Background(tool, "--json", *tool_options, java[1])
            target = subprocess.Popen(_java_command(java, classes, program, count,
                                                    *jvm_options),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      text=True)
        assert target.stdout.readline().startswith("done"), "the program did not finish"
        result = tracer.stop()
    finally:
        if tracer is not None:
            tracer.kill()
        if waits and target.poll() is None:
            target.stdin.write("end\n")
            target.stdin.flush()
        if target is not None:
            target.communicate(timeout=60)
    return result, target.pid


def _lines(result):
    assert result.returncode in (0, 130), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# -- gc --------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.usefixtures("executor")
@pytest.mark.parametrize("scope", SCOPES)
def test_gc_shows_each_system_gc_as_a_full_collection(java, java_classes, scope, executor):
    result, pid = run_tool(scope, java, java_classes, "gc", "Gc", GCS)
    lines = _lines(result)
    collections = [line for line in lines if "duration_ns" in line
                   and (pid is None or line["pid"] == pid)]
    assert [line["generation"] for line in collections] == ["full"] * GCS, result.stdout
    assert all(line["runtime"] == "java" and line["duration_ns"] > 0 for line in collections)
    # the collector's name is a HotSpot string: the bpf executor reads it, tracefs cannot
    assert {line["collector"] for line in collections} == (
        {"MarkSweepCompact"} if executor == "bpf" else {None})
    histograms = [line for line in lines if "buckets" in line]
    if pid is None:       # system-wide, another JVM may collect too
        [full] = [line for line in histograms if line["generation"] == "full"]
        assert full["count"] == GCS
        assert full["min"] == min(line["duration_ns"] for line in collections)
        assert full["max"] == max(line["duration_ns"] for line in collections)


@pytest.mark.kernel
def test_gc_of_python_gives_the_generation_and_the_objects_collected(tmp_path):
    """python:gc__start(generation) and gc__done(collected): three gc.collect(2) of a
    process with the collector disabled are its only collections."""
    script = tmp_path / "collect.py"
    script.write_text("import gc, sys\ngc.disable()\nprint('ready', flush=True)\n"
                      "sys.stdin.readline()\nfor _ in range(3):\n    gc.collect(2)\n"
                      "print('done', flush=True)\nsys.stdin.readline()\n")
    target = subprocess.Popen([SYSTEM_PYTHON, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        assert target.stdout.readline().strip() == "ready"
        tracer = Background("gc", "--json", "-p", str(target.pid))
        target.stdin.write("go\n")
        target.stdin.flush()
        assert target.stdout.readline().strip() == "done"
        lines = _lines(tracer.stop())
    finally:
        if tracer is not None:
            tracer.kill()
        target.communicate("end\n", timeout=30)
    collections = [line for line in lines if "duration_ns" in line]
    assert [(line["runtime"], line["generation"]) for line in collections] == [("python", 2)] * 3
    assert all(isinstance(line["collected"], int) for line in collections)
    [histogram] = [line for line in lines if "buckets" in line]
    assert (histogram["generation"], histogram["count"]) == (2, 3)


# -- objnew ----------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
@pytest.mark.parametrize("scope", SCOPES)
def test_objnew_counts_every_object_of_the_class(java, java_classes, scope, executor):
    """-c gets the flag from --jvm-probes; -p and system-wide JVMs are started with it."""
    options = ("--jvm-probes",) if scope == "command" else ()
    flags = () if scope == "command" else ("-XX:+DTraceAllocProbes",)
    result, _pid = run_tool(scope, java, java_classes, "objnew", "Alloc", ALLOCATIONS,
                            *options, jvm_options=flags)
    rows = {line["class"]: line for line in _lines(result)}
    assert rows["AllocItem"]["count"] == ALLOCATIONS, result.stderr
    assert rows["[LAllocItem;"]["count"] == 1
    release = jvm.release(java[1])
    if release < 18:          # HotSpot 17's sizes are wrong on its fast paths: none shown
        assert rows["AllocItem"]["bytes"] is None
        assert "no bytes: HotSpot 17 passes object__alloc's size only on its slow path" \
            in result.stderr
    else:
        assert rows["AllocItem"]["bytes"] == ALLOCATIONS * 24
    if scope == "system":
        assert ("hotspot:object__alloc fires only in processes started with "
                "-XX:+DTraceAllocProbes") in result.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
def test_objnew_refuses_a_running_jvm_without_the_flag(java, java_classes, executor):
    """The flag is read from the JVM's memory (libjvm.so's .symtab has DTraceAllocProbes)."""
    target = subprocess.Popen(_java_command(java, java_classes, "Alloc", 10, waits=True),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().strip() == "ready"
        assert jvm.running_flags(target.pid) == (
            {"DTraceAllocProbes": False, "DTraceMethodProbes": False,
             "DTraceMonitorProbes": False}, "its memory")
        result = sdtrace("objnew", "-p", str(target.pid))
    finally:
        target.communicate("go\nend\n", timeout=60)
    one_line_error(result, f"process {target.pid}'s JVM runs without -XX:+DTraceAllocProbes",
                   "read from its memory")


@pytest.mark.kernel
def test_the_flags_of_a_running_jvm_come_from_its_memory(java, java_classes):
    """JAVA_TOOL_OPTIONS's ExtendedDTraceProbes sets the three, a later -XX:- unsets one."""
    environment = dict(os.environ, JAVA_TOOL_OPTIONS="-XX:+ExtendedDTraceProbes")
    target = subprocess.Popen(_java_command(java, java_classes, "Gc", 0,
                                            "-XX:-DTraceMonitorProbes", waits=True),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=environment)
    try:
        assert target.stdout.readline().strip() == "ready"
        assert jvm.running_flags(target.pid) == (
            {"DTraceAllocProbes": True, "DTraceMethodProbes": True,
             "DTraceMonitorProbes": False}, "its memory")
    finally:
        target.communicate("go\nend\n", timeout=60)


@pytest.mark.kernel
def test_objnew_without_the_flag_in_the_command_names_jvm_probes(java, java_classes):
    result = sdtrace("objnew", "--executor", "bpf", "-c",
                     " ".join(_java_command(java, java_classes, "Alloc", 10)), java[1])
    one_line_error(result, "hotspot:object__alloc fires only in a JVM started with "
                           "-XX:+DTraceAllocProbes", "--jvm-probes")


# -- threads ---------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
@pytest.mark.parametrize("scope", SCOPES)
def test_threads_shows_each_thread_started_and_stopped(java, java_classes, scope, executor):
    result, pid = run_tool(scope, java, java_classes, "threads", "Threads", THREADS)
    workers = [line for line in _lines(result) if line["name"].startswith("sdtrace-worker-")
               and (pid is None or line["pid"] == pid)]
    expected = [(event, f"sdtrace-worker-{index}", index % 2 == 1)
                for index in range(THREADS) for event in ("start", "stop")]
    assert [(line["event"], line["name"], line["daemon"]) for line in workers] == expected
    for start, stop in zip(workers[::2], workers[1::2]):
        assert start["native_thread_id"] == stop["native_thread_id"] > 0
        assert start["java_thread_id"] == stop["java_thread_id"] > 1
    assert len({line["native_thread_id"] for line in workers}) == THREADS


# -- what a runtime or an executor cannot serve ------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("tool, what", [("threads", "thread names"),
                                        ("objnew", "class names")])
def test_hotspot_names_need_the_bpf_executor(java, tool, what):
    one_line_error(sdtrace(tool, "--executor", "tracefs", java[1]),
                   f"{tool} reads HotSpot's {what}: it needs the bpf executor")


@pytest.mark.parametrize("tool, probe", [("threads", "thread"), ("objnew", "allocation")])
def test_python_has_no_probe_for_threads_or_allocations(tool, probe):
    one_line_error(sdtrace(tool, SYSTEM_PYTHON), f"Python has no {probe} probe")


# -- the rule, as data ---------------------------------------------------------------

def test_the_jvm_options_decide_the_flags_in_hotspots_order():
    """JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, the command line, _JAVA_OPTIONS: the last
    setting wins; ExtendedDTraceProbes sets all three; arguments of the program do not count."""
    argv = ["java", "-XX:+ExtendedDTraceProbes", "-cp", "-XX:-DTraceAllocProbes", "Main",
            "-XX:-DTraceMonitorProbes"]
    assert jvm.option_flags(argv, {"_JAVA_OPTIONS": "-XX:-DTraceMethodProbes"}) == {
        "DTraceAllocProbes": True, "DTraceMethodProbes": False, "DTraceMonitorProbes": True}
    assert jvm.option_flags(["java", "-XX:-DTraceAllocProbes", "Main"],
                            {"JAVA_TOOL_OPTIONS": "-XX:+DTraceAllocProbes"}) == {
        "DTraceAllocProbes": False, "DTraceMethodProbes": False, "DTraceMonitorProbes": False}


def test_the_rules_name_the_flag_of_each_probe():
    assert providers.runtime_rule("hotspot", "object__alloc") == ("jvm flag", "DTraceAllocProbes")
    assert providers.runtime_rule("hotspot", "method__return").setting == "DTraceMethodProbes"
    assert providers.runtime_rule("hotspot", "monitor__notifyAll").setting == \
        "DTraceMonitorProbes"
    assert providers.runtime_rule("hotspot", "gc__begin") is None
    assert providers.runtime_rule("php", "function__entry") == ("environment",
                                                                 "USE_ZEND_DTRACE=1")
