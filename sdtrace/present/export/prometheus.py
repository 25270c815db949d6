"""``--prometheus [HOST:]PORT``: the latest snapshot at /metrics while the session runs.

A prometheus_client registry of one collector, ``SnapshotCollector``, turns
the snapshot the main loop last published (export/__init__.py) into metric
families at every scrape:

* a count: a counter ``NAME_total``, a sample per key set, labelled by the
  ``--by`` keys;
* a histogram or latency: a histogram, ``NAME_bucket`` per ``le`` (the exact
  inclusive upper bound of each bucket, cumulative, then ``+Inf``),
  ``NAME_sum`` and ``NAME_count``;
* always ``sdtrace_events_lost_total`` and ``sdtrace_map_full_total`` (0
  before the first snapshot).

prometheus_client escapes label values (backslash, double quote, newline)
and serves from its own daemon thread; close() shuts the server down and
closes its socket.
"""
from ...errors import SdtraceError
from . import LOSSES, require


class SnapshotCollector:
    """A prometheus_client collector of the latest export.Snapshot (`snapshot`, set by
    the main loop; read once per scrape, so a scrape never mixes two)."""

    def __init__(self, metrics_core):
        self.core = metrics_core
        self.snapshot = None

    def collect(self):
        core, snapshot = self.core, self.snapshot
        for name, field, text in LOSSES:
            yield core.CounterMetricFamily(name, text, value=getattr(snapshot, field, 0))
        if snapshot is None:
            return
        labels = list(snapshot.labels)
        if not snapshot.is_histogram:
            family = core.CounterMetricFamily(snapshot.name, snapshot.help, labels=labels)
            for values, count in snapshot.series:
                family.add_metric(values, count)
        else:
            family = core.HistogramMetricFamily(snapshot.name, snapshot.help, labels=labels)
            for values, histogram in snapshot.series:
                cumulative, buckets = 0, []
                for bound, count in histogram.buckets:
                    cumulative += count
                    buckets.append(("+Inf" if bound is None else str(bound), cumulative))
                family.add_metric(values, buckets, histogram.total)
        yield family


class PrometheusEndpoint:
    """/metrics on HOST:PORT, served from a thread of prometheus_client's."""

    def __init__(self, host, port):
        client = require("prometheus_client", "prometheus", "--prometheus")
        core = require("prometheus_client.core", "prometheus", "--prometheus")
        self.collector = SnapshotCollector(core)
        registry = client.CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self.server, self.thread = client.start_http_server(port, addr=host,
                                                                registry=registry)
        except OSError as error:
            raise SdtraceError(f"--prometheus {host}:{port}: {error.strerror or error}") from None
        self.on_pair = None

    def publish(self, snapshot):
        self.collector.snapshot = snapshot

    def close(self):
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()
            self.thread.join()
