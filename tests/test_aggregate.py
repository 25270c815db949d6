"""`sdtrace count`, `hist` and `latency` on real processes.

The expected values come from the traced programs: the `workload` fixture
prints how often it fired each kind, the power-of-two distribution of the
sizes it passed and the nanoseconds it measured around each start/end pair
(tests/fixtures/workload.c); a Python script's call counts are in its text.
The bucket arithmetic of the expectations is the test's own (bit lengths),
never sdtrace's.
"""
import collections
import itertools
import json
import os
import re
import signal
import subprocess

import pytest
from helpers import SYSTEM_PYTHON as PYTHON
from helpers import Target, at_once, one_line_error, sdtrace, sdtrace_command, summary_counts

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("executor")]

CALLS = """
def tick(x):
    return x + 1
def tock(x):
    return tick(x) * 2
for i in range(7):
    tock(i)
for i in range(4):
    tick(i)
"""


def json_rows(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def fixture_lines(stdout, word):
    """The fixture's truth lines "WORD ...", split into fields."""
    return [line.split()[1:] for line in stdout.splitlines() if line.startswith(word + " ")]


def bucket_low(nanoseconds):
    """Lower bound of the power-of-two bucket of a positive duration."""
    return 1 << (nanoseconds.bit_length() - 1)


# -- count -----------------------------------------------------------------------------

def test_count_per_argument_keys_equals_the_fixtures_hits(fixtures):
    result = sdtrace("count", "--json", "-c", fixtures.path("workload"), "--by", "arg0,arg2",
                     "workload:request(,,str)", stdin="request 1000\n")
    assert result.returncode == 0, result.stderr
    truth = {(int(kind), name): int(hits) for kind, name, hits in
             fixture_lines(result.stdout, "kind")}
    assert sum(truth.values()) == 1000
    rows = json_rows(result.stdout)
    assert {(row["arg0"], row["arg2"]): row["count"] for row in rows} == truth
    assert [row["count"] for row in rows] == sorted(truth.values(), reverse=True)
    assert summary_counts(result.stderr) == (1000, 0)
    top = sdtrace("count", "--top", "1", "-c", fixtures.path("workload"), "--by", "arg2",
                  "workload:request(,,str)", stdin="request 1000\n")
    header, *lines = [line for line in top.stdout.splitlines()
                      if line.lstrip().startswith(("COUNT", "334", "333"))]
    assert header.split() == ["COUNT", "ARG2"] and [line.split() for line in lines] == \
        [["334", "alpha"]]


def test_count_per_probe_pid_tid_comm_in_an_aligned_table(fixtures):
    with Target(fixtures.path("workload")) as target:
        counter = subprocess.Popen(
            sdtrace_command("count", "-p", str(target.pid), "--by",
             "probe,pid,tid,comm", "workload:*"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "sdtrace: tracing" in counter.stderr.readline()
            target.send("request 10")
            workers = {tid for tid, _ns in fixture_lines("\n".join(target.send("threads 2")),
                                                         "pair")}
        finally:
            counter.send_signal(signal.SIGINT)
            out, err = counter.communicate(timeout=60)
    assert counter.returncode == 0, err
    header, *lines = out.splitlines()
    assert header.split() == ["COUNT", "PROBE", "PID", "TID", "COMM"]
    rows = {tuple(line.split()[1:]): int(line.split()[0]) for line in lines}
    pid = str(target.pid)
    expected = {("workload:request", pid, pid, "workload"): 10}
    for tid in workers:
        for probe in ("workload:start", "workload:end"):
            expected[(probe, pid, tid, "workload")] = 2
    assert rows == expected
    # right-aligned counts, and every key column starts where its header does
    assert all(line[:len("COUNT")].strip().isdigit() for line in lines)
    column = header.index("PROBE")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)


def test_count_intervals(fixtures):
    with Target(fixtures.path("workload")) as target:
        # -d bounds the waits below: at worst the count ends, and readline() with it
        counter = subprocess.Popen(
            sdtrace_command("count", "--json", "--interval", "0.25", "-d", "60", "-p",
             str(target.pid), "--by", "arg0", "workload:request"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        streamed = []

        def read_intervals_until(total):
            """Reads the count's output until its interval rows account for `total` events."""
            while sum(row["count"] for row in json_rows("".join(streamed))
                      if "interval" in row) < total:
                line = counter.stdout.readline()
                assert line, "the count ended before its intervals reported the requests"
                streamed.append(line)
        try:
            assert "sdtrace: tracing" in counter.stderr.readline()
            target.send("request 30")
            read_intervals_until(30)      # the first burst is reported before the second starts
            target.send("request 60")
            read_intervals_until(90)
        finally:
            counter.send_signal(signal.SIGTERM)
            rest, err = counter.communicate(timeout=60)
    assert counter.returncode == 0, err
    out = "".join(streamed) + rest
    rows = json_rows(out)
    intervals = collections.defaultdict(collections.Counter)
    for row in rows:
        if "interval" in row:
            intervals[row["interval"]][row["arg0"]] += row["count"]
    # the intervals' counts add up to the totals, and no interval mixes the two bursts
    # (the second starts once the first is reported): a run of intervals holds the first
    assert sum(intervals.values(), collections.Counter()) == {0: 30, 1: 30, 2: 30}
    running_totals = itertools.accumulate(sum(intervals[moment].values())
                                          for moment in sorted(intervals))
    assert 30 in running_totals and len(intervals) >= 2
    final = [row for row in rows if "interval" not in row]
    assert [(row["arg0"], row["count"]) for row in final] == [(0, 30), (1, 30), (2, 30)]
    assert summary_counts(err) == (90, 0)


def test_count_returns_the_commands_exit_status(fixtures):
    result = sdtrace("count", "-c", f"sh -c '{fixtures.path('workload')} && exit 7'",
                     f"{fixtures.path('workload')}:workload:request", stdin="request 5\n")
    assert result.returncode == 7, result.stderr
    assert result.stdout.splitlines()[-2:] == ["COUNT  PROBE", "    5  workload:request"]


# -- hist ------------------------------------------------------------------------------

def test_hist_buckets_equal_the_fixtures_distribution(fixtures):
    result = sdtrace("hist", "--json", "-c", fixtures.path("workload"), "--arg", "1",
                     "workload:request", stdin="request 1000\n")
    assert result.returncode == 0, result.stderr
    truth = {int(low): int(hits) for low, hits in fixture_lines(result.stdout, "bucket")}
    [row] = json_rows(result.stdout)
    assert {bucket["low"]: bucket["count"] for bucket in row["buckets"]} == truth
    assert all(bucket["high"] == max(1, 2 * bucket["low"]) for bucket in row["buckets"])
    assert (row["count"], row["min"], row["max"], row["mean"]) == (1000, 0, 999, 499.5)
    sizes = sorted(range(1000))      # the fixture's sizes: i for i in 0..N-1
    for percent in (50, 90, 99):
        exact = sizes[-(-len(sizes) * percent // 100) - 1]
        assert abs(row[f"p{percent}"] - exact) <= exact / 32, (percent, row)


def test_hist_text_draws_bars_like_bpftrace(fixtures):
    result = sdtrace("hist", "-c", fixtures.path("workload"), "--arg", "size",
                     "workload:request", stdin="request 100\n")
    one_line_error(result, "size", "no argument named")
    result = sdtrace("hist", "-c", fixtures.path("workload"), "--arg", "1",
                     "workload:request", stdin="request 100\n")
    assert result.returncode == 0, result.stderr
    truth = {int(low): int(hits) for low, hits in fixture_lines(result.stdout, "bucket")}
    bars = re.findall(r"^(\[[0-9KMG, ]+[\])]) +(\d+) \|(@*) *\|$", result.stdout, re.M)
    assert [label for label, _count, _bar in bars] == \
        ["[0]", "[1]", "[2, 4)", "[4, 8)", "[8, 16)", "[16, 32)", "[32, 64)", "[64, 128)"]
    assert [int(count) for _label, count, _bar in bars] == [truth[low] for low in sorted(truth)]
    largest = max(truth.values())
    assert [len(bar) for _label, _count, bar in bars] == \
        [truth[low] * 52 // largest for low in sorted(truth)]
    assert re.search(r"^count 100, min 0, max 99, mean 49.5, p50 \d+, p90 \d+, p99 \d+$",
                     result.stdout, re.M)


def test_hist_linear_buckets_per_key(fixtures):
    result = sdtrace("hist", "--json", "-c", fixtures.path("workload"), "--arg", "1", "--by",
                     "arg2", "--linear", "0,500,100", "workload:request(,,str)",
                     stdin="request 1000\n")
    assert result.returncode == 0, result.stderr
    names = {int(kind): name for kind, name, _hits in fixture_lines(result.stdout, "kind")}
    for row in json_rows(result.stdout):
        kind = next(kind for kind, name in names.items() if name == row["arg2"])
        sizes = [size for size in range(1000) if size % 3 == kind]
        expected = collections.Counter(min(size // 100, 5) for size in sizes)
        assert [(bucket["low"], bucket["high"], bucket["count"]) for bucket in row["buckets"]] == \
            [(slot * 100, None if slot == 5 else slot * 100 + 100, expected[slot])
             for slot in range(6)]
        assert row["count"] == len(sizes)


# -- latency ---------------------------------------------------------------------------

def latency_buckets(row):
    return {bucket["low"]: bucket["count"] for bucket in row["buckets"] if bucket["count"]}


def test_latency_of_known_sleeps_lands_in_their_buckets(fixtures):
    sleeps = [1300, 1300, 1300, 5000, 5000, 20000]
    result = sdtrace("latency", "--json", "-c", fixtures.path("workload"), "workload:start",
                     "workload:end", stdin="".join(f"sleep {us}\n" for us in sleeps))
    assert result.returncode == 0, result.stderr
    measured = [int(ns) for _tid, ns in fixture_lines(result.stdout, "pair")]
    assert len(measured) == len(sleeps)
    *rows, summary = json_rows(result.stdout)
    [row] = rows
    assert latency_buckets(row) == collections.Counter(bucket_low(ns) for ns in measured)
    assert row["count"] == len(sleeps)
    assert row["min"] >= min(sleeps) * 1000 and row["max"] <= max(measured)
    assert summary == {"pairs": 6, "unmatched_ends": 0, "open_starts": 0, "skipped_starts": 0}


def test_latency_nests_per_thread(fixtures):
    # Durations far from bucket edges (inner ~1.5 ms, outer ~4.5 ms, workers 2.3 and 9 ms):
    # the program's clock and the tracer's timestamps differ by the probes' overhead.
    result = sdtrace("latency", "--json", "--by", "tid", "-c", fixtures.path("workload"),
                     "workload:start", "workload:end", stdin="nest 1500\nthreads 3\n")
    assert result.returncode == 0, result.stderr
    measured = collections.defaultdict(collections.Counter)
    for tid, ns in fixture_lines(result.stdout, "pair"):
        measured[int(tid)][bucket_low(int(ns))] += 1
    *rows, summary = json_rows(result.stdout)
    assert {row["tid"]: latency_buckets(row) for row in rows} == measured
    assert len(measured) == 3          # the main thread's nest, and two workers
    assert summary == {"pairs": 8, "unmatched_ends": 0, "open_starts": 0, "skipped_starts": 0}


@pytest.mark.parametrize("match, expected", [
    # skip: start(1) start(2) end(1); unmatched: end(9), start(9)
    ("arg0", {"pairs": 1, "unmatched_ends": 1, "open_starts": 1, "skipped_starts": 1}),
    # LIFO alone: end(1) closes start(2), end(9) closes start(1)
    (None, {"pairs": 2, "unmatched_ends": 0, "open_starts": 1, "skipped_starts": 0}),
])
def test_latency_reports_what_does_not_pair(fixtures, executor, match, expected):
    """Records are paired on one stack per thread, an END skipping the STARTs above its
    match; the kernel keeps a stack per thread and match value, so start(2) stays open."""
    if match and executor == "bpf":
        expected = {**expected, "open_starts": 2, "skipped_starts": 0}
    result = sdtrace("latency", "--json", *(["--match", match] if match else []), "-c",
                     fixtures.path("workload"), "workload:start", "workload:end",
                     stdin="skip\nunmatched\n")
    assert result.returncode == 0, result.stderr
    assert json_rows(result.stdout)[-1] == expected
    text = sdtrace("latency", *(["--match", match] if match else []), "-c",
                   fixtures.path("workload"), "workload:start", "workload:end",
                   stdin="skip\nunmatched\n")
    assert (f"{expected['pairs']} pairs, {expected['unmatched_ends']} unmatched ENDs, "
            f"{expected['open_starts']} STARTs still open") in text.stdout


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="Debian's python3.11 is not installed")
def test_python_function_latency_per_name(tmp_path):
    """CPython 3.11 fires function__entry for every frame only while python:line is armed."""
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    result = sdtrace("latency", "--json", "--buffer-pages", "4096", "--string-size", "256",
                     "-c", f"{PYTHON} {script}",
                     "--match", "filename,funcname", "--by", "filename,funcname",
                     "--arm", "python:line", "python:function__entry", "python:function__return")
    assert result.returncode == 0, result.stderr
    *rows, summary = json_rows(result.stdout)
    calls = {row["funcname"]: row["count"] for row in rows if row["filename"] == str(script)}
    assert calls == {"<module>": 1, "tick": 7 + 4, "tock": 7}
    assert summary["unmatched_ends"] == 0 and summary["skipped_starts"] == 0
    assert summary_counts(result.stderr)[1] == 0
    counted = sdtrace("count", "--json", "-c", f"{PYTHON} {script}", "--by", "probe,funcname",
                      "python:function__entry", "python:line")
    assert counted.returncode == 0, counted.stderr
    entries = {row["funcname"]: row["count"] for row in json_rows(counted.stdout)
               if row["probe"] == "python:function__entry"}
    assert entries["tick"] == 11 and entries["tock"] == 7


# -- errors ----------------------------------------------------------------------------

def test_bad_keys_and_specs_are_one_line_errors(fixtures):
    workload = fixtures.path("workload")
    one_line_error(sdtrace("count", "-c", workload, "--by", "arg5", "workload:request"),
                   "arg5", "workload:request", "3 arguments")
    one_line_error(sdtrace("count", "-c", workload, "--by", "arg0,no-such", "workload:request"),
                   "no-such")
    one_line_error(sdtrace("hist", "-c", workload, "--arg", "2", "workload:request(,,str)"),
                   "argument 2", "string")
    one_line_error(sdtrace("hist", "-c", workload, "--arg", "1", "--linear", "5,1,1",
                           "workload:request"), "--linear")
    one_line_error(sdtrace("latency", "-c", workload, "workload:start", "workload:*"),
                   "matches both")
    one_line_error(sdtrace("latency", "-c", workload, "workload:start",   # with no target
                           f"{workload}:workload:nothing"), "no probe matches")  # it would wait
    one_line_error(sdtrace("count", "--top", "0", "-c", workload, "workload:request"), "--top")


# -- counting in the kernel --------------------------------------------------------------

PRODUCERS, HITS_EACH = 4, 1_000_000


def aggregate_in_background(command, *args):
    """`sdtrace COMMAND --json ARGS` running, armed (its "tracing" line read)."""
    process = subprocess.Popen(sdtrace_command(command, "--json", *args),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    assert "sdtrace: tracing" in line, line + process.stderr.read()
    return process


@pytest.mark.parametrize("command", ["count", "hist"])
def test_a_flood_from_four_processes_is_counted_exactly(fixtures, executor, command):
    """4 processes x 1,000,000 hits on 2 cores, counted (or their arg0 distributed) per pid,
    system-wide: the BPF executor counts in the kernel and is exact; over records
    (tracefs) the ring loses hits, and says so."""
    flood = fixtures.path("flood")
    targets = [Target(flood, timeout=300) for _ in range(PRODUCERS)]
    try:
        for target in targets:
            target.start()
        tracer = aggregate_in_background(command, *(["--arg", "0"] if command == "hist" else []),
                                         "--by", "pid", f"{flood}:flood:hit")
        replies = {pid: int(lines[0].split()[1])        # "fired K"
                   for pid, lines in at_once(targets, f"fire {HITS_EACH}").items()}
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
    finally:
        for target in targets:
            target.stop()
    assert replies == {target.pid: HITS_EACH for target in targets}
    rows = {row["pid"]: row for row in json_rows(out)}
    counts = {pid: row["count"] for pid, row in rows.items()}
    received, lost = summary_counts(err)
    if executor == "bpf":
        assert counts == replies and (received, lost) == (PRODUCERS * HITS_EACH, 0), err
        if command == "hist":     # arg0 runs 0..N-1 in each
            assert all((row["min"], row["max"], row["mean"]) == (0, HITS_EACH - 1,
                                                                (HITS_EACH - 1) / 2)
                       for row in rows.values())
    else:
        assert received + lost == PRODUCERS * HITS_EACH and sum(counts.values()) == received
        assert not lost or "the results are low" in err


def test_keys_beyond_max_keys_are_counted_as_not_counted(fixtures, executor):
    """--max-keys 10 and 100 distinct arg0 values: 0..9 have their slots, the other 90 keys
    meet a hash of 10: 10 are counted, 80 hits are reported as not counted."""
    result = sdtrace("count", "--json", "--max-keys", "10", "--by", "arg0", "-c",
                     fixtures.path("flood"), "flood:hit", stdin="fire 100\n")
    assert result.returncode == 0, result.stderr
    counts = {row["arg0"]: row["count"] for row in json_rows(result.stdout)}
    received, lost = summary_counts(result.stderr)
    assert all(count == 1 for count in counts.values()) and received + lost == 100
    if executor == "bpf":
        assert (received, lost) == (20, 80) and set(range(10)) <= set(counts)
        assert "80 hits not counted: the map of keys is full (raise --max-keys)" in result.stderr
    else:
        assert (received, lost) == (100, 0) and set(counts) == set(range(100))



def test_a_key_hit_on_a_second_cpu_keeps_its_extremes(fixtures):
    """A key's statistics are per CPU: the slot of the second CPU to hit a key starts at
    zeros, and takes its first value as its minimum and maximum (values:signed's arg0 is
    -128: a maximum compared with a zero slot would be 0)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    with Target(fixtures.path("values")) as target:
        os.sched_setaffinity(target.pid, {first})
        tracer = aggregate_in_background("hist", "--arg", "0", "-p", str(target.pid),
                                         "values:signed")
        target.send("fire 1")
        os.sched_setaffinity(target.pid, {second})
        target.send("fire 1")
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=60)
    [row] = json_rows(out)
    assert (row["count"], row["min"], row["max"]) == (2, -128, -128), err


@pytest.mark.parametrize("executor", ["bpf"], indirect=True)     # both are run here
@pytest.mark.parametrize("probe, argument", [("values:signed", index) for index in range(4)]
                         + [("values:unsigned", 3), ("values:ints", 6)])
def test_kernel_histograms_equal_the_user_space_ones(fixtures, probe, argument):
    """The programs' log-linear and linear buckets and statistics, of negative values and
    values of every width, are what the user-space executor computes from records."""
    rows = {}
    for executor in ("bpf", "tracefs"):
        result = sdtrace("hist", "--json", "--executor", executor, "--arg", str(argument),
                         "--by", "probe", "-c", fixtures.path("values"), probe,
                         stdin="fire 3\n")
        assert result.returncode == 0, result.stderr
        rows[executor] = json_rows(result.stdout)
        assert summary_counts(result.stderr) == (3, 0)
    assert rows["bpf"] == rows["tracefs"] and rows["bpf"][0]["count"] == 3
    linear = {}
    for executor in ("bpf", "tracefs"):
        result = sdtrace("hist", "--json", "--executor", executor, "--arg", str(argument),
                         "--linear=-40000,40000,1000", "-c", fixtures.path("values"), probe,
                         stdin="fire 2\n")
        assert result.returncode == 0, result.stderr
        linear[executor] = json_rows(result.stdout)
    assert linear["bpf"] == linear["tracefs"]
