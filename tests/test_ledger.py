"""The guardian's ledger file (semaphores/guardian.py), on a temporary directory: root-free."""
import json
import os

from sdtrace.semaphores.counters import Holding
from sdtrace.semaphores.guardian import SCRATCH_SUFFIX, read_ledger, write_ledger

OWNER = {"pid": 4242, "starttime": 123456}
GUARDIAN = {"pid": 4243, "starttime": 123460}


def holding(pid, offset, path="/usr/lib/libexample.so.1"):
    return Holding(pid=pid, starttime=99, major=8, minor=1, inode=1234, offset=offset,
                   address=0x7f0000000000 + offset, byteorder="little", path=path)


def test_written_ledger_reads_back_whole(tmp_path):
    path = str(tmp_path / "semaphores-4242-123456-0.json")
    held = {holding(10, 0x4010): 1, holding(11, 0x4012, "/opt/with space/lib.so"): 3}
    write_ledger(path, OWNER, GUARDIAN, held)
    owner, guardian, holdings = read_ledger(path)
    assert (owner, guardian) == (OWNER, GUARDIAN)
    assert holdings == list(held.items())
    assert [h.path for h, _count in holdings] == [h.path for h in held]   # path: compare=False
    assert os.listdir(tmp_path) == [os.path.basename(path)]               # no scratch file left


def test_a_rewrite_replaces_the_ledger(tmp_path):
    path = str(tmp_path / "ledger.json")
    write_ledger(path, OWNER, GUARDIAN, {holding(10, 0x4010): 2})
    write_ledger(path, OWNER, GUARDIAN, {})
    assert read_ledger(path) == (OWNER, GUARDIAN, [])
    with open(path) as ledger:
        assert json.load(ledger) == {"owner": OWNER, "guardian": GUARDIAN, "holdings": []}
    assert not os.path.exists(path + SCRATCH_SUFFIX)
