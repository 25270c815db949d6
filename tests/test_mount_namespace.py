"""A process in its own mount namespace, its library on a tmpfs only it sees.

The shape of bpftrace's mountns test: `unshare --mount --propagation private`,
a tmpfs mounted in the new namespace, the fixture program and its library
copied there and run from there.  The process keeps our root directory, so
/proc/PID/root is our / and yet the path it maps names nothing here -- worse,
here an impostor (nosdt) lies at that very path.  `list -p` and `trace -p`
must read and arm the file the process maps, through a path the kernel
resolves from our side (checked by device and inode), in both semaphore
modes.
"""
import json
import os
import shlex
import shutil

import pytest
from helpers import Target, Tracer, sdtrace

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]


@pytest.fixture
def private(fixtures, tmp_path):
    """(Target of semuser in its own mount namespace with libsdtsem.so loaded, the
    library's path as the process sees it)."""
    directory = tmp_path / "private"
    directory.mkdir()
    library = directory / "libsdtsem.so"
    shutil.copy(fixtures.path("nosdt"), library)          # what our namespace sees there
    script = (f"mount -t tmpfs sdtrace-private {shlex.quote(str(directory))} && "
              f"cp {shlex.quote(fixtures.path('semuser'))} {shlex.quote(fixtures.path('libsdtsem.so'))} "
              f"{shlex.quote(str(directory))}/ && "
              f"exec {shlex.quote(str(directory / 'semuser'))} {shlex.quote(str(library))}")
    with Target("/usr/bin/unshare", "--mount", "--propagation", "private",
                "/bin/sh", "-c", script) as target:
        target.send("load")
        yield target, str(library)


def mapped_identity(pid, path):
    """(device, inode) of the file process `pid` maps at `path`, from /proc/PID/maps."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[-1] == path:
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                return os.makedev(major, minor), int(fields[4])
    raise AssertionError(f"process {pid} does not map {path}")


def identity(path):
    status = os.stat(path)
    return status.st_dev, status.st_ino


def test_the_namespace_hides_the_library(private):
    target, library = private
    assert os.stat(f"/proc/{target.pid}/root").st_ino == os.stat("/").st_ino
    assert identity(library) != mapped_identity(target.pid, library)


def test_list_reads_the_file_the_process_maps(private):
    target, library = private
    result = sdtrace("list", "--json", "-p", str(target.pid))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert (record["provider"], record["name"]) == ("semlib", "tick")
    assert record["file"].endswith(library)
    assert identity(record["file"]) == mapped_identity(target.pid, library)


@pytest.mark.parametrize("mode", ("kernel", "user"))
@pytest.mark.parametrize("spec", ("semlib:tick", "{library}:semlib:tick"))
def test_trace_arms_the_file_the_process_maps(private, tmp_path, mode, spec):
    target, library = private
    tracer = Tracer(tmp_path, "--semaphores", mode, "-p", str(target.pid),
                    spec.format(library=library))
    try:
        assert target.send("sem") == ["sem 1"]
        assert target.send("fire 2") == ["enabled 1"]
        events = tracer.stop()
    finally:
        tracer.kill()
    assert [(event["probe"], event["args"][0]) for event in events] == [("semlib:tick", 0),
                                                                         ("semlib:tick", 1)]
    assert target.send("sem") == ["sem 0"]
