"""Targets as the loader and the kernel see them: what is not a file, processes
without probes, and a command's libraries found through its environment.

The ldpath fixture (tests/fixtures/ldpath.h) has test:probe in a program and
in the two libraries it links with -L/-l only, so its loader finds them
through LD_LIBRARY_PATH alone; `-c` must search them all (6 events for
`ldpath 2`, not the program's 2), in both semaphore modes, the libraries'
sites being semaphore-guarded.
"""
import json
import os
import shutil
import subprocess

import pytest
from helpers import FIXTURES_DIR, Target, Tracer, one_line_error, sdtrace, summary_counts

from sdtrace.discovery import targets

LIBRARIES = ("libsdtldpatha.so", "libsdtldpathb.so")


def ldpath_environment(fixtures):
    return {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(fixtures.path("ldpath"))}


def fired(events):
    """[(object letter, i)] of test:probe events, in order."""
    return [(chr(event["args"][0]), event["args"][1]) for event in events]


# --- what is not an ELF file --------------------------------------------------

def test_a_named_pipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for spec in (str(fifo), f"{fifo}:*:*", f"{fifo}::name"):
        one_line_error(sdtrace("list", spec, timeout=20), str(fifo), "named pipe")


def test_directories_and_devices_are_refused(tmp_path):
    one_line_error(sdtrace("list", str(tmp_path), timeout=20), str(tmp_path), "directory")
    one_line_error(sdtrace("list", "/dev/null", timeout=20), "/dev/null", "character device")


# --- processes without probes ---------------------------------------------------

@pytest.mark.kernel
def test_a_kernel_thread_is_named_as_such():
    with open("/proc/2/comm") as comm:
        assert comm.read().strip() == "kthreadd"
    one_line_error(sdtrace("list", "-p", "2"), "process 2 (kthreadd)", "kernel thread")
    one_line_error(sdtrace("trace", "-p", "2", "python:line"), "process 2", "kernel thread")


def test_a_process_without_notes_says_so(fixtures):
    with Target(fixtures.path("nosdt")) as target:
        result = sdtrace("list", "-p", str(target.pid))
    one_line_error(result, f"process {target.pid} (nosdt)", "has SDT notes")


# --- a command's libraries ----------------------------------------------------------

def test_command_objects_follow_ld_library_path(fixtures):
    program = fixtures.path("ldpath")
    directory = os.path.dirname(program)
    found = [item.path for item in targets.command_objects(program, ldpath_environment(fixtures))]
    assert found[0] == program
    assert [os.path.join(directory, name) for name in LIBRARIES] == [
        path for path in found if os.path.basename(path) in LIBRARIES]
    without = targets.command_objects(program, {"PATH": os.environ["PATH"]})
    assert not [item for item in without if os.path.basename(item.path) in LIBRARIES]


def build_ldpath(tmp_path, fixtures, name, link_flags):
    """ldpath linked with `link_flags`, as tmp_path/name."""
    output = tmp_path / name
    subprocess.run(["gcc", "-O2", "-o", str(output), os.path.join(FIXTURES_DIR, "ldpath_main.c"),
                    os.path.join(FIXTURES_DIR, "command_loop.c"),
                    f"-L{os.path.dirname(fixtures.path('ldpath'))}", "-lsdtldpatha",
                    "-lsdtldpathb", *link_flags], check=True)
    return str(output)


def library_copies(tmp_path, fixtures, *directories):
    for directory in directories:
        (tmp_path / directory).mkdir()
        for name in LIBRARIES:
            shutil.copy(os.path.join(os.path.dirname(fixtures.path("ldpath")), name),
                        tmp_path / directory / name)


def found_library(program, environment):
    [path] = [item.path for item in targets.command_objects(program, environment)
              if os.path.basename(item.path) == LIBRARIES[0]]
    return os.path.basename(os.path.dirname(path))


def test_rpath_runpath_and_ld_library_path_in_the_loaders_order(tmp_path, fixtures):
    """ld.so(8): DT_RPATH (without DT_RUNPATH) before LD_LIBRARY_PATH before DT_RUNPATH;
    $ORIGIN is the object's directory."""
    library_copies(tmp_path, fixtures, "origin", "env")
    rpath = build_ldpath(tmp_path, fixtures, "rpath",
                         ["-Wl,--disable-new-dtags", "-Wl,-rpath,$ORIGIN/origin"])
    runpath = build_ldpath(tmp_path, fixtures, "runpath",
                           ["-Wl,--enable-new-dtags", "-Wl,-rpath,${ORIGIN}/origin"])
    environment = {"LD_LIBRARY_PATH": str(tmp_path / "env")}
    assert found_library(rpath, {}) == "origin"
    assert found_library(runpath, {}) == "origin"
    assert found_library(rpath, environment) == "origin"
    assert found_library(runpath, environment) == "env"
    # the loader agrees: which copy does the program really map?
    for program, expected in ((rpath, "origin"), (runpath, "env")):
        with Target("/usr/bin/env", f"LD_LIBRARY_PATH={tmp_path / 'env'}", program) as target:
            with open(f"/proc/{target.pid}/maps") as maps:
                mapped = {line.split()[-1] for line in maps if LIBRARIES[0] in line}
        assert mapped == {str(tmp_path / expected / LIBRARIES[0])}


def test_a_library_named_in_a_spec_is_found_in_the_commands_path(fixtures):
    environment = ldpath_environment(fixtures)
    result = sdtrace("list", "--json", "-c", fixtures.path("ldpath"), "libsdtldpathb:test:probe",
                     env=environment)
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["file"] == os.path.join(os.path.dirname(fixtures.path("ldpath")), LIBRARIES[1])
    one_line_error(sdtrace("list", "-c", fixtures.path("ldpath"), "libsdtnosuchlibrary:test:probe",
                           env=environment), "libsdtnosuchlibrary", "not found")


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ("kernel", "user"))
def test_command_traces_the_libraries_of_its_ld_library_path(fixtures, tmp_path, mode):
    output = tmp_path / "events.json"
    result = sdtrace("trace", "--json", "-o", str(output), "--semaphores", mode,
                     "-c", f"{fixtures.path('ldpath')} 2", "test:probe",
                     env=ldpath_environment(fixtures), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "enabled a=1 b=1\n"       # both libraries' semaphores were raised
    events = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(fired(events)) == [(obj, i) for obj in "abm" for i in (0, 1)]
    assert summary_counts(result.stderr) == (6, 0)


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ("kernel", "user"))
def test_pid_resolves_a_library_name_to_what_the_process_maps(fixtures, tmp_path, mode):
    """libsdtldpathb.so is in no cache nor standard directory: only the process has it."""
    program = fixtures.path("ldpath")
    with Target("/usr/bin/env", f"LD_LIBRARY_PATH={os.path.dirname(program)}", program) as target:
        tracer = Tracer(tmp_path, "--semaphores", mode, "-p", str(target.pid),
                        "libsdtldpathb.so:test:probe")
        try:
            assert target.send("fire 2") == ["enabled a=0 b=1"]
            events = tracer.stop()
        finally:
            tracer.kill()
    assert fired(events) == [("b", 0), ("b", 1)]


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ("kernel", "user"))
def test_a_deleted_library_is_traced_through_map_files(fixtures, tmp_path, mode):
    """No path names the file any more: /proc/PID/map_files/START-END still does,
    for sdtrace and for the kernel."""
    library = tmp_path / "libsdtsem.so"
    shutil.copy(fixtures.path("libsdtsem.so"), library)
    with Target(fixtures.path("semuser"), str(library)) as target:
        target.send("load")
        os.unlink(library)
        listing = sdtrace("list", "--json", "-p", str(target.pid), "semlib:tick")
        assert listing.returncode == 0, listing.stderr
        [record] = [json.loads(line) for line in listing.stdout.splitlines()]
        assert record["file"].startswith(f"/proc/{target.pid}/map_files/")
        tracer = Tracer(tmp_path, "--semaphores", mode, "-p", str(target.pid), "semlib:tick")
        try:
            assert target.send("fire 2") == ["enabled 1"]
            events = tracer.stop()
        finally:
            tracer.kill()
        assert target.send("sem") == ["sem 0"]
    assert [event["args"][0] for event in events] == [0, 1]
