"""The in-kernel executor: Count, Histogram and Latency plans compiled into the probe programs.

``tally_for(plan)`` is what a Session needs before it arms: a function of
the selected sites that gives the engine's bpf.tally.Tally of the plan (its
keys resolved against the sites as the user-space executor resolves them),
or None for a plan the kernel does not compute (latencies keyed by what
only the START knows, its probe or arguments not matched, and every plan
with a timeline, go through records).  A histogram comes back as the same Distribution the user-space
executor builds: the programs count the same log-linear (and linear)
buckets and keep the exact count, sum, minimum and maximum.  Once armed, ``KernelExecutor(session).aggregator(plan)``
reads the session's maps whenever a result is asked for, so ``--interval``
and the end both read the kernel's counts; the records' path is never taken.
A session that did not count in the kernel (the tracefs executor) gets the
user-space executor's aggregator instead: the commands do not change.
"""
from collections import namedtuple

from .distribution import Distribution
from .pairing import site_roles
from .plans import Count, CountResult, Histogram, HistogramResult, Latency, LatencyResult, ordered
from .userspace import (Aggregator, UserSpaceExecutor, _argument_index, _distribution_rows,
                        _KeyReader)

DEFAULT_MAX_KEYS = 1 << 16
_FIELDS = {"probe": "site", "pid": "pid", "tid": "tid", "comm": "comm"}
THREAD_KEYS = ("pid", "tid", "comm")      # a latency's keys the END knows as the START did
# what _argument_index reads of a site, for the notes.Site of a session not yet armed
_Signature = namedtuple("_Signature", "probe provider name plans")
# what site_roles reads of one
_Role = namedtuple("_Role", "probe provider name")


def tally_for(plan, max_keys=DEFAULT_MAX_KEYS):
    """sites (notes.Site) -> the Tally of `plan`, or None where the kernel does not count
    it: latencies, and histograms of a value that is not an integer argument of every
    site (the user-space executor then says what is wrong, or truncates floats)."""
    if not isinstance(plan, (Count, Histogram, Latency)):
        return None
    if isinstance(plan, Latency) and any(key.field not in THREAD_KEYS and key not in plan.match
                                         for key in plan.keys):
        return None       # the START's own keys (its probe, arguments not matched) need records

    def tally(sites):
        from ...engine.bpf.tally import Tally

        signatures = [_Signature(site.qualified_name, site.provider, site.name, site.operands)
                      for site in sites]
        def resolved(keys, role):
            return tuple(_FIELDS[key.field] if key.field is not None
                         else _argument_index(key, signatures, role) for key in keys)
        keys = resolved(plan.keys, "key")
        if isinstance(plan, Count):
            return Tally(keys, max_keys)
        linear = plan.linear and (plan.linear.minimum, plan.linear.maximum, plan.linear.step)
        if isinstance(plan, Latency):
            named = [_Role(site.qualified_name, site.provider, site.name) for site in sites]
            roles = site_roles(plan.start, plan.end, named)
            starts = frozenset(site_id for site_id, site in enumerate(named)
                               if roles.get(site, (0, None))[1] is True)
            ends = frozenset(site_id for site_id, site in enumerate(named)
                             if roles.get(site, (0, None))[1] is False)
            match = resolved(plan.match, "match key")
            if "site" in match:
                return None                     # START and END are different probes
            return Tally(keys, max_keys, linear=linear, spans=(starts, ends), match=match)
        if plan.value.field is not None:
            return None
        value = _argument_index(plan.value, signatures, "value")
        if any(site.operands[value].is_float or _read_as_string(site, value)
               for site in sites):
            return None
        return Tally(keys, max_keys, value, linear)
    return tally


def _read_as_string(site, index):
    """Whether the BPF executor reads argument `index` of `site` as a string without a
    type in the spec (a provider documents it so)."""
    from ...discovery.providers import STRING
    from ...engine import fetchargs
    from ...engine.bpf import codegen

    types = fetchargs.argument_types(site, (), codegen.plan_argument)
    return index < len(types) and types[index] == STRING


class KernelCountAggregator(Aggregator):
    """The counts of a session that counts in the kernel."""

    def __init__(self, plan, session):
        self.plan, self.session = plan, session
        self.reader = _KeyReader(plan.keys, session.sites)

    def add(self, records):
        """Nothing comes through records: the kernel counted."""

    def result(self):
        merged = {}
        for raw, count in self.session.tally_counts().items():
            values = self.reader.present(raw)
            merged[values] = merged.get(values, 0) + count
        return CountResult(self.plan.keys, ordered(merged.items()))


class KernelHistogramAggregator(Aggregator):
    """The distributions of a session that counts them in the kernel."""

    def __init__(self, plan, session):
        self.plan, self.session = plan, session
        self.reader = _KeyReader(plan.keys, session.sites) if plan.keys else None

    def add(self, records):
        """Nothing comes through records: the kernel counted."""

    def result(self):
        distributions = {}
        for raw, histogram in self.session.tally_counts().items():
            distribution = distributions[raw] = Distribution(self.plan.linear)
            distribution.fine.update(histogram.fine)
            distribution.linear_counts.update(histogram.linear)
            distribution.count, distribution.total = histogram.count, histogram.total
            distribution.minimum, distribution.maximum = histogram.minimum, histogram.maximum
        return HistogramResult(self.plan.keys, _distribution_rows(distributions, self.reader),
                               self.session.tally_missing())


class KernelLatencyAggregator(KernelHistogramAggregator):
    """The durations of a session that pairs START and END in the kernel."""

    def result(self):
        histograms = super().result()
        spans = self.session.tally_spans()
        return LatencyResult(self.plan.keys, histograms.rows,
                             sum(distribution.count for _values, distribution in histograms.rows),
                             spans["unmatched"], spans["open"],
                             spans["too_deep"] + spans["no_stack"])


class KernelExecutor:
    """Aggregators of a started session: the kernel's where it counts, else user space's."""

    def __init__(self, session):
        self.session = session

    def aggregator(self, plan, on_pair=None):
        if self.session.counting_in_kernel:
            if isinstance(plan, Count):
                return KernelCountAggregator(plan, self.session)
            if isinstance(plan, Latency):
                return KernelLatencyAggregator(plan, self.session)
            return KernelHistogramAggregator(plan, self.session)
        return UserSpaceExecutor(self.session).aggregator(plan, on_pair)
