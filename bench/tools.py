"""Benchmark: sdtrace's language tools beside the bcc tools that answer the same question.

``TOOLS`` is the table: a tool's row names its workload and the two commands
run against it, sdtrace's and bcc's (Debian's bpfcc-tools names them
``NAME-bpfcc``; its Java ones, javagc-bpfcc..., are bash wrappers that a
SIGINT does not end, so the rows run the scripts they wrap: ugc -l java...).  A workload is a context manager that sets up the traced
program and yields a ``Workload``: the pids a bcc tool takes with ``-p``, the
file sdtrace traces system-wide, and ``run()``, which does the work once and
returns (operations, seconds).  Per row, ROUNDS rounds round-robin of the
untraced workload and the workload under each tracer; each tracer is started
before the run and ready (its ready line read) before the work begins, and is
ended by SIGINT after it.  Printed: the median operations per second and its
ratio to the untraced median, and what each tracer counted where it says.

Workloads:

  postgres   PostgreSQL 15 (helpers.postgres_server, loaded by `pgbench -i -s 1`),
             CLIENTS psql sessions, each one backend, sending QUERIES simple
             queries each, pgbench -S's (SELECT abalance FROM pgbench_accounts
             WHERE aid = random), then one `SELECT 'done'`: an operation is a
             query.  The backends live through every run, so that bcc's -p
             (which sees only the processes named, not those forked later) sees
             them; sdtrace is run system-wide on the postgres binary.

  jvm        OpenJDK 17 (-XX:+UseSerialGC -XX:+DTraceAllocProbes) running
             tests/fixtures/java/Work, which on each request allocates
             ALLOCATIONS objects (objnew), calls System.gc() GCS times (gc) or
             starts and joins THREADS named threads (threads): an operation is
             one of those; or, started with -XX:+DTraceMethodProbes, calls
             Calls.g(i), which calls Calls.f(i), JAVA_CALLS times (calls java)
             or STAT_CALLS times (stat java): an operation is a call of g.  One
             JVM lives through every run; both tracers take its pid (ustat, which
             takes none, every process whose comm is java: this one alone).

  python     A private copy of Debian's python3.11 (its own inode: the kernel
             refuses a uprobe where another tracer on the machine already has
             one with another semaphore offset, as bcc's have) serving
             tests/fixtures/calls.py: g(i) calls f(i), PYTHON_CALLS_PER_RUN
             times (calls python), FLOW_CALLS times (flow python, where each
             call is a line of output) or STAT_CALLS times (stat python, the
             copy named python: ustat finds its processes by that comm): an
             operation is a call of g.

The floor where a row has one: bpftrace with an empty action on the calls'
entry probe of the workload's pid (bare_uprobe), python:line's semaphore
raised too as sdtrace raises it (CPython 3.11 fires function__entry at every
call only then): the trap every counter of calls pays.

bcc compiles its programs against kernel headers: where the running kernel has
none (no /lib/modules/$(uname -r)/build, no CONFIG_IKHEADERS), point
BCC_KERNEL_SOURCE at a tree of another release's (Debian's linux-headers-6.1
-common and -amd64 merged into one directory serve these tools: they read
only pt_regs and USDT arguments).

Run as root: python3 bench/tools.py [TOOL...]    (default: every tool; $ROUNDS rounds)
"""
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, NamedTuple

from common import ENVIRONMENT, wait_for_line
from helpers import (POSTGRES_BIN, PYTHON_CALLS, SYSTEM_PYTHON, PsqlSession,  # via common
                     build_java_fixtures, jdk_home, postgres_server, summary_counts)

ROUNDS = int(os.environ.get("ROUNDS", 5))
CLIENTS = 2
QUERIES = 10_000                     # per client and run
POSTGRES = f"{POSTGRES_BIN}/postgres"
UNTRACED = "untraced"
BENCH = os.path.dirname(os.path.abspath(__file__))
ENDING = 60                          # seconds a tracer has to end after SIGINT


class Workload(NamedTuple):
    pids: List[int]          # what bcc's -p takes
    target: str              # what sdtrace traces system-wide
    run: Callable            # run() -> (operations, seconds)


@contextlib.contextmanager
def postgres_queries():
    with postgres_server("sdtrace-bench-tools-") as (socket_dir, _postmaster):
        subprocess.run([f"{POSTGRES_BIN}/pgbench", "-h", socket_dir, "-U", "postgres", "-i",
                        "-s", "1", "-q", "postgres"], check=True, capture_output=True)
        clients = [PsqlSession(socket_dir) for _ in range(CLIENTS)]
        for client in clients:
            client.send(r"\o /dev/null")

        def run():
            started = time.monotonic()
            for client in clients:
                client.send(*(f"SELECT abalance FROM pgbench_accounts WHERE aid = "
                              f"{random.randint(1, 100_000)};" for _ in range(QUERIES)),
                            r"\o", "SELECT 'done';", r"\o /dev/null")
            for client in clients:
                while client.process.stdout.readline().strip() != "done":
                    pass
            return CLIENTS * (QUERIES + 1), time.monotonic() - started
        try:
            yield Workload([client.backend for client in clients], POSTGRES, run)
        finally:
            for client in clients:
                client.close()


ALLOCATIONS, GCS, THREADS = 2_000_000, 20, 200     # per run, of the jvm workload
JAVA_CALLS, PYTHON_CALLS_PER_RUN, FLOW_CALLS = 500_000, 1_000_000, 20_000
STAT_CALLS = 5_000_000              # per run: seconds under ustat, which counts per interval


@contextlib.contextmanager
def _server(command, target, request, count):
    """A Workload of a program that prints "ready", then answers each line `request` with
    "done" once it has done `count` operations; `target` is the file sdtrace traces."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "ready"

        def run():
            started = time.monotonic()
            process.stdin.write(f"{request}\n")
            process.stdin.flush()
            assert process.stdout.readline().strip() == "done"
            return count, time.monotonic() - started
        yield Workload([process.pid], target, run)
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def jvm_work(request, count, flag="-XX:+DTraceAllocProbes"):
    """The jvm workload: `request` ("alloc", "gc", "threads", "calls") `count` times a
    run, in a JVM started with `flag`."""
    return _server([os.path.join(jdk_home(), "bin", "java"), "-XX:+UseSerialGC", flag, "-cp",
                    build_java_fixtures(), "Work"],
                   os.path.join(jdk_home(), "lib", "server", "libjvm.so"),
                   f"{request} {count}", count)


@contextlib.contextmanager
def python_calls(count, name="python3.11"):
    """The python workload: a private copy of Debian's python3.11 (named `name`) serving
    tests/fixtures/calls.py, `count` calls of g (each calling f) a run."""
    with tempfile.TemporaryDirectory(prefix="sdtrace-bench-tools-") as scratch:
        python = shutil.copy2(SYSTEM_PYTHON, os.path.join(scratch, name))
        with _server([python, PYTHON_CALLS, "serve"], python, count, count) as workload:
            yield workload


class Tracer(NamedTuple):
    command: Callable        # command(workload) -> argv
    ready: Callable          # ready(process): returns once it traces
    counted: Callable        # counted(stdout, stderr) -> what it says it saw, or None


def _sdtrace(*args):
    return [sys.executable, "-m", "sdtrace", *args]


def _sdtrace_count(out, err):
    import json

    records = [json.loads(line) for line in out.splitlines()]
    counted = sum(record["count"] for record in records if "query" in record)
    return f"{counted:,} queries, {summary_counts(err)[1]} lost"


def _log2_hist_count(out, _err):
    """The hits of a bcc log2 histogram (`  256 -> 511  : 1234  |***|`)."""
    counted = sum(int(match[1]) for match in re.finditer(r"-> \d+\s*: (\d+)", out))
    return f"{counted:,} queries"


def _json_lines(out):
    import json

    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _sdtrace_objnew(out, err):
    counted = sum(row["count"] for row in _json_lines(out) if row["class"] == "AllocItem")
    return f"{counted:,} AllocItem, {summary_counts(err)[1]} lost"


def _sdtrace_gc(out, _err):
    return f"{sum('duration_ns' in line for line in _json_lines(out))} collections"


def _sdtrace_threads(out, _err):
    started = sum(line["event"] == "start" and line["name"].startswith("sdtrace-worker-")
                  for line in _json_lines(out))
    return f"{started} threads started"


def _sdtrace_calls(out, err):
    counted = sum(row["count"] for row in _json_lines(out)
                  if row.get("function", row.get("method")) == "f")
    return f"f: {counted:,} calls, {summary_counts(err)[1]} lost"


def _bcc_f_calls(out, _err):
    """The calls of f that bcc's ucalls table shows (its METHOD column ends in .f)."""
    counted = sum(int(match[1]) for match in re.finditer(r"[./]f\s+(\d+)", out))
    return f"f: {counted:,} calls"


def _f_lines(entries, returns, lost):
    return f"f: {entries:,} entries, {returns:,} returns, {lost:,} lost"


def _sdtrace_flow(out, err):
    lines = [line for line in _json_lines(out) if line["call"].endswith(".f")]
    return _f_lines(sum(line["event"] == "entry" for line in lines),
                    sum(line["event"] == "return" for line in lines), summary_counts(err)[1])


def _bcc_flow(out, err):
    """uflow's lines of f (`-> FILE.f`, `<- FILE.f`), and the samples its perf buffer
    lost, which bcc says on stderr (`Possibly lost N samples`)."""
    return _f_lines(len(re.findall(r"-> \S*\.f\s*$", out, re.M)),
                    len(re.findall(r"<- \S*\.f\s*$", out, re.M)),
                    sum(int(lost) for lost in re.findall(r"Possibly lost (\d+) samples", err)))


def _sdtrace_stat(out, err):
    """The calls of stat's totals (one process: the workload's)."""
    counted = sum(line["calls"] or 0 for line in _json_lines(out) if line.get("total"))
    return f"{counted:,} calls, {summary_counts(err)[1]} lost"


def _bcc_ustat(out, err):
    """The calls in ustat's tables (METHOD/s, of 1 s intervals: the counts of each; the
    first, read by _ustat_ready up to its time line, is from before the work), how many
    tables came after the first, and the last line of its traceback if it had one (a
    failed attach or detach): its rows end in METHOD/s GC/s OBJNEW/s CLOAD/s EXC/s THR/s."""
    rows = re.findall(r"^\d+ .* (\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s*$", out, re.M)
    failed = f"; {err.strip().splitlines()[-1][:120]}" if "Traceback" in err else ""
    return f"{sum(map(int, rows)):,} calls in {out.count('loadavg')} tables{failed}"


def _bcc_lines(pattern):
    """counted() of a bcc tool: how many lines of its output match `pattern`."""
    return lambda out, _err: f"{len(re.findall(pattern, out, re.M))} lines"


def _nothing(_out, _err):
    return None


SDTRACE_READY = wait_for_line("sdtrace: tracing")


def _bcc_ready(process):
    line = process.stdout.readline()
    if "Tracing" not in line:
        raise RuntimeError(f"{process.args[0]} did not start: {line}{process.stderr.read()}")


def bare_uprobe(pid, path, probe, *companions):
    """The floor, run as a tracer of its own (_floor): bpftrace with an empty action on
    `probe` of `path` in process `pid`, the semaphores of `companions` raised too (as sdtrace
    raises python:line's, for CPython 3.11 to fire function__entry at every call); prints
    "Tracing" once the probe's int3 is in the process, and undoes it all at SIGINT."""
    from helpers import address_of, counter, read_mem, set_counter
    from sdtrace import read_probes

    sites = {site.name: site for site in read_probes(path)}
    tracer = subprocess.Popen(["bpftrace", "-p", pid, "-e",
                               f"usdt:{path}:{sites[probe].provider}:{probe} {{ }}"],
                              stdout=subprocess.DEVNULL)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])     # after: bpftrace's own
    site = address_of(int(pid), path, sites[probe].offset, "r-xp")
    while read_mem(int(pid), site, 1) != b"\xcc":
        if tracer.poll() is not None:
            sys.exit(f"bpftrace exited ({tracer.returncode})")
        time.sleep(0.01)
    for name in companions:
        semaphore = sites[name].semaphore
        set_counter(int(pid), path, semaphore, counter(int(pid), path, semaphore) + 1)
    print("Tracing", flush=True)
    signal.sigwait([signal.SIGINT])
    for name in companions:
        semaphore = sites[name].semaphore
        set_counter(int(pid), path, semaphore, counter(int(pid), path, semaphore) - 1)
    tracer.send_signal(signal.SIGINT)
    tracer.wait()


def _floor(probe, *companions):
    """A Tracer's command(): bare_uprobe on the workload's process and file."""
    def command(workload):
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {BENCH!r}); "
                "import tools; tools.bare_uprobe(*sys.argv[1:])", str(workload.pids[0]),
                workload.target, probe, *companions]
    return command


def _ustat_ready(process):
    """ustat says it traces, then attaches (clang compiles its program) and counts for an
    interval: ready at its first table's time line."""
    _bcc_ready(process)
    for line in process.stdout:
        if "loadavg" in line:
            return
    raise RuntimeError(f"ustat ended before its first table: {process.stderr.read()}")


def _calls_rows(language, floor):
    """calls' rows on a workload of `language` (its calls' probe: the floor): the bare
    uprobe, sdtrace calls and calls --latency, bcc ucalls and ucalls -L, all on its pid."""
    def calls(*options):
        return Tracer(lambda w: _sdtrace("calls", "--json", *options, "--executor", "bpf",
                                         "-p", str(w.pids[0])), SDTRACE_READY, _sdtrace_calls)

    def ucalls(*options):
        return Tracer(lambda w: ["ucalls", *options, "-l", language, str(w.pids[0])],
                      _bcc_ready, _bcc_f_calls)
    return {f"bare uprobe ({floor[0]})": Tracer(_floor(*floor), _bcc_ready, _nothing),
            "sdtrace calls (bpf)": calls(), "sdtrace calls --latency (bpf)": calls("--latency"),
            f"bcc ucalls -l {language}": ucalls(),
            f"bcc ucalls -L -l {language}": ucalls("-L")}


def _stat_rows(language, floor):
    """stat's rows on a workload of `language` (its calls' probe: the floor): the bare
    uprobe, sdtrace stat, bcc ustat (-C, 1 s intervals; it takes no pid, but every process
    whose comm is the language's: the workload, and for python this bench's own
    interpreter, which makes no Python call while it waits for a run)."""
    return {
        f"bare uprobe ({floor[0]})": Tracer(_floor(*floor), _bcc_ready, _nothing),
        "sdtrace stat (bpf)": Tracer(
            lambda w: _sdtrace("stat", "--json", "--executor", "bpf", "-p", str(w.pids[0])),
            SDTRACE_READY, _sdtrace_stat),
        f"bcc ustat -l {language}": Tracer(lambda w: ["ustat", "-C", "-l", language, "1"],
                                           _ustat_ready, _bcc_ustat),
    }


# tool -> {row: Tracer}; a row of sdtrace, then the bcc tool answering the same question
TOOLS = {
    "queries": (postgres_queries, {
        "sdtrace queries (bpf)": Tracer(
            lambda w: _sdtrace("queries", "--json", "--executor", "bpf", w.target),
            SDTRACE_READY, _sdtrace_count),
        "sdtrace queries (tracefs)": Tracer(
            lambda w: _sdtrace("queries", "--json", "--executor", "tracefs", w.target),
            SDTRACE_READY, _sdtrace_count),
        "bcc dbstat": Tracer(
            lambda w: ["dbstat-bpfcc", "postgres", "-u", "-p", *map(str, w.pids)],
            _bcc_ready, _log2_hist_count),
    }),
    "queries --slower": (postgres_queries, {
        "sdtrace queries --slower 1": Tracer(
            lambda w: _sdtrace("queries", "--slower", "1", w.target), SDTRACE_READY, _nothing),
        "bcc dbslower -m 1": Tracer(
            lambda w: ["dbslower-bpfcc", "postgres", "-m", "1", "-p", *map(str, w.pids)],
            _bcc_ready, _nothing),
    }),
    "gc": (lambda: jvm_work("gc", GCS), {
        "sdtrace gc (bpf)": Tracer(
            lambda w: _sdtrace("gc", "--json", "--executor", "bpf", "-p", str(w.pids[0])),
            SDTRACE_READY, _sdtrace_gc),
        "bcc ugc -l java": Tracer(lambda w: ["ugc", "-l", "java", str(w.pids[0])], _bcc_ready,
                             _bcc_lines(r"^\d+\.\d+ +\d+")),
    }),
    "objnew": (lambda: jvm_work("alloc", ALLOCATIONS), {
        "sdtrace objnew (bpf)": Tracer(
            lambda w: _sdtrace("objnew", "--json", "--executor", "bpf", "-p", str(w.pids[0])),
            SDTRACE_READY, _sdtrace_objnew),
        "bcc uobjnew -l java": Tracer(lambda w: ["uobjnew", "-l", "java", str(w.pids[0])],
                                      _bcc_ready, _bcc_lines(r"AllocItem")),
    }),
    "threads": (lambda: jvm_work("threads", THREADS), {
        "sdtrace threads (bpf)": Tracer(
            lambda w: _sdtrace("threads", "--json", "--executor", "bpf", "-p",
                               str(w.pids[0])), SDTRACE_READY, _sdtrace_threads),
        "bcc uthreads -l java": Tracer(lambda w: ["uthreads", "-l", "java", str(w.pids[0])],
                                       _bcc_ready, _bcc_lines(r"sdtrace-worker-")),
    }),
    "calls python": (lambda: python_calls(PYTHON_CALLS_PER_RUN),
                     _calls_rows("python", ("function__entry", "line"))),
    "calls java": (lambda: jvm_work("calls", JAVA_CALLS, "-XX:+DTraceMethodProbes"),
                   _calls_rows("java", ("method__entry",))),
    "flow python": (lambda: python_calls(FLOW_CALLS), {
        "sdtrace flow (bpf)": Tracer(
            lambda w: _sdtrace("flow", "--json", "--executor", "bpf", "--filter",
                               "*calls.py.[fg]", "-p", str(w.pids[0])),
            SDTRACE_READY, _sdtrace_flow),
        "bcc uflow -l python": Tracer(lambda w: ["uflow", "-l", "python", str(w.pids[0])],
                                      _bcc_ready, _bcc_flow),
    }),
    "stat python": (lambda: python_calls(STAT_CALLS, "python"),
                    _stat_rows("python", ("function__entry", "line"))),
    "stat java": (lambda: jvm_work("calls", STAT_CALLS, "-XX:+DTraceMethodProbes"),
                  _stat_rows("java", ("method__entry",))),
}


def traced(workload, tracer):
    """(operations per second, what the tracer counted) of one run under `tracer`."""
    command = tracer.command(workload)
    bcc = command[0] != sys.executable         # bcc's tools print their ready line buffered
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**ENVIRONMENT, **({"PYTHONUNBUFFERED": "1"} if bcc else {})})
    try:
        tracer.ready(process)
    except RuntimeError as error:        # a bcc tool that cannot run here: the finding
        process.kill()
        process.communicate()
        return None, f"cannot run: {_first_error(str(error))}"
    out, err = _reading(process.stdout), _reading(process.stderr)
    try:
        operations, seconds = workload.run()
    finally:
        ended = _interrupt(process)
    if not ended:                               # the finding, and the run's rate stands
        return operations / seconds, f"did not end {ENDING} s after SIGINT: killed"
    return operations / seconds, tracer.counted(out(), err())


def _interrupt(process):
    """SIGINT `process`, again every second while it runs (a bcc tool busy in its perf
    buffer's callback when the first comes, as uflow under load is, swallows it: ctypes
    ignores a callback's KeyboardInterrupt); True if it ended within ENDING seconds, else
    it is killed."""
    for _second in range(ENDING):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=1)
            return True
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait()
    return False


def _reading(stream):
    """Reads `stream` to its end in a thread, as it comes (a tracer that writes more than a
    pipe holds, as flow and uflow do, would otherwise block on it, fall behind and lose
    events); returns a function that waits for the end and returns the text."""
    text = []
    reader = threading.Thread(target=lambda: text.append(stream.read()), daemon=True)
    reader.start()

    def read():
        reader.join()
        return text[0]
    return read


def _first_error(text):
    """The line of a failed tool's output that says why (an error or exception line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower() or "Exception" in line
            or line.startswith("Failed")]
    return (said or lines or ["no output"])[0][:160]


def measure(name):
    """{row: [(operations per second, counted) per round]} of tool `name`."""
    setup, tracers = TOOLS[name]
    runs = {UNTRACED: [], **{row: [] for row in tracers}}
    with setup() as workload:
        workload.run()                                     # warm the caches
        for _round in range(ROUNDS):
            for row in runs:
                if row == UNTRACED:
                    operations, seconds = workload.run()
                    runs[row].append((operations / seconds, None))
                else:
                    runs[row].append(traced(workload, tracers[row]))
    return runs


def main():
    missing = [command for command in ("dbstat-bpfcc", "dbslower-bpfcc", "ugc")
               if not shutil.which(command)]
    if missing or not os.path.exists(POSTGRES):
        sys.exit(f"needs {', '.join(missing) or POSTGRES} (apt-get install bpfcc-tools "
                 "postgresql-15)")
    for name in sys.argv[1:] or TOOLS:
        runs = measure(name)
        print(f"{name}: {ROUNDS} rounds round-robin; operations per second "
              f"(median, x untraced), what the tracer counted per run")
        untraced = statistics.median(rate for rate, _counted in runs[UNTRACED])
        for row, results in runs.items():
            counted = sorted({counted for _rate, counted in results if counted})
            rates = [rate for rate, _counted in results if rate is not None]
            if not rates:
                print(f"  {row:30}{'-':>10} {'-':>6}  " + "; ".join(counted))
                continue
            median = statistics.median(rates)
            print(f"  {row:30}{median:10,.0f} {median / untraced:6.3f}  "
                  + "; ".join(counted))


if __name__ == "__main__":
    main()
