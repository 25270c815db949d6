"""`sdtrace semaphores`: the audit of SDT semaphores in running processes.

The states are made by hand and checked against the process itself: a
counter is "leaked" after the test writes it through /proc/PID/mem, and a
site is "armed" after the test defines and enables a uprobe on it through
tracefs (removed again in a finally).  Addresses come from /proc/PID/maps,
offsets from readelf.
"""
import contextlib
import json
import os

import pytest

from conftest import (TRACEFS, Target, address_of, file_offset, read_mem, readelf_notes,
                      sdtrace)
from test_refcount import Library, private_copy, semaphore_offsets, set_counter

GROUP = "sdtrace_test_audit"


def semaphores_json(*args):
    result = sdtrace("semaphores", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def tracefs_write(name, text, flags=os.O_WRONLY):
    fd = os.open(os.path.join(TRACEFS, name), flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def armed_site(path, site_offset):
    """A uprobe (without ref_ctr) defined and enabled at `path`+`site_offset`."""
    tracefs_write("uprobe_events", f"p:{GROUP}/x {path}:0x{site_offset:x}\n",
                  os.O_WRONLY | os.O_APPEND)
    try:
        tracefs_write(f"events/{GROUP}/x/enable", "1")
        try:
            yield
        finally:
            tracefs_write(f"events/{GROUP}/x/enable", "0")
    finally:
        tracefs_write("uprobe_events", f"-:{GROUP}/x\n", os.O_WRONLY | os.O_APPEND)


@pytest.fixture
def library(fixtures, tmp_path):
    return Library(fixtures, tmp_path)


@pytest.fixture
def user(library):
    target = library.user()
    yield target
    target.stop()


def test_value_armed_and_leaked(library, user):
    [note] = readelf_notes(library.path)
    site_offset = file_offset(library.path, note.location)
    address = address_of(user.pid, library.path, library.offset, perms="rw-p")
    expected = {"pid": user.pid, "comm": "semuser", "file": library.path,
                "provider": "semlib", "name": "tick", "semaphore": library.offset,
                "address": address, "value": 0, "armed": False, "leaked": False}
    assert semaphores_json("-p", str(user.pid)) == [expected]
    try:
        set_counter(user.pid, library.path, library.offset, 1)
        assert semaphores_json("-p", str(user.pid)) == [dict(expected, value=1, leaked=True)]
        with armed_site(library.path, site_offset):
            site = address_of(user.pid, library.path, site_offset, perms="r-xp")
            assert read_mem(user.pid, site, 1) == b"\xcc"
            assert semaphores_json("-p", str(user.pid)) == [dict(expected, value=1, armed=True)]
        assert read_mem(user.pid, site, 1) != b"\xcc"
        assert semaphores_json("-p", str(user.pid)) == [dict(expected, value=1, leaked=True)]
        table = sdtrace("semaphores", "-p", str(user.pid)).stdout.splitlines()
        assert table[0].split() == ["PID", "COMM", "FILE", "PROBE", "SEMAPHORE", "ADDRESS",
                                    "VALUE", "ARMED", "LEAKED"]
        assert table[1].split() == [str(user.pid), "semuser", library.path, "semlib:tick",
                                    f"0x{library.offset:x}", f"0x{address:x}", "1", "no",
                                    "LEAKED"]
    finally:
        set_counter(user.pid, library.path, library.offset, 0)


def test_all_processes_filtered_by_spec(fixtures, tmp_path, library, user):
    other = library.user()
    persite = Target(private_copy(fixtures, "persite", tmp_path)).start()
    try:
        def rows(*specs):
            return [row for row in semaphores_json(*specs)
                    if row["pid"] in (user.pid, other.pid, persite.pid)]

        ticks = rows("semlib:tick")
        assert sorted(row["pid"] for row in ticks) == sorted([user.pid, other.pid])
        assert {row["file"] for row in ticks} == {library.path}

        hits = rows("persite:hit")
        per_site = semaphore_offsets(persite.argv[0], "hit")
        assert [row["pid"] for row in hits] == [persite.pid] * 2
        assert sorted(row["semaphore"] for row in hits) == sorted(per_site.values())
        assert all(row["name"] == "hit" and row["value"] == 0 for row in hits)

        everything = rows()
        assert len([row for row in everything if row["pid"] == persite.pid]) == 3
        assert rows(library.path) == ticks      # a target: that file only
        assert rows("nosuch:probe") == []
    finally:
        other.stop()
        persite.stop()


def test_bad_input_is_one_line():
    missing = sdtrace("semaphores", "-p", "999999999")
    assert missing.returncode == 1
    assert missing.stderr == "sdtrace: process 999999999 does not exist\n"
    bad_spec = sdtrace("semaphores", "a:b:c:(u99)")
    assert bad_spec.returncode == 1
    assert len(bad_spec.stderr.splitlines()) == 1 and "u99" in bad_spec.stderr
