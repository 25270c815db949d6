"""`sdtrace semaphores`: the audit of SDT semaphores in running processes.

The states are made by hand and checked against the process itself: a
counter is "leaked" after the test writes it through /proc/PID/mem, and a
site is "armed" after the test defines and enables a uprobe on it through
tracefs (removed again in a finally).  Addresses come from /proc/PID/maps,
offsets from readelf.
"""
import contextlib
import errno
import json
import os
import subprocess
import sys

import pytest
from helpers import (TRACEFS, Library, Target, address_of, file_offset, private_copy, read_mem,
                     readelf_notes, sdtrace, semaphore_offsets, set_counter)

pytestmark = pytest.mark.kernel

GROUP = "sdtrace_test_audit"

# Loads a library, then makes the page at the address read from stdin fault for every
# access with a guard region (MADV_GUARD_INSTALL; file mappings since Linux 6.15).
GUARD_PAGE = """
import ctypes, os, sys
ctypes.CDLL(sys.argv[1])
print("loaded", flush=True)
page_size = os.sysconf("SC_PAGE_SIZE")
page = int(sys.stdin.readline()) & ~(page_size - 1)
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
failed = libc.madvise(page, page_size, 102) != 0
print(os.strerror(ctypes.get_errno()) if failed else "guarded", flush=True)
sys.stdin.read()
os._exit(0)   # exit() would run the library's destructors, which touch that page
"""


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


def test_a_counter_whose_memory_faults_is_skipped(library, user):
    """The mapping is listed but reading its memory fails (EIO), as when a library is
    unloaded between the audit's reading the maps and the memory; a guard region over
    the counter's page makes that race permanent.  The process is skipped, no traceback."""
    helper = subprocess.Popen([sys.executable, "-c", GUARD_PAGE, library.path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline() == "loaded\n"
        address = address_of(helper.pid, library.path, library.offset, perms="rw-p")
        helper.stdin.write(f"{address}\n")
        helper.stdin.flush()
        answer = helper.stdout.readline().strip()
        if answer != "guarded":
            pytest.skip(f"no guard regions in file mappings here: {answer}")
        with pytest.raises(OSError) as unreadable:
            read_mem(helper.pid, address, 2)
        assert unreadable.value.errno == errno.EIO
        alone = sdtrace("semaphores", "--json", "-p", str(helper.pid))
        assert (alone.returncode, alone.stdout, alone.stderr) == (0, "", "")
        assert [row["pid"] for row in semaphores_json(library.path)] == [user.pid]
    finally:
        helper.stdin.close()
        try:
            helper.wait(timeout=5)
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
            helper.stdout.close()


def test_bad_input_is_one_line():
    missing = sdtrace("semaphores", "-p", "999999999")
    assert missing.returncode == 1
    assert missing.stderr == "sdtrace: process 999999999 does not exist\n"
    bad_spec = sdtrace("semaphores", "a:b:c:(u99)")
    assert bad_spec.returncode == 1
    assert len(bad_spec.stderr.splitlines()) == 1 and "u99" in bad_spec.stderr
