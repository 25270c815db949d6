"""`sdtrace queries` against a real PostgreSQL 15 server (Debian's), on both executors.

The queries are the test's own, sent through psql: fast ones (`SELECT 1`), slow
ones (`pg_sleep(0.05)`: at least 50 ms each) and failing ones (`1/0`: an ERROR
ends them before query__done).  Texts carry a token of this run, so that other
PostgreSQL work on the machine cannot add to the counts of the system-wide runs.
"""
import json
import os
import shutil
import signal
import subprocess

import pytest
from helpers import (POSTGRES_BIN, TRACING, PsqlSession, one_line_error, postgres_server, psql,
                     sdtrace, sdtrace_command, summary_counts)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

POSTGRES = f"{POSTGRES_BIN}/postgres"
FAST, SLOW, FAILING = 20, 3, 2


@pytest.fixture(scope="module")
def server():
    """(socket directory, postmaster pid) of one server for the module's tests."""
    if not os.path.exists(POSTGRES) or not shutil.which("psql"):
        pytest.skip("PostgreSQL 15 is not installed")
    with postgres_server() as running:
        yield running


def queries_in_background(*args):
    """`sdtrace queries ARGS` running, armed (its "tracing" line read)."""
    process = subprocess.Popen(sdtrace_command("queries", *args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    assert TRACING in line, line + process.stderr.read()
    return process


def stop(process):
    """(stdout, stderr) of a tracer asked to end by SIGINT."""
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=60)


def test_a_backend_s_queries_are_counted_and_timed_per_text(server):
    """-p of one backend: FAST + SLOW queries pair exactly per text; the FAILING ones
    begin without ending and are reported so, without taking another query's END."""
    socket_dir, _postmaster = server
    session = PsqlSession(socket_dir)
    try:
        tracer = queries_in_background("--json", "-p", str(session.backend))
        session.send(*["SELECT 1;"] * FAST, *["SELECT 1/0;"] * FAILING,
                     *["SELECT pg_sleep(0.05);"] * SLOW)
        answers = session.close()
        out, err = tracer.communicate(timeout=60)     # it ends with the backend
    finally:
        session.process.kill()
    assert tracer.returncode == 0, err
    assert answers.splitlines() == ["1"] * FAST + [""] * SLOW
    *rows, pairing = map(json.loads, out.splitlines())
    by_text = {row["query"]: row for row in rows}
    assert {text: row["count"] for text, row in by_text.items()} == {
        "SELECT 1;": FAST, "SELECT pg_sleep(0.05);": SLOW}
    assert pairing == {"pairs": FAST + SLOW, "unmatched_ends": 0, "open_starts": FAILING,
                       "skipped_starts": 0}
    slow = by_text["SELECT pg_sleep(0.05);"]
    assert 50_000_000 <= slow["min"] <= slow["mean"] <= slow["max"] < 2_000_000_000
    fast = by_text["SELECT 1;"]
    assert 0 < fast["min"] <= fast["max"] < 50_000_000
    assert fast["total"] == pytest.approx(fast["mean"] * FAST, abs=FAST)
    assert summary_counts(err) == (2 * (FAST + SLOW) + FAILING, 0)


def test_system_wide_table_and_slower_on_the_postgres_binary(server):
    """System-wide on the binary, two sessions at once: the table counts each text of
    this run exactly, and --slower 40 prints the SLOW queries, each once, >= 50 ms,
    and no fast one."""
    socket_dir, _postmaster = server
    token = f"sdtrace_{os.getpid()}"
    fast_text, slow_text = f"SELECT 1 AS {token}", f"SELECT pg_sleep(0.05) AS {token}"
    table = queries_in_background(POSTGRES)
    slower = queries_in_background("--slower", "40", POSTGRES)
    try:
        for _ in range(FAST):
            psql(socket_dir, fast_text)
        backends = [int(psql(socket_dir, f"SELECT pg_backend_pid(), pg_sleep(0.05) AS {token}")
                        .stdout.split("|")[0]) for _ in range(SLOW)]
    finally:
        (table_out, table_err), (slower_out, slower_err) = stop(table), stop(slower)
    counts = {line.split(None, 4)[4]: int(line.split()[0]) for line in table_out.splitlines()
              if token in line}
    assert counts == {fast_text: FAST, slow_text.replace("pg_sleep(0.05)",
                                                         "pg_backend_pid(), pg_sleep(0.05)"): SLOW}
    assert "all queries" in table_out and summary_counts(table_err)[1] == 0
    header, *lines = slower_out.splitlines()
    assert header.split() == ["TIME(s)", "PID", "MS", "QUERY"]
    mine = [line.split(None, 3) for line in lines if token in line]
    assert [(int(pid), query) for _time, pid, _ms, query in mine] == [
        (backend, f"SELECT pg_backend_pid(), pg_sleep(0.05) AS {token}") for backend in backends]
    assert all(50 <= float(ms) < 2000 for _time, _pid, ms, _query in mine)
    assert summary_counts(slower_err)[1] == 0


def test_slower_json_lines(server):
    """--slower 0 --json: a line per query, with its pid, tid, comm, text and duration (ns)."""
    socket_dir, _postmaster = server
    session = PsqlSession(socket_dir)
    try:
        tracer = queries_in_background("--json", "--slower", "0", "-p", str(session.backend))
        session.send("SELECT 2;", "SELECT pg_sleep(0.05);")
        session.close()
        out, err = tracer.communicate(timeout=60)
    finally:
        session.process.kill()
    records = [json.loads(line) for line in out.splitlines()]
    assert [(record["pid"], record["tid"], record["comm"], record["query"])
            for record in records] == [(session.backend, session.backend, "postgres", query)
                                       for query in ("SELECT 2;", "SELECT pg_sleep(0.05);")]
    assert records[0]["duration"] < 50_000_000 <= records[1]["duration"]
    assert summary_counts(err) == (4, 0)


def test_no_postgres_in_reach_is_one_line():
    one_line_error(sdtrace("queries", "/bin/true"), "/bin/true", "PostgreSQL")
    one_line_error(sdtrace("queries", "--slower", "-1", POSTGRES), "--slower")
    one_line_error(sdtrace("queries", "-p", str(os.getpid())), str(os.getpid()), "PostgreSQL")
