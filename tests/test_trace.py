"""`sdtrace trace` on the real kernel, with real processes.

Every expected value comes from the traced program itself (the fixtures print
the truth) or from the kernel's view of the process (/proc/PID/mem), never
from sdtrace.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import helpers
from helpers import LIBJVM, POSTGRES_BIN
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import (Target, Tracer, address_of, counter, holds_for, maps, one_line_error,
                     read_mem, sdtrace_command, summary_counts, wait_for)

from sdtrace.discovery import notes
from sdtrace.errors import SdtraceError

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]


def semaphore_of(path, probe_name):
    [semaphore] = {p.semaphore for p in notes.read_probes(path) if p.name == probe_name}
    return semaphore


# -- values --------------------------------------------------------------------

def test_every_value_type_decodes_to_the_truth(fixtures, opt, tmp_path):
    """-c: every probe of `values` at -O0/-O2 decodes to what the program printed."""
    program = fixtures.path("values", opt)
    output = tmp_path / "events.json"
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-o", str(output), "-c", program,
                        "values:strings(str,str)", "values:*"),
        input="fire 1\nvalues\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    truth = {record["probe"]: record["args"] for record in
             (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))}
    events = {event["probe"]: event for event in
              (json.loads(line) for line in output.read_text().splitlines())}
    assert "guarded 1" in result.stdout.splitlines(), "the semaphore was not set before the hit"
    unavailable = {line for line in result.stderr.splitlines() if "unavailable" in line}
    for probe, expected in truth.items():
        event = events[probe]
        assert event["pid"] == event["tid"] and event["comm"] == "values"
        for index, (value, want) in enumerate(zip(event["args"], expected)):
            if value is None:  # allowed only where attach time said so
                assert any(f"{probe}: argument {index} is unavailable" in line
                           for line in unavailable), (probe, index)
            else:
                assert value == want, (probe, index, event["args"], expected)
    assert events["values:twelve"]["args"] == truth["values:twelve"]
    assert events["values:imm"]["args"] == truth["values:imm"]
    assert events["values:strings"]["args"] == truth["values:strings"]
    assert summary_counts(result.stderr) == (len(truth), 0)


# -- semaphores ------------------------------------------------------------------

def test_semaphore_exactly_one_per_process_with_relro_split(fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")
    semaphore = semaphore_of(library, "tick")
    with Target(fixtures.path("semuser"), library) as before:
        before.send("load")
        file_mappings = [m for m in maps(before.pid) if m.path == library]
        assert len(file_mappings) >= 4 and any(m.perms == "r--p" and m.offset > 0
                                               for m in file_mappings), "no RELRO split"
        tracer = Tracer(tmp_path, f"{library}:semlib:tick")
        try:
            assert wait_for(lambda: counter(before.pid, library, semaphore) == 1)
            with Target(fixtures.path("semuser"), library) as after:
                after.send("load")
                assert wait_for(lambda: counter(after.pid, library, semaphore) == 1)
                assert after.send("fire 2") == ["enabled 1"]
                assert before.send("fire 3") == ["enabled 1"]
                assert holds_for(lambda: counter(before.pid, library, semaphore) == 1, 0.3)
                events = tracer.stop()
                assert counter(after.pid, library, semaphore) == 0
            assert counter(before.pid, library, semaphore) == 0
        finally:
            tracer.kill()
    by_pid = {}
    for event in events:
        by_pid.setdefault(event["pid"], []).append(event["args"][0])
    assert by_pid == {after.pid: [0, 1], before.pid: [0, 1, 2]}
    assert summary_counts(tracer.stderr) == (5, 0)


def test_pid_scope_traces_only_that_process(fixtures, tmp_path, executor):
    """-p: the hits of that process alone.  The bpf link's pid filter raises that process's
    semaphore alone; the tracefs executor, which follows children without perf's inherit,
    arms the site for every process and skips the other's hits (README: scopes)."""
    library = fixtures.path("libsdtsem.so")
    semaphore = semaphore_of(library, "tick")
    with Target(fixtures.path("semuser"), library) as traced, \
            Target(fixtures.path("semuser"), library) as other:
        traced.send("load")
        other.send("load")
        tracer = Tracer(tmp_path, "-p", str(traced.pid), "semlib:tick")
        try:
            assert wait_for(lambda: counter(traced.pid, library, semaphore) == 1)
            assert counter(other.pid, library, semaphore) == (executor == "tracefs")
            other.send("fire 3")
            traced.send("fire 2")
            events = tracer.stop()
        finally:
            tracer.kill()
        assert counter(traced.pid, library, semaphore) == 0
    assert [(e["pid"], e["args"][0]) for e in events] == [(traced.pid, 0), (traced.pid, 1)]


def test_command_sees_semaphore_from_its_first_instruction(fixtures, tmp_path):
    """-c: the library is loaded after exec and its counter is raised once; exit status is kept."""
    library = fixtures.path("libsdtsem.so")
    output = tmp_path / "events.json"
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-o", str(output), "-c",
                        f"{fixtures.path('semuser')} {library}", f"{library}:semlib:tick"),
        input="load\nsem\nfire 2\nsem\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines().count("sem 1") == 2
    assert "enabled 1" in result.stdout
    events = [json.loads(line) for line in output.read_text().splitlines()]
    assert [e["args"][0] for e in events] == [0, 1]
    failing = subprocess.run(sdtrace_command("trace", "-c", "sh -c 'exit 7'",
                                             f"{library}:semlib:tick"),
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode == 7, failing.stderr
    assert summary_counts(failing.stderr) == (0, 0)


def test_two_sessions_share_the_kernel_count_and_return_to_baseline(fixtures, tmp_path):
    """The kernel keeps one uprobe per (inode, offset), whatever the number of
    sessions, and counts the semaphore once for it: 1 while either session is
    armed, 0 after both stopped, in either order."""
    library = fixtures.path("libsdtsem.so")
    semaphore = semaphore_of(library, "tick")
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        first = Tracer(tmp_path, f"{library}:semlib:tick")
        second = Tracer(tmp_path, f"{library}:semlib:*")
        try:
            assert wait_for(lambda: counter(target.pid, library, semaphore) == 1)
            target.send("fire 1")
            first_events = first.stop()        # a stop drains what the rings hold
            assert counter(target.pid, library, semaphore) == 1
            target.send("fire 1")
            second_events = second.stop()
            assert counter(target.pid, library, semaphore) == 0
        finally:
            first.kill()
            second.kill()
    assert len(first_events) == 1 and len(second_events) == 2


# -- real programs ---------------------------------------------------------------

SCRIPT = """
import json, colorsys
def alpha(x):
    return x
def beta(x):
    return -x
list(map(alpha, range(5)))
sorted(range(3), key=beta)
"""


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_system_python_function_names_and_imports(tmp_path):
    """CPython 3.11 fires function__entry for every frame only while its line
    marker is armed too (that puts the eval loop on its tracing path)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    output = tmp_path / "events.json"
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-o", str(output), "--buffer-pages", "4096",
                        "--string-size", "256",
                        "-c", f"{PYTHON} {script}", "python:function__entry(str,str)",
                        "python:line", "python:import__find__load__start(str)"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in output.read_text().splitlines()]
    calls = [(e["args"][1], e["args"][2]) for e in events
             if e["probe"] == "python:function__entry" and e["args"][0] == str(script)]
    def_line = {name: SCRIPT.splitlines().index(f"def {name}(x):") + 1 for name in ("alpha", "beta")}
    assert calls == ([("<module>", 0)] + [("alpha", def_line["alpha"])] * 5
                     + [("beta", def_line["beta"])] * 3)
    assert summary_counts(result.stderr)[1] == 0
    imports = {e["args"][0] for e in events if e["probe"] == "python:import__find__load__start"}
    assert {"json", "colorsys"} <= imports


def test_a_tracer_running_the_traced_interpreter_leaves_itself_out(tmp_path):
    """sdtrace runs here on Debian's python3.11, the very file it traces, whose python:line
    fires at every line the tracer runs too.  Its own hits are left out (before, it traced
    the lines that read its events, without end: 580,000 events of its own in 4 s), and a
    python3.11 started meanwhile is traced; both executors."""
    assert os.path.realpath(sys.executable) == os.path.realpath(PYTHON), \
        "the tests run on Debian's python3.11 (.ci/run makes the venv with it)"
    tracer = Tracer(tmp_path, f"{PYTHON}:python:line")
    try:
        workload = subprocess.run([PYTHON, "-I", "-S", "-c", "for _ in range(100): pass"],
                                  timeout=60)
        assert workload.returncode == 0
        later = subprocess.Popen([PYTHON, "-I", "-S", "-c", "pass"])
        later.wait(timeout=60)
    finally:
        events = tracer.stop()
    pids = {event["pid"] for event in events}
    assert tracer.process.pid not in pids
    assert later.pid in pids
    assert summary_counts(tracer.stderr)[1] == 0, tracer.stderr


CHATTY = """
import sys
def f(i):
    return i
for i in range(3000):
    f(i)
    sys.stdout.write("x" * 200 + "\\n")   # one write per line (python -u)
"""


def test_a_commands_output_falls_between_event_lines_never_inside(tmp_path):
    """-c's command shares sdtrace's stdout: its lines may come between the event lines but
    never inside one (sdtrace hands the kernel whole lines, at most PIPE_BUF bytes per
    write; a flow --json line once came cut by a java program's output)."""
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-c", f"{PYTHON} -u -I -S {script}",
                        "python:function__entry"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    events = [json.loads(line) for line in lines if line != "x" * 200]
    assert len(lines) - len(events) == 3000
    assert len(events) == summary_counts(result.stderr)[0] >= 3000
    assert {event["probe"] for event in events} == {"python:function__entry"}


# -- lifetimes -------------------------------------------------------------------

def test_sigkilled_tracer_leaves_nothing_armed(fixtures, tmp_path, executor):
    library = fixtures.path("libsdtsem.so")
    [tick] = [p for p in notes.read_probes(library) if p.name == "tick"]
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        site = address_of(target.pid, library, tick.offset)
        tracer = Tracer(tmp_path, f"{library}:semlib:tick")
        assert wait_for(lambda: counter(target.pid, library, tick.semaphore) == 1)
        assert read_mem(target.pid, site, 1) == b"\xcc"
        tracer.process.kill()
        killed_at = time.monotonic()
        tracer.process.wait()
        assert wait_for(lambda: read_mem(target.pid, site, 1) != b"\xcc"
                        and counter(target.pid, library, tick.semaphore) == 0, timeout=1.0)
        assert time.monotonic() - killed_at <= 1.0
        assert target.send("fire 1") == ["enabled 0"]
    group = f"sdtrace_{tracer.process.pid}_"
    with open("/sys/kernel/tracing/uprobe_events") as events:
        # tracefs definitions outlive their owner until cleanup; a BPF link has none
        assert (group in events.read()) == (executor == "tracefs")
    cleanup = subprocess.run(sdtrace_command("cleanup"), capture_output=True, text=True, timeout=60)
    assert cleanup.returncode == 0, cleanup.stderr
    with open("/sys/kernel/tracing/uprobe_events") as events:
        assert group not in events.read()


def test_sigterm_detaches_and_prints_summary(fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        tracer = Tracer(tmp_path, f"{library}:semlib:tick")
        try:
            target.send("fire 4")
            events = tracer.stop(signal.SIGTERM)
        finally:
            tracer.kill()
    assert tracer.process.returncode == 0
    assert len(events) == 4
    assert "semlib:tick" in tracer.stderr
    assert summary_counts(tracer.stderr) == (4, 0)


def test_loss_is_counted_exactly(fixtures, tmp_path):
    """A one-page ring under a flood: events received + lost == hits fired."""
    hits = 200_000
    output = tmp_path / "events.json"
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-o", str(output), "--buffer-pages", "1",
                        "-c", fixtures.path("flood"), "flood:hit(,str)"),
        input=f"fire {hits}\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"fired {hits}" in result.stdout
    received, lost = summary_counts(result.stderr)
    assert received == len(output.read_text().splitlines())
    assert lost > 0, "a one-page ring should overflow under this flood"
    assert received + lost == hits
    assert re.search(r"^sdtrace: lost \d+ events", result.stderr, re.M)


def test_count_limit_stops_early(fixtures, tmp_path):
    result = subprocess.run(
        sdtrace_command("trace", "--json", "-n", "3", "-c", fixtures.path("flood"), "flood:hit"),
        input="fire 10\n", capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["args"] for e in events] == [[0, "flood"], [1, "flood"], [2, "flood"]] or \
        [e["args"][0] for e in events] == [0, 1, 2]
    assert summary_counts(result.stderr) == (3, 0)


# -- the Python API ----------------------------------------------------------------

def test_session_api_yields_events(fixtures, executor):
    import sdtrace

    library = fixtures.path("libsdtsem.so")
    with Target(fixtures.path("semuser"), library) as target:
        target.send("load")
        with sdtrace.Session([f"{library}:semlib:tick(,str)"], pid=target.pid,
                             executor=executor) as session:
            assert target.send("fire 2") == ["enabled 1"]
            events = list(session.events(count=2, duration=10))
    assert [(e.pid, e.probe, e.args[0]) for e in events] == [(target.pid, "semlib:tick", 0),
                                                             (target.pid, "semlib:tick", 1)]
    assert all(isinstance(e.args[1], str) and e.comm == "semuser" for e in events)


# -- errors ------------------------------------------------------------------------

def test_errors_are_one_clear_line(fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")

    def trace(*args, **options):
        return subprocess.run(sdtrace_command("trace", *args), capture_output=True, text=True,
                              timeout=60, **options)

    one_line_error(trace(f"{library}:semlib:nothing"), "no probe matches")
    one_line_error(trace("-p", "999999999", "semlib:tick"), "999999999", "does not exist")
    one_line_error(trace(fixtures.path("nosdt")), "no SDT notes")
    one_line_error(trace("-c", "/no/such/program", "x:y"), "/no/such/program")
    one_line_error(trace(f"{library}:semlib:tick(str,str,str)"), "3 types", "2 arguments")


def test_unprivileged_user_gets_one_line(fixtures):
    """Run as nobody, with an interpreter nobody may execute (pyenv's lives under /root)."""
    interpreter = PYTHON
    if not os.path.exists(interpreter):
        pytest.skip("needs /usr/bin/python3.11 to run sdtrace as an unprivileged user")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__import__("sdtrace").__file__)))
    result = subprocess.run(
        [interpreter, "-m", "sdtrace", "trace", f"{fixtures.path('libsdtsem.so')}:semlib:tick"],
        capture_output=True, text=True, timeout=60, cwd="/", preexec_fn=lambda: os.setuid(65534),
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": repository})
    one_line_error(result, "root")




@pytest.fixture
def postgres_server():
    """psql(sql) against a throw-away PostgreSQL 15 server (helpers.postgres_server)."""
    import shutil

    if not os.path.exists(f"{POSTGRES_BIN}/postgres") or not shutil.which("psql"):
        pytest.skip("PostgreSQL 15 is not installed")
    with helpers.postgres_server() as (socket_dir, _postmaster):
        yield lambda sql: helpers.psql(socket_dir, sql)


def test_postgres_query_start_carries_the_query_text(postgres_server, tmp_path):
    queries = ["SELECT 6 * 7", "SELECT count(*) FROM pg_class WHERE relname = 'sdtrace'"]
    tracer = Tracer(tmp_path, f"{POSTGRES_BIN}/postgres:postgresql:query__start(str)")
    try:
        answers = [postgres_server(sql).stdout.strip() for sql in queries]
        events = tracer.stop()             # the hits precede the answers; a stop drains them
    finally:
        tracer.kill()
    assert answers == ["42", "0"]
    seen = [event["args"][0] for event in events if event["comm"] == "postgres"]
    assert [sql for sql in seen if sql in queries] == queries




@pytest.mark.skipif(not os.path.exists(LIBJVM), reason="OpenJDK 17's libjvm.so is not installed")
def test_every_site_of_libjvm_in_one_command():
    """Hundreds of sites attach in one command and all of them are removed again.

    Slow by nature: the kernel takes one RCU grace period (~75 ms) per uprobe
    it unregisters, one after the other."""
    sites = {(probe.offset, probe.provider, probe.name) for probe in notes.read_probes(LIBJVM)}
    result = subprocess.run(sdtrace_command("trace", "-d", "0.2", f"{LIBJVM}:*:*"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"sdtrace: tracing {len(sites)} site(s)" in result.stderr
    assert summary_counts(result.stderr)[1] == 0
    with open("/sys/kernel/tracing/uprobe_events") as definitions:
        assert LIBJVM not in definitions.read()


def test_pid_trace_ends_when_the_process_exits(fixtures, tmp_path):
    library = fixtures.path("libsdtsem.so")
    target = Target(fixtures.path("semuser"), library).start()
    try:
        target.send("load")
        tracer = Tracer(tmp_path, "-p", str(target.pid), "semlib:tick")
        target.send("fire 2")
    finally:
        target.stop()
    try:
        tracer.process.wait(timeout=10)      # no signal: it ends by itself
        _out, err = tracer.process.communicate()
    finally:
        tracer.kill()
    assert tracer.process.returncode == 0
    assert summary_counts(tracer.stderr + err) == (2, 0)
    assert len(tracer.events()) == 2


def test_empty_command_is_refused():
    result = subprocess.run(sdtrace_command("trace", "-c", "", "/bin/true:x:y"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr == "sdtrace: -c: empty command\n"


# -- executors ---------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_a_string_cut_at_the_string_size_is_marked(tmp_path, executor):
    """--string-size cuts the BPF executor's strings and marks them, in JSON and text;
    the tracefs executor reads whole strings and says the option is not its own."""
    script = tmp_path / "named_for_its_length.py"
    script.write_text("def f(): pass\nf()\n")
    runs = {}
    for form in ("--json", "--text"):
        result = subprocess.run(
            sdtrace_command("trace", *([form] if form == "--json" else []), "--string-size",
                            "12", "-c", f"{PYTHON} {script}", "python:function__entry(str,str)",
                            "python:line"),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        runs[form] = result
    events = [json.loads(line) for line in runs["--json"].stdout.splitlines()]
    [entry] = [event for event in events if event["probe"] == "python:function__entry"
               and event["args"][1] == "f"]
    [line] = [line for line in runs["--text"].stdout.splitlines()
              if "function__entry" in line and '"f"' in line]
    if executor == "bpf":
        assert entry["args"][0] == str(script)[:12] and entry["truncated"] == [0]
        assert line.endswith("[truncated: 0]")
        assert all("warning" not in result.stderr for result in runs.values())
    else:
        assert entry["args"][0] == str(script) and "truncated" not in entry
        assert "truncated" not in line
        assert all("--string-size applies to the bpf executor" in result.stderr
                   for result in runs.values())


def test_executor_choices_are_checked(tmp_path):
    bad = subprocess.run(sdtrace_command("trace", "--executor", "ebpf", "x:y"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'ebpf'" in bad.stderr
    one_line_error(subprocess.run(sdtrace_command("trace", "--string-size", "0", "x:y"),
                                  capture_output=True, text=True, timeout=60),
                   "--string-size", "above 0")


def test_auto_falls_back_in_one_line_where_bpf_cannot_run():
    """auto takes the tracefs executor for sites of a machine the BPF code generator
    does not know, saying why; asking for bpf there is the error."""
    from sdtrace.engine import session

    assert session.choose_executor("auto", {"x86_64"})[0] == "bpf"
    executor, why = session.choose_executor("auto", {"aarch64"})
    assert executor == "tracefs" and why.startswith(session.FALLBACK) and "aarch64" in why
    with pytest.raises(SdtraceError, match="the bpf executor cannot run here: .*aarch64"):
        session.choose_executor("bpf", {"aarch64"})
    assert session.choose_executor("tracefs", {"x86_64"}) == ("tracefs", "as asked")
