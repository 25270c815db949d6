"""Targets whose path holds whitespace, which uprobe_events cannot take, are traced
through a symlink under /run/sdtrace/paths/GROUP that lives as long as the session."""
import os
import shutil
import subprocess

import pytest
from helpers import (Target, Tracer, sdtrace_command, sdtrace_uprobe_events, summary_counts,
                     wait_for)

from sdtrace.kernel import tracefs

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]


@pytest.fixture
def spaced(fixtures, tmp_path):
    """semuser and libsdtsem.so, copied into a directory whose name holds a space and a tab."""
    directory = tmp_path / "with space\tand tab"
    directory.mkdir()
    for name in ("semuser", "libsdtsem.so"):
        shutil.copy(fixtures.path(name), directory / name)
    return str(directory / "semuser"), str(directory / "libsdtsem.so")


def aliases_of(pid):
    """The alias folders of the sessions of process `pid`."""
    try:
        return [name for name in os.listdir(tracefs.ALIAS_DIR)
                if name.startswith(f"sdtrace_{pid}_")]
    except FileNotFoundError:
        return []


def groups_of(pid):
    return [group for group in sdtrace_uprobe_events().values()
            if group.startswith(f"sdtrace_{pid}_")]


@pytest.mark.parametrize("mode", ("kernel", "user"))
def test_command_in_a_directory_with_whitespace(spaced, tmp_path, mode):
    program, library = spaced
    output = tmp_path / "events.json"
    process = subprocess.Popen(
        sdtrace_command("trace", "--semaphores", mode, "--json", "-o", str(output),
                        "-c", subprocess.list2cmdline([program, library]),
                        f"{library}:semlib:tick"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate("load\nfire 2\n", timeout=120)
    assert process.returncode == 0, stderr
    assert "enabled 1" in stdout.splitlines(), (stdout, stderr)
    assert summary_counts(stderr) == (2, 0)
    assert output.read_text().count('"probe": "semlib:tick"') == 2
    assert (groups_of(process.pid), aliases_of(process.pid)) == ([], [])


def test_process_in_a_directory_with_whitespace(spaced, tmp_path, executor):
    """tracefs cannot parse such a path: it is defined through an alias (tracefs.py);
    the BPF executor hands the kernel the path itself."""
    program, library = spaced
    with Target(program, library) as target:
        target.send("load")
        tracer = Tracer(tmp_path, "-p", str(target.pid), f"{library}:semlib:tick")
        try:
            if executor == "tracefs":
                [alias_folder] = aliases_of(tracer.process.pid)
                [alias] = os.listdir(os.path.join(tracefs.ALIAS_DIR, alias_folder))
                alias = os.path.join(tracefs.ALIAS_DIR, alias_folder, alias)
                assert os.path.samefile(alias, library)
                [line] = [line for line, group in sdtrace_uprobe_events().items()
                          if group == alias_folder]
                assert f" {alias}:0x" in line
            assert target.send("fire 2") == ["enabled 1"]
            events = tracer.stop()
        finally:
            tracer.kill()
        assert target.send("fire 1") == ["enabled 0"]
    assert [(event["pid"], event["args"][0]) for event in events] == [(target.pid, 0),
                                                                      (target.pid, 1)]
    assert (groups_of(tracer.process.pid), aliases_of(tracer.process.pid)) == ([], [])


def test_an_alias_naming_another_file_is_refused(spaced, group):
    _program, library = spaced
    status = os.stat(library)
    name = f"libsdtsem.so-{status.st_dev:x}-{status.st_ino}"
    os.makedirs(os.path.join(tracefs.ALIAS_DIR, group))
    os.symlink("/bin/true", os.path.join(tracefs.ALIAS_DIR, group, name))
    with pytest.raises(tracefs.SdtraceError, match="replaced while it was being defined"):
        tracefs.add_uprobe(group, "tick", library, 0x1000)
    tracefs.remove_group(group)
    assert not os.path.exists(os.path.join(tracefs.ALIAS_DIR, group))


@pytest.mark.parametrize("executor", ["tracefs"], indirect=True)   # BPF links need no alias
def test_cleanup_removes_the_aliases_of_dead_sessions(spaced, tmp_path):
    _program, library = spaced
    tracer = Tracer(tmp_path, f"{library}:semlib:tick")
    try:
        [alias_folder] = aliases_of(tracer.process.pid)
        tracer.process.kill()
        tracer.process.wait()
        result = subprocess.run(sdtrace_command("cleanup"), capture_output=True, text=True,
                                timeout=60)
        assert f"removed stale uprobe group {alias_folder}" in result.stderr
        assert wait_for(lambda: aliases_of(tracer.process.pid) == [])
    finally:
        tracer.kill()
