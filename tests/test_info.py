"""`sdtrace info`, `--debug`, and a library that stays silent on its own."""
import json
import logging
import subprocess
import sys

import pytest
from helpers import (Target, counter, sdtrace, sdtrace_command, semaphore_offsets, set_counter,
                     wait_for)

import sdtrace as library
from sdtrace.kernel import features, tracefs

INFO_KEYS = {"release", "machine", "executor", "semaphores", "arguments", "features"}


def info_json():
    result = sdtrace("info", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    [line] = result.stdout.splitlines()
    return json.loads(line)


@pytest.mark.kernel
def test_info_json_reports_every_feature_and_the_choices(program, group):
    info = info_json()
    assert set(info) == INFO_KEYS
    assert list(info["features"]) == list(features.FEATURES)
    for feature in info["features"].values():
        assert set(feature) == {"available", "detail", "kernel"}
    executor = info["executor"]
    found = {name: feature["available"] for name, feature in info["features"].items()}
    bpf_ready = (found["bpf"] and found["bpf_ringbuf"]
                 and (found["bpf_uprobe_multi"] or found["uprobe_pmu"]))
    assert executor["bpf"]["available"] == (bpf_ready and info["machine"] == "x86_64")
    assert executor["auto"] == ("bpf" if executor["bpf"]["available"] else "tracefs")
    assert executor["tracefs"]["available"] == info["features"]["tracefs_uprobes"]["available"]
    semaphores = info["semaphores"]
    try:      # the oracle: a real definition with a semaphore offset
        tracefs.add_uprobe(group, "ref_ctr", program.path, program.site,
                           ref_ctr_offset=program.semaphore)
        ref_ctr = True
    except tracefs.SdtraceError:
        ref_ctr = False
    assert info["features"]["tracefs_ref_ctr"]["available"] == ref_ctr == semaphores["kernel"]
    assert semaphores["auto"] == ("kernel" if ref_ctr else "user")
    assert "window" in semaphores["window"]


@pytest.mark.kernel
def test_info_text_says_yes_or_no_for_each_feature():
    result = sdtrace("info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kernel ") and any(l.startswith("semaphores  auto picks ")
                                                  for l in lines)
    for name, feature in info_json()["features"].items():
        [line] = [line for line in lines if line.split()[:1] == [name]]
        assert line.split()[1] == ("yes" if feature["available"] else "no")


def test_import_and_list_stay_cheap(fixtures):
    """Neither `import sdtrace` nor `sdtrace list` loads logging, ctypes or the kernel layer."""
    code = ("import sys, sdtrace, sdtrace.cli\n"
            "sdtrace.cli.main(['list', sys.argv[1]])\n"
            "print(sorted(m for m in sys.modules if m in ('logging', 'ctypes')\n"
            "             or m.startswith('sdtrace.kernel')), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, fixtures.path("values")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "[]", result.stderr


def semuser_command(fixtures):
    return f"{fixtures.path('semuser')} {fixtures.path('libsdtsem.so')}"


@pytest.mark.kernel
@pytest.mark.parametrize("mode, debug_first", (("kernel", True), ("user", False)))
@pytest.mark.parametrize("executor", ("bpf", "tracefs"))
def test_debug_logs_the_decisions(fixtures, mode, debug_first, executor):
    """--debug before the command or after it (as perf takes -v), logged the same."""
    library_path = fixtures.path("libsdtsem.so")
    arguments = ["trace", "--executor", executor, "--semaphores", mode]
    arguments.insert(0 if debug_first else 1, "--debug")
    with Target(fixtures.path("semuser"), library_path) as target:
        target.send("load")
        result = sdtrace(*arguments, "-p", str(target.pid), "-d", "0.5",
                         f"{library_path}:semlib:tick")
    assert result.returncode == 0, result.stderr
    debug = [line for line in result.stderr.splitlines() if line.startswith("sdtrace: debug: ")]
    expected = [f"semaphores: {mode}, as asked", f"executor: {executor} (as asked)",
                f"attached 1 site(s) with the {executor} executor in", "detached in"]
    expected += (["defined p:sdtrace_", "perf fd(s) opened"] if executor == "tracefs" else
                 [f"{library_path}: 1 sites armed with one uprobe_multi link (pid {target.pid})"])
    if mode == "user":
        expected += [f"process {target.pid}: semaphore at {library_path}+0x",
                     "raised: 0 -> 1", "lowered by 1: 1 -> 0"]
    for words in expected:
        assert any(words in line for line in debug), (words, result.stderr)


@pytest.mark.kernel
def test_without_debug_nothing_is_logged(fixtures):
    result = subprocess.run(
        sdtrace_command("trace", "-c", semuser_command(fixtures),
                        f"{fixtures.path('libsdtsem.so')}:semlib:tick"),
        input="load\nfire 1\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "debug" not in result.stderr and "semaphores: " not in result.stderr


def test_the_sdtrace_logger_has_a_null_handler():
    from sdtrace.kernel import log

    assert any(isinstance(handler, logging.NullHandler)
               for handler in logging.getLogger(log.ROOT).handlers)


@pytest.mark.kernel
def test_user_mode_warnings_reach_the_callback_never_stderr(fixtures, capfd):
    """A counter lowered behind the session's back is warned about through `warn`."""
    library_path = fixtures.path("libsdtsem.so")
    warned = []
    with Target(fixtures.path("semuser"), library_path) as target:
        target.send("load")
        session = library.Session([f"{library_path}:semlib:tick"], pid=target.pid,
                                  semaphores="user", warn=warned.append)
        [offset] = semaphore_offsets(library_path).values()
        with session:
            assert wait_for(lambda: counter(target.pid, library_path, offset) == 1)
            set_counter(target.pid, library_path, offset, 0)    # as a buggy tracer would
    assert any("less than the 1 this session raised" in message for message in warned), warned
    assert list(session.warnings) == warned
    assert capfd.readouterr().err == ""
