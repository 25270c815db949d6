"""`--prometheus` and `--otlp` of count, hist and latency, against real receivers.

Prometheus: Debian's prometheus server (.ci/run installs it), started here on
127.0.0.1 with a temporary config and storage that scrapes sdtrace every
second; its HTTP query API must return what the traced fixture printed as
its truth (tests/fixtures/workload.c), at a scrape that began after the
fixture's work was done plus one publication interval.  OTLP: an OTLP/HTTP
receiver in a thread of this process, decoding each request with
opentelemetry-proto; sdtrace's last request (sent before it exits) must
carry the fixture's counts and buckets, and its spans the pairs the fixture
made.  Every server listens on 127.0.0.1 and is stopped by its fixture.
"""
import collections
import gzip
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
from helpers import (REPOSITORY, SYSTEM_PYTHON, Target, end_process, one_line_error,
                     postgres_server, psql, sdtrace, sdtrace_command, summary_counts, wait_for)

LOOPBACK = "127.0.0.1"
PUBLISHED = 2.0      # seconds after which a scrape holds what happened before (1 s snapshots)


def free_port():
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def truth(lines, word):
    """The fixture's truth lines "WORD ...", split into fields."""
    return [line.split()[1:] for line in lines if line.startswith(word + " ")]


# -- a real Prometheus --------------------------------------------------------------

class Prometheus:
    """Debian's prometheus on 127.0.0.1, scraping sdtrace at 127.0.0.1:`target_port`
    every second; query() is its HTTP query API."""

    def __init__(self, directory, target_port):
        self.target_port = target_port
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({   # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "sdtrace",
                                "static_configs": [{"targets": [f"{LOOPBACK}:{target_port}"]}]}]}))
        self.log = open(directory / "prometheus.log", "w+")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address={LOOPBACK}:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: self.process.poll() is not None or self._ready(), 60) \
                or self.process.poll() is not None:
            self.stop()
            raise AssertionError(f"prometheus did not start: {self.output()}")

    def _ready(self):
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def query(self, promql, at=None):
        """The result of an instant query (at wall time `at`): [{"metric", "value"}...]."""
        parameters = {"query": promql, **({} if at is None else {"time": repr(at)})}
        url = f"http://{LOOPBACK}:{self.port}/api/v1/query?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scrape_after(self, moment, timeout=30):
        """The time of the first scrape of sdtrace that began after `moment` (wall seconds)."""
        scraped = []

        def scrape_seen():
            # the loss counters are in every scrape, from the first on
            scraped[:] = [float(sample["value"][1]) for sample
                          in self.query("timestamp(sdtrace_events_lost_total)")]
            return scraped and scraped[0] >= moment
        if wait_for(scrape_seen, timeout):
            return scraped[0]
        raise AssertionError(f"no scrape of sdtrace after {moment}: targets "
                             f"{self.query('up')}; {self.output()}")

    def values(self, selector, at):
        """{label values other than job and instance: number} of `selector` at `at`."""
        return {tuple(sorted((name, value) for name, value in sample["metric"].items()
                             if name not in ("job", "instance", "__name__"))):
                float(sample["value"][1]) for sample in self.query(selector, at)}

    def stop(self):
        end_process(self.process, signal.SIGTERM, 30)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (bash .ci/run installs it)")
    server = Prometheus(tmp_path, free_port())
    try:
        yield server
    finally:
        server.stop()


class Exporting:
    """`sdtrace ARGS` running in the background, armed (its "tracing" line read)."""

    def __init__(self, *args):
        self.process = subprocess.Popen(sdtrace_command(*args), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        if "sdtrace: tracing" not in line:
            self.stop()
            raise AssertionError(line + self.stderr)

    def stop(self):
        """SIGINT; (stdout, stderr) once it ended."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.stdout, self.stderr = self.process.communicate(timeout=60)
        return self.stdout, self.stderr


def listening(port):
    with socket.socket() as client:
        return client.connect_ex((LOOPBACK, port)) == 0


def exported(prometheus, work, *args):
    """Runs sdtrace ARGS --prometheus on the port `prometheus` scrapes while `work()` runs
    (its result is returned); the time of a scrape after it, sdtrace's (stdout, stderr)."""
    tracer = Exporting(*args, "--prometheus", str(prometheus.target_port))
    try:
        result = work()
        moment = prometheus.scrape_after(time.time() + PUBLISHED)
    finally:
        out, err = tracer.stop()
    assert tracer.process.returncode == 0, err
    assert not listening(prometheus.target_port)       # the endpoint ends with the session
    return result, moment, out, err


def kernel(test):
    """A test that traces: root, a guarded kernel, and once per executor."""
    return pytest.mark.kernel(pytest.mark.usefixtures("executor")(test))


@kernel
def test_prometheus_counts_per_key_equal_the_fixtures_hits(fixtures, prometheus):
    with Target(fixtures.path("workload")) as target:
        reply, moment, out, err = exported(
            prometheus, lambda: target.send("request 1000"),
            "count", "--json", "-p", str(target.pid), "--by", "arg2", "workload:request(,,str)")
    hits = {(("arg2", name),): float(count) for _kind, name, count in truth(reply, "kind")}
    assert sum(hits.values()) == 1000
    assert prometheus.values("sdtrace_workload_request_total", moment) == hits
    assert prometheus.values("sdtrace_events_lost_total", moment) == {(): 0.0}
    assert prometheus.values("sdtrace_map_full_total", moment) == {(): 0.0}
    assert summary_counts(err) == (1000, 0)


@kernel
def test_prometheus_histogram_buckets_equal_the_fixtures_distribution(fixtures, prometheus):
    with Target(fixtures.path("workload")) as target:
        reply, moment, out, err = exported(
            prometheus, lambda: target.send("request 1000"),
            "hist", "-p", str(target.pid), "--arg", "1", "--metric", "request_size",
            "workload:request")
    # "bucket LOW HITS": sizes in [LOW, 2 LOW), i.e. <= 2 LOW - 1; cumulative as le counts
    buckets, running = {}, 0
    for low, hits in sorted((int(low), int(hits)) for low, hits in truth(reply, "bucket")):
        running += hits
        buckets[(("le", str(max(0, 2 * low - 1))),)] = float(running)
    buckets[(("le", "+Inf"),)] = 1000.0
    assert prometheus.values("request_size_bucket", moment) == buckets
    assert prometheus.values("request_size_count", moment) == {(): 1000.0}
    assert prometheus.values("request_size_sum", moment) == {(): float(sum(range(1000)))}


@kernel
def test_prometheus_latency_buckets_hold_the_fixtures_pairs(fixtures, prometheus):
    sleeps = [1300, 1300, 5000, 20000]       # microseconds, far from power-of-two edges
    with Target(fixtures.path("workload")) as target:
        pairs, moment, out, err = exported(
            prometheus, lambda: [int(ns) for sleep in sleeps
                                 for _tid, ns in truth(target.send(f"sleep {sleep}"), "pair")],
            "latency", "-p", str(target.pid), "workload:start", "workload:end")
    assert len(pairs) == len(sleeps)
    lows = collections.Counter(1 << (ns.bit_length() - 1) for ns in pairs)
    buckets = prometheus.values("sdtrace_workload_latency_nanoseconds_bucket", moment)
    running = 0
    for low in sorted(lows):
        running += lows[low]
        assert buckets[(("le", str(2 * low - 1)),)] == running, (low, buckets)
    assert buckets[(("le", "+Inf"),)] == len(sleeps)
    [total] = prometheus.values("sdtrace_workload_latency_nanoseconds_sum", moment).values()
    assert sum(sleeps) * 1000 <= total <= sum(pairs)


@kernel
def test_prometheus_key_sets_are_bounded_by_max_keys(fixtures, prometheus, executor):
    """100 distinct arg0 values, --max-keys 10: 10 key sets are exported, and the other
    hits are counted as map full, while the session runs: those the kernel's map had
    no room for (bpf: the summary's lost) and those of key sets beyond the 10."""
    with Target(fixtures.path("flood")) as target:
        _reply, moment, out, err = exported(
            prometheus, lambda: target.send("fire 100"),
            "count", "--json", "--max-keys", "10", "-p", str(target.pid), "--by", "arg0",
            "flood:hit")
    series = prometheus.values("sdtrace_flood_hit_total", moment)
    printed = {row["arg0"]: row["count"] for row in map(json.loads, out.splitlines())}
    assert len(series) == 10 and set(series.values()) == {1.0}
    assert {int(dict(labels)["arg0"]) for labels in series} <= set(printed)
    assert prometheus.values("sdtrace_map_full_total", moment) == {(): 90.0}
    assert prometheus.values("sdtrace_events_lost_total", moment) == {(): 0.0}
    received, lost = summary_counts(err)
    assert (received, lost) == ((20, 80) if executor == "bpf" else (100, 0))
    assert sum(printed.values()) == received


@kernel
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
def test_prometheus_label_values_keep_quotes_backslashes_and_newlines(tmp_path, prometheus):
    """A Python script whose file name has a double quote, a backslash and a newline:
    Prometheus stores the label value sdtrace exported as exactly that name."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("Debian's python3.11 is not installed (bash .ci/run installs it)")
    script = tmp_path / 'a "quoted\\ name\nhere.py'
    script.write_text("import sys\n"
                      "def tick(x):\n    return x + 1\n"
                      "def tock(x):\n    return tick(x) * 2\n"
                      "sys.stdin.readline()\n"
                      "for i in range(7):\n    tock(i)\n"
                      "print('done', flush=True)\n"
                      "sys.stdin.readline()\n")
    python = subprocess.Popen([SYSTEM_PYTHON, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        def work():
            python.stdin.write("go\n")
            python.stdin.flush()
            assert python.stdout.readline() == "done\n"
        _nothing, moment, out, err = exported(
            prometheus, work, "count", "--string-size", "256", "-p", str(python.pid),
            "--by", "probe,filename,funcname", "python:function__entry", "python:line")
    finally:
        python.stdin.close()
        python.wait(timeout=30)
    entries = {dict(labels)["funcname"]: count for labels, count in prometheus.values(
        'sdtrace_python_total{probe="python:function__entry"}', moment).items()
        if dict(labels)["filename"] == str(script)}
    assert entries == {"tick": 7.0, "tock": 7.0}


def readme_fleet_example():
    """(the sdtrace command, the PromQL query) of the README's Fleet section."""
    with open(os.path.join(REPOSITORY, "README.md")) as readme:
        text = readme.read().split("### Fleet", 1)[1].split("\n### ", 1)[0]
    command = re.search(r"^    (sdtrace count .*\\\n.*)$", text, re.M)[1]
    query = re.search(r"^    (sum by .*)$", text, re.M)[1]
    return shlex.split(command.replace("\\\n", " ")), query


@kernel
# tracefs: -p follows the postmaster's later children (the backends) there; the bpf
# executor's -p does not yet follow children forked after the session started
@pytest.mark.parametrize("executor", ["tracefs"], indirect=True)
def test_the_readmes_fleet_example_counts_postgresql_queries(prometheus):
    """The README's command (on one server: -p) and PromQL query, on a throw-away
    PostgreSQL 15: the counter is the number of queries psql sent, and the query gives a
    rate per host and comm."""
    command, query = readme_fleet_example()
    assert command[:2] == ["sdtrace", "count"] and ":9464" in command
    command = [str(prometheus.target_port) if word == ":9464" else word
               for word in command[1:]]
    counters, answers = [], []
    with postgres_server() as (socket_dir, postmaster):
        # -p: this server's backends (its children) only, not another PostgreSQL's
        tracer = Exporting(*command[:1], "-p", str(postmaster), *command[1:])
        try:
            for burst in range(2):      # two bursts, two scrapes: a rate above 0
                answers += [psql(socket_dir, f"SELECT '{burst}-{number}'").stdout.strip()
                            for number in range(10)]
                moment = prometheus.scrape_after(time.time() + PUBLISHED)
                counters.append(prometheus.values("sdtrace_postgresql_query__start_total",
                                                  moment))
        finally:
            _out, err = tracer.stop()
    assert answers == [f"{burst}-{number}" for burst in range(2) for number in range(10)]
    assert counters == [{(("comm", "postgres"),): 10.0}, {(("comm", "postgres"),): 20.0}]
    [rate] = prometheus.query(query, moment)
    assert rate["metric"] == {"instance": f"{LOOPBACK}:{prometheus.target_port}",
                              "comm": "postgres"}
    assert float(rate["value"][1]) > 0


# -- errors, without a session --------------------------------------------------------

def without(module, *args):
    """`sdtrace ARGS` in an interpreter where `module` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None; from sdtrace.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)


def test_an_exporter_without_its_extra_says_what_to_install():
    one_line_error(without("prometheus_client", "count", "--prometheus", "9464", "x:y"),
                   "--prometheus", "pip install 'sdtrace[prometheus]'")
    one_line_error(without("opentelemetry.sdk", "hist", "--arg", "0", "--otlp", "4318", "x:y"),
                   "--otlp", "pip install 'sdtrace[otlp]'")


def test_bad_export_options_are_one_line_errors():
    one_line_error(sdtrace("count", "--prometheus", "127.0.0.1:http", "x:y"), "[HOST:]PORT")
    one_line_error(sdtrace("count", "--otlp", "localhost:99999", "x:y"), "[HOST:]PORT")
    one_line_error(sdtrace("count", "--prometheus", "9464", "--metric", "9lives", "x:y"),
                   "--metric", "9lives")
    one_line_error(sdtrace("count", "--metric", "hits", "x:y"), "--metric", "--prometheus")
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(sdtrace("latency", "--prometheus", str(port), "x:a", "x:b"),
                       f"--prometheus 127.0.0.1:{port}", "in use")


# -- a real OTLP/HTTP receiver ----------------------------------------------------------

class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1: decodes /v1/metrics and /v1/traces requests
    (protobuf, gzip or not) with opentelemetry-proto into `metrics` and `traces`."""

    def __init__(self):
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        kinds = {"/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest,
                                 metrics_service_pb2.ExportMetricsServiceResponse, []),
                 "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest,
                                trace_service_pb2.ExportTraceServiceResponse, [])}
        self.metrics, self.traces = kinds["/v1/metrics"][2], kinds["/v1/traces"][2]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request, response, received = kinds[self.path]
                assert self.headers["Content-Type"] == "application/x-protobuf"
                received.append(request.FromString(body))
                answer = response().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.endpoint = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def last_metrics(self):
        """{metric name: Metric} of the last metrics request (sdtrace's final one)."""
        [resource] = self.metrics[-1].resource_metrics
        [scope] = resource.scope_metrics
        return {metric.name: metric for metric in scope.metrics}

    def spans(self):
        return [span for request in self.traces for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]


@pytest.fixture
def receiver():
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


def attributes(item):
    """{key: value} of an OTLP attribute list."""
    return {attribute.key: getattr(attribute.value, attribute.value.WhichOneof("value"))
            for attribute in item.attributes}


@kernel
def test_otlp_metrics_carry_the_fixtures_counts(fixtures, receiver):
    result = sdtrace("count", "--otlp", receiver.endpoint, "-c", fixtures.path("workload"),
                     "--by", "arg0,arg2", "workload:request(,,str)", stdin="request 1000\n")
    assert result.returncode == 0, result.stderr
    hits = {(int(kind), name): int(count) for kind, name, count
            in truth(result.stdout.splitlines(), "kind")}
    metrics = receiver.last_metrics()
    counted = metrics["sdtrace_workload_request"].sum
    assert counted.is_monotonic and counted.aggregation_temporality == 2     # cumulative
    assert {(int(attributes(point)["arg0"]), attributes(point)["arg2"]): point.as_int
            for point in counted.data_points} == hits
    assert [point.as_int for point in metrics["sdtrace_events_lost"].sum.data_points] == [0]
    assert [point.as_int for point in metrics["sdtrace_map_full"].sum.data_points] == [0]


@kernel
def test_otlp_histogram_equals_the_fixtures_distribution(fixtures, receiver):
    result = sdtrace("hist", "--otlp", receiver.endpoint, "-c", fixtures.path("workload"),
                     "--arg", "1", "workload:request", stdin="request 1000\n")
    assert result.returncode == 0, result.stderr
    buckets = sorted((int(low), int(hits)) for low, hits
                     in truth(result.stdout.splitlines(), "bucket"))
    [point] = receiver.last_metrics()["sdtrace_workload_request_arg1"].histogram.data_points
    assert list(point.explicit_bounds) == [max(0, 2 * low - 1) for low, _hits in buckets]
    assert list(point.bucket_counts) == [hits for _low, hits in buckets] + [0]
    assert (point.count, point.sum, point.min, point.max) == (1000, sum(range(1000)), 0, 999)


@kernel
def test_otlp_spans_are_the_pairs_in_wall_time(fixtures, receiver):
    sleeps = [1300, 5000, 20000]
    with Target(fixtures.path("workload")) as target:
        tracer = Exporting("latency", "--otlp", receiver.endpoint, "--match", "arg0",
                           "-p", str(target.pid), "workload:start", "workload:end")
        try:
            pairs = []
            for sleep in sleeps:     # (wall time before, the fixture's tid and ns, after)
                before = time.time_ns()
                [(tid, ns)] = truth(target.send(f"sleep {sleep}"), "pair")
                pairs.append((before, int(tid), int(ns), time.time_ns()))
        finally:
            out, err = tracer.stop()
    assert tracer.process.returncode == 0, err
    spans = sorted(receiver.spans(), key=lambda span: span.start_time_unix_nano)
    assert [span.name for span in spans] == [str(sleep) for sleep in sleeps]   # the match key
    durations = []
    for span, sleep, (before, tid, ns, after) in zip(spans, sleeps, pairs):
        duration = span.end_time_unix_nano - span.start_time_unix_nano
        assert sleep * 1000 <= duration <= ns
        assert before - 5_000_000 <= span.start_time_unix_nano < span.end_time_unix_nano \
            <= after + 5_000_000     # the clock offset is taken once: a few ms at most
        assert attributes(span) == {"pid": target.pid, "tid": tid, "comm": "workload",
                                    "probe": "workload:start", "start.arg0": sleep,
                                    "end.arg0": sleep}
        durations.append(duration)
    [point] = receiver.last_metrics()["sdtrace_workload_latency_nanoseconds"] \
        .histogram.data_points
    assert (point.count, point.sum) == (len(sleeps), sum(durations))


@kernel
@pytest.mark.parametrize("executor", ["bpf"], indirect=True)
def test_an_unreachable_collector_is_a_warning_line(fixtures):
    result = sdtrace("count", "--otlp", str(free_port()), "-c", fixtures.path("workload"),
                     "workload:request", stdin="request 10\n")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "otlp" in line]
    assert warnings and all(line.startswith("sdtrace: warning: otlp: ") for line in warnings)
    assert "Traceback" not in result.stderr and summary_counts(result.stderr) == (10, 0)


@pytest.mark.kernel
@pytest.mark.parametrize("executor", ["tracefs"], indirect=True)
def test_prometheus_shows_the_hits_the_rings_had_no_room_for(fixtures, prometheus, executor):
    """One ring page per CPU and a flood of 200,000 hits: hits are lost, and the scrape
    says so (tracefs: every hit is a record; on bpf a count has no records to lose)."""
    with Target(fixtures.path("flood")) as target:
        _reply, moment, out, err = exported(
            prometheus, lambda: target.send("fire 200000"),
            "count", "--buffer-pages", "1", "-p", str(target.pid), "flood:hit")
    received, lost = summary_counts(err)
    [scraped] = prometheus.values("sdtrace_events_lost_total", moment).values()
    assert 0 < scraped <= lost
    [counted] = prometheus.values("sdtrace_flood_hit_total", moment).values()
    assert counted <= received and received + lost == 200000
