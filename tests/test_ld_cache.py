"""The /etc/ld.so.cache reader (discovery/targets.py) against `ldconfig -p`: root-free."""
import os
import re
import shutil
import subprocess

import pytest

from sdtrace.discovery import targets

# how `ldconfig -p` names this machine's ABI: "libz.so.1 (libc6,x86-64) => /lib/..."
LDCONFIG_ABI = {"x86_64": "libc6,x86-64", "aarch64": "libc6,AArch64", "i386": "libc6",
                "i686": "libc6"}
LDCONFIG_LINE = re.compile(r"^\s+(\S+) \(([^)]*)\) => (\S+)$", re.M)
LDCONFIG = shutil.which("ldconfig") or "/sbin/ldconfig"


@pytest.fixture
def fresh_cache():
    """The reader caches its one reading; each test starts without it, and leaves none."""
    targets._ld_cache_entries.cache_clear()
    yield
    targets._ld_cache_entries.cache_clear()


def test_entries_are_ldconfigs_in_its_order(fresh_cache):
    listing = subprocess.run([LDCONFIG, "-p"], check=True, capture_output=True, text=True).stdout
    abi = LDCONFIG_ABI[targets.MACHINE]
    expected = [(name, path) for name, flags, path in LDCONFIG_LINE.findall(listing)
                if flags.split(", ")[0] == abi]
    assert expected, listing[:500]
    assert list(targets._ld_cache_entries()) == expected


def test_libc_is_found_through_the_cache(fresh_cache):
    [libc] = [path for name, path in targets._ld_cache_entries() if name == "libc.so.6"]
    assert targets.find_library("libc") == libc and os.path.exists(libc)


@pytest.mark.parametrize("content", [None, b"", b"not a cache at all" * 10,
                                     b"glibc-ld.so.cache1.1" + b"\0" * 8])
def test_missing_or_broken_caches_give_nothing(fresh_cache, tmp_path, monkeypatch, content):
    path = tmp_path / "ld.so.cache"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(targets, "LD_SO_CACHE", str(path))
    assert targets._ld_cache_entries() == ()


def test_entries_past_the_end_of_a_truncated_cache_are_dropped(fresh_cache, tmp_path,
                                                              monkeypatch):
    with open(targets.LD_SO_CACHE, "rb") as cache:
        whole = cache.read()
    first = whole.find(targets.CACHE_MAGIC) + len(targets.CACHE_MAGIC) + targets.CACHE_HEADER.size
    entries = targets._ld_cache_entries()
    truncated = tmp_path / "ld.so.cache"
    truncated.write_bytes(whole[:first + 3 * targets.CACHE_ENTRY.size + 5])
    monkeypatch.setattr(targets, "LD_SO_CACHE", str(truncated))
    targets._ld_cache_entries.cache_clear()
    survivors = targets._ld_cache_entries()
    # the strings live past the entries: the three survivors' names read as ""
    assert len(entries) > 3 and len(survivors) <= 3 and set(survivors) <= {("", "")}
