"""Exports of `count`, `hist` and `latency` while they run: Prometheus and OTLP.

The main loop owns the aggregator, whose result() is not for another thread
to call.  So every interval (count's ``--interval``, else ``INTERVAL``) and
once at the end, the loop *publishes* a ``Snapshot``: plain, immutable data
-- the metric's name and label names, one series per key set, the session's
loss counters -- and the exporters' threads read the latest one:

* prometheus.py serves it at ``/metrics`` (``--prometheus [HOST:]PORT``):
  a count is a counter, a histogram or latency a Prometheus histogram;
* otlp.py pushes it to an OTLP/HTTP endpoint as OTLP metrics, and each
  latency pair as a span (``--otlp ENDPOINT``).

A series is a key set of ``--by`` (its values as strings, an unreadable one
``""``); at most ``--max-keys`` of them are exported, the first seen, so that
a key of many values (a query's text, a pid) cannot blow up a scrape: the
hits of the key sets beyond count in ``sdtrace_map_full_total``, as the hits
the kernel's full map could not count do.  Buckets are the results' own
(power-of-two or ``--linear``, distribution.py): ``[low, high)`` of integers
is ``<= high - 1``, an exact upper bound (Prometheus's ``le``, OTLP's
explicit bounds) whatever the values.

Both exporters are optional extras (``sdtrace[prometheus]``,
``sdtrace[otlp]``); without them the flag is a one-line error saying what to
install.  Everything listens on, and defaults to, 127.0.0.1.
"""
import re
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from ...errors import SdtraceError
from ..aggregate import Count, Histogram, Latency, site_roles

INTERVAL = 1.0                 # seconds between snapshots, without count's --interval
LOOPBACK = "127.0.0.1"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")       # Prometheus's metric names
_NOT_IN_NAME = re.compile(r"[^a-zA-Z0-9_]")
# (metric name without _total, Snapshot field, description) of the loss counters
LOSSES = (("sdtrace_events_lost", "events_lost",
           "probe hits lost: the ring buffers had no room (the summary's lost)"),
          ("sdtrace_map_full", "map_full",
           "probe hits not counted per key: the set of keys was full (--max-keys)"))


def require(module, extra, option):
    """Import `module` of an optional extra, or SdtraceError saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SdtraceError(f"{option} needs the {extra} extra: pip install "
                           f"'sdtrace[{extra}]'") from None


def host_port(text, option):
    """(host, port) of ``[HOST:]PORT`` (``[::1]:PORT`` too); the host defaults to 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise SdtraceError(f"{option} {text!r}: expected [HOST:]PORT")
    return host, int(port)


def name_part(text):
    """`text` with every character a metric or label name cannot have as '_'."""
    return _NOT_IN_NAME.sub("_", text)


@dataclass(frozen=True)
class HistogramSeries:
    """One series of a histogram: ``buckets`` of (inclusive upper bound, count),
    ascending, the last bound None (+Inf); and the exact count and sum."""
    buckets: Tuple[Tuple[Optional[int], int], ...]
    count: int
    total: int
    minimum: Optional[int]
    maximum: Optional[int]


def histogram_series(distribution):
    """The HistogramSeries of a distribution.Distribution: its buckets with exact upper bounds."""
    buckets = [(None if bucket.high is None else bucket.high - 1, bucket.count)
               for bucket in distribution.buckets()]
    if not buckets or buckets[-1][0] is not None:
        buckets.append((None, 0))
    return HistogramSeries(tuple(buckets), distribution.count, distribution.total,
                      distribution.minimum, distribution.maximum)


@dataclass(frozen=True)
class Snapshot:
    """What the exporters show: ``series`` of (label values, count or HistogramSeries)."""
    name: str                  # without a counter's _total
    help: str
    unit: str                  # "" for a count or an argument's values, "ns" for latencies
    is_histogram: bool
    labels: Tuple[str, ...]
    series: tuple
    events_lost: int           # hits the rings had no room for
    map_full: int              # hits no key could be counted for (--max-keys)
    started_ns: int            # wall time of the session's start, and of this snapshot
    time_ns: int


def metric_name(plan, sites):
    """``sdtrace_PROBE`` (a counter: Prometheus adds _total), ``sdtrace_PROBE_ARG`` (hist),
    ``sdtrace_SPAN_latency_nanoseconds``; PROBE is the one probe traced, else the one
    provider, else ``probes``."""
    from ..perfetto import span_name

    if isinstance(plan, Latency):
        starts = [site for site, (_span, is_start) in site_roles(plan.start, plan.end, sites)
                  .items() if is_start]
        return f"sdtrace_{_common(starts, span_name)}_latency_nanoseconds"
    base = f"sdtrace_{_common(sites, lambda site: site.probe)}"
    return f"{base}_{name_part(plan.value.text)}" if isinstance(plan, Histogram) else base


def _common(sites, name):
    names = {name(site) for site in sites}
    providers = {site.provider for site in sites}
    return name_part(names.pop() if len(names) == 1 else
                     providers.pop() if len(providers) == 1 else "probes")


class Exports:
    """The exporters of one command: hooks for runner.aggregate, and the snapshots."""

    def __init__(self, plan, metric=None, max_keys=None):
        from ..aggregate import DEFAULT_MAX_KEYS

        if metric is not None and not _NAME.match(metric):
            raise SdtraceError(f"--metric {metric!r}: a metric name is letters, digits, "
                               "'_' and ':', not starting with a digit")
        self.plan = plan
        self.metric = metric
        self.max_keys = max_keys or DEFAULT_MAX_KEYS
        self.exporters = []
        self.session = self.aggregator = None
        self.admitted = set()      # the key sets exported, at most max_keys
        # CLOCK_MONOTONIC (the records' and time.monotonic_ns's clock) to wall time, once
        self.wall_offset = time.time_ns() - time.monotonic_ns()
        self.started_ns = time.time_ns()
        self.name = None

    def hooks(self, interval, on_interval, on_pair):
        """runner.aggregate's (interval, on_interval, on_pair), with the exports in them."""
        def tick(aggregator, elapsed):
            self.publish(aggregator.result())
            if on_interval is not None:
                on_interval(aggregator, elapsed)
        pair_hooks = [hook for hook in [on_pair, *(exporter.on_pair for exporter
                                                    in self.exporters)] if hook is not None]
        if pair_hooks and isinstance(self.plan, Latency):
            def both(start, end, label):
                for hook in pair_hooks:
                    hook(start, end, label)
            on_pair = pair_hooks[0] if len(pair_hooks) == 1 else both
        return interval or INTERVAL, tick, on_pair

    def attach(self, session, aggregator):
        """The session (its sites name the metric, its losses are counted) and its
        aggregator, whose final result close() publishes."""
        self.session, self.aggregator = session, aggregator

    def publish(self, result):
        """Hand the exporters a snapshot of `result` (a result of the command's plan)."""
        snapshot = self.snapshot(result)
        for exporter in self.exporters:
            exporter.publish(snapshot)

    def snapshot(self, result):
        """The Snapshot of `result`, and of the session's losses now."""
        session = self.session
        if self.name is None:
            self.name = self.metric or metric_name(self.plan, session.sites)
        series, overflow = [], 0
        for values, value in result.rows:
            labels = tuple("" if item is None else str(item) for item in values)
            if labels not in self.admitted:
                if len(self.admitted) >= self.max_keys:
                    overflow += value if isinstance(self.plan, Count) else value.count
                    continue
                self.admitted.add(labels)
            series.append((labels, value if isinstance(self.plan, Count)
                           else histogram_series(value)))
        in_kernel = session.counting_in_kernel
        return Snapshot(
            self.name, _help(self.plan), "ns" if isinstance(self.plan, Latency) else "",
            not isinstance(self.plan, Count), tuple(name_part(key.text) for key in result.keys),
            tuple(series), 0 if in_kernel else session.lost,
            overflow + (session.lost if in_kernel else 0), self.started_ns, time.time_ns())

    def close(self, final=True):
        """Publish the final result (`final`: the session ended well), then stop
        every exporter; once."""
        exporters, self.exporters = self.exporters, []
        try:
            if final and exporters and self.aggregator is not None:
                snapshot = self.snapshot(self.aggregator.result())
                for exporter in exporters:
                    exporter.publish(snapshot)
        finally:
            for exporter in exporters:
                exporter.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_exc_info):
        self.close(final=exc_type is None)


def _help(plan):
    if isinstance(plan, Count):
        return "probe hits counted by sdtrace count"
    if isinstance(plan, Histogram):
        return f"the values of argument {plan.value.text}, by sdtrace hist"
    return "nanoseconds from START to END, by sdtrace latency"


def open_exports(args, plan):
    """The Exports that `args` ask for (--prometheus, --otlp), started, as a context
    manager; without either, one that gives None."""
    import contextlib

    prometheus, otlp = getattr(args, "prometheus", None), getattr(args, "otlp", None)
    if prometheus is None and otlp is None:
        if getattr(args, "metric", None) is not None:
            raise SdtraceError("--metric names an exported metric: add --prometheus or --otlp")
        return contextlib.nullcontext()
    exports = Exports(plan, args.metric, getattr(args, "max_keys", None))
    try:
        if prometheus is not None:
            from .prometheus import PrometheusEndpoint

            exports.exporters.append(PrometheusEndpoint(*host_port(prometheus, "--prometheus")))
        if otlp is not None:
            from .otlp import OtlpExporter

            exports.exporters.append(OtlpExporter(otlp, exports.wall_offset))
    except BaseException:
        exports.close(final=False)
        raise
    return exports
