"""``--otlp ENDPOINT``: snapshots as OTLP metrics, latency pairs as spans, over OTLP/HTTP.

ENDPOINT is a collector's base URL (``http://HOST:4318``) or ``[HOST:]PORT``
(http, 127.0.0.1 by default); requests go to its ``/v1/metrics`` and
``/v1/traces`` as protobuf, by the OpenTelemetry SDK's OTLP/HTTP exporters
(the ``sdtrace[otlp]`` extra).

* Metrics: every snapshot the main loop publishes (export/__init__.py) is
  pushed from a thread of ours, the newest one only if the endpoint is slow:
  a count as a cumulative monotonic sum per key set, a histogram or latency
  as a cumulative explicit-bucket histogram (bounds: the buckets' exact
  inclusive upper bounds), attributes the ``--by`` keys; and the sums
  ``sdtrace_events_lost`` and ``sdtrace_map_full``.  Their start time is the
  session's.
* Spans (latency): a pair is a span named by the pair's label (what names
  it on the Perfetto timeline: the match key values, or the START's probe),
  from the START's time to the END's -- CLOCK_MONOTONIC, made wall time by
  one offset taken when the session starts -- with the attributes ``pid``,
  ``tid``, ``comm``, ``probe`` and the arguments of both hits by name
  (``start.NAME``, ``end.NAME``; providers.py's names, else argN).  The
  SDK's batch processor sends them; a span it has no room for is dropped
  with its warning.

The SDK's complaints (an unreachable endpoint) become ``sdtrace: warning:
otlp: ...`` lines, without tracebacks.
"""
import functools
import logging
import sys
import threading

from ...engine.events import ARGS, COMM, PID, SITE, TID, TS
from . import LOSSES, host_port, require

TIMEOUT = 5.0                 # seconds an export may take, retries included
SPAN_QUEUE = 65536            # spans waiting for the batch processor's thread
INT64 = 1 << 63


def base_url(endpoint):
    """The base URL of ``--otlp ENDPOINT``."""
    if "://" in endpoint:
        return endpoint.rstrip("/")
    host, port = host_port(endpoint, "--otlp")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _OneLine(logging.Formatter):
    def format(self, record):
        lines = record.getMessage().strip().splitlines() or ["?"]
        return f"sdtrace: warning: otlp: {lines[0]}"


def _quiet_sdk():
    """The SDK's log records as one-line warnings on stderr, never a traceback."""
    logger = logging.getLogger("opentelemetry")
    if not any(isinstance(handler.formatter, _OneLine) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.WARNING)


@functools.lru_cache(maxsize=None)
def _argument_names(site, count):
    from ...discovery.providers import argument_names

    return argument_names(site.provider, site.name, count) or \
        tuple(f"arg{index}" for index in range(count))


def _attribute(value):
    """An OTLP attribute value: ints beyond int64 (u64 arguments) as text."""
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return str(value)
    return str(value) if isinstance(value, str) else value


def span_attributes(start, end):
    """The attributes of the span of a START and END record."""
    attributes = {"pid": start[PID], "tid": start[TID], "comm": start[COMM] or "",
                  "probe": start[SITE].probe}
    for role, record in (("start", start), ("end", end)):
        arguments = record[ARGS]
        for name, value in zip(_argument_names(record[SITE], len(arguments)), arguments):
            if value is not None:
                attributes[f"{role}.{name}"] = _attribute(value)
    return attributes


class OtlpExporter:
    """Pushes snapshots as metrics (a thread of ours) and pairs as spans (the SDK's)."""

    def __init__(self, endpoint, wall_offset):
        require("opentelemetry.sdk", "otlp", "--otlp")
        require("opentelemetry.exporter.otlp.proto.http", "otlp", "--otlp")
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from ... import __version__

        _quiet_sdk()
        url = base_url(endpoint)
        self.wall_offset = wall_offset
        self.resource = Resource.create({"service.name": "sdtrace"})
        self.metrics = OTLPMetricExporter(endpoint=f"{url}/v1/metrics", timeout=TIMEOUT)
        self.provider = TracerProvider(resource=self.resource)
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=TIMEOUT),
            max_queue_size=SPAN_QUEUE))
        self.tracer = self.provider.get_tracer("sdtrace", __version__)
        self.version = __version__
        self.latest = self.sent = None
        self.closing = False
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._push, name="sdtrace-otlp", daemon=True)
        self.thread.start()

    def on_pair(self, start, end, label):
        span = self.tracer.start_span(label, start_time=start[TS] + self.wall_offset,
                                      attributes=span_attributes(start, end))
        span.end(end_time=end[TS] + self.wall_offset)

    def publish(self, snapshot):
        with self.wake:
            self.latest = snapshot
            self.wake.notify()

    def _push(self):
        while True:
            with self.wake:
                while self.latest is self.sent and not self.closing:
                    self.wake.wait()
                snapshot, closing = self.latest, self.closing
            if snapshot is not self.sent:
                self.metrics.export(self._metrics_data(snapshot))
                self.sent = snapshot
            elif closing:
                return

    def _metrics_data(self, snapshot):
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram,
                                                      HistogramDataPoint, Metric, MetricsData,
                                                      NumberDataPoint, ResourceMetrics,
                                                      ScopeMetrics, Sum)
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        cumulative = AggregationTemporality.CUMULATIVE
        times = {"start_time_unix_nano": snapshot.started_ns, "time_unix_nano": snapshot.time_ns}

        def total(name, description, unit, points):
            return Metric(name=name, description=description, unit=unit,
                          data=Sum(data_points=[NumberDataPoint(attributes=attributes, value=value,
                                                                **times)
                                                for attributes, value in points],
                                   aggregation_temporality=cumulative, is_monotonic=True))
        series = [(dict(zip(snapshot.labels, values)), value) for values, value in snapshot.series]
        if snapshot.is_histogram:
            main = Metric(name=snapshot.name, description=snapshot.help, unit=snapshot.unit or "1",
                          data=Histogram(data_points=[HistogramDataPoint(
                              attributes=attributes, count=histogram.count, sum=histogram.total,
                              bucket_counts=[count for _bound, count in histogram.buckets],
                              explicit_bounds=[bound for bound, _count in histogram.buckets[:-1]],
                              min=histogram.minimum, max=histogram.maximum, **times)
                              for attributes, histogram in series],
                              aggregation_temporality=cumulative))
        else:
            main = total(snapshot.name, snapshot.help, "1", series)
        metrics = [main] if series else []        # a metric without points is invalid
        metrics += [total(name, text, "1", [({}, getattr(snapshot, field))])
                    for name, field, text in LOSSES]
        scope = InstrumentationScope("sdtrace", self.version)
        return MetricsData(resource_metrics=[ResourceMetrics(
            resource=self.resource, schema_url="",
            scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics, schema_url="")])])

    def close(self):
        """Send the last snapshot and every span; wait for both (at most TIMEOUT each)."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()
        self.metrics.shutdown()
        self.provider.shutdown()
