"""The user-space executor: plans computed in this process, batch by batch.

``UserSpaceExecutor`` builds an aggregator per plan, validated against the
session's sites (a key naming an argument must name the same position in
every site it applies to), and each aggregator is fed every batch of
records a Session reads (``Session.batches``).  An in-kernel executor would
compile the same plans to BPF maps and read them back.

The aggregators keep the per-hit path in C where they can: ``Counter.update``
over ``map(itemgetter(...))`` pipelines, and histograms fold per-batch
``Counter``s of distinct values into their distributions.  Latency pairs
records (pairing.py) and folds the durations likewise.
"""
import collections
import operator

from ...engine.events import ARGS, COMM, PID, SITE, TID, TS  # the fields of a record
from ...errors import SdtraceError
from .distribution import Distribution
from .pairing import Pairer, TimeOrder, site_roles
from .plans import (Count, CountResult, Histogram, HistogramResult, Latency, LatencyResult,
                    ordered, row_order)

_RECORD_INDEXES = {"pid": PID, "tid": TID, "comm": COMM, "probe": SITE}


class _KeyReader:
    """Reads a key tuple out of records, resolved against the sites it applies to.

    `batch(records)` maps records to raw key values with C-level iterators
    (one value per record for one key, a tuple for several); `one(record)`
    does the same for one record; `present(raw)` turns a raw value into the
    tuple results show (a site becomes its probe name).
    """

    def __init__(self, keys, sites, role="key"):
        self.keys = keys
        self.argument_indexes = [None if key.field is not None
                                 else _argument_index(key, sites, role) for key in keys]
        self.getters = [(operator.itemgetter(_RECORD_INDEXES[key.field]), None)
                        if index is None else (operator.itemgetter(ARGS), operator.itemgetter(index))
                        for key, index in zip(keys, self.argument_indexes)]
        self.has_site = any(key.field == "probe" for key in keys)

    def batch(self, records):
        columns = []
        for record_getter, argument_getter in self.getters:
            column = map(record_getter, records)
            columns.append(column if argument_getter is None else map(argument_getter, column))
        return columns[0] if len(columns) == 1 else zip(*columns)

    def one(self, record):
        values = []
        for record_getter, argument_getter in self.getters:
            value = record_getter(record)
            values.append(value if argument_getter is None else argument_getter(value))
        return values[0] if len(values) == 1 else tuple(values)

    def present(self, raw):
        values = raw if len(self.getters) > 1 else (raw,)
        if self.has_site:
            values = tuple(value.probe if key.field == "probe" else value
                           for key, value in zip(self.keys, values))
        return tuple(values)


def _argument_index(key, sites, role):
    """The argument position `key` names in every one of `sites`, or SdtraceError."""
    from ...discovery.providers import argument_names

    index = key.argument
    for site in sites:
        if key.argument_name is None:
            if index >= len(site.plans):
                raise SdtraceError(f"{role} {key.text!r}: {site.probe} has only "
                                   f"{len(site.plans)} arguments")
            continue
        names = argument_names(site.provider, site.name, len(site.plans)) or ()
        if key.argument_name not in names:
            raise SdtraceError(f"{role} {key.text!r}: {site.probe} has no argument named "
                               f"{key.argument_name!r}")
        position = names.index(key.argument_name)
        if index is not None and position != index:
            raise SdtraceError(f"{role} {key.text!r} is argument {index} of one probe and "
                               f"argument {position} of {site.probe}: use argN")
        index = position
    return index


class Aggregator:
    """What an executor hands a command: add(records) for every batch, flush()
    once the stream has ended, result() at any time."""

    def add(self, records):
        raise NotImplementedError

    def flush(self):
        """Account for records held back (only latency holds any)."""

    def result(self):
        raise NotImplementedError


class CountAggregator(Aggregator):
    def __init__(self, plan, sites):
        self.plan = plan
        self.reader = _KeyReader(plan.keys, sites)
        self.counts = collections.Counter()

    def add(self, records):
        self.counts.update(self.reader.batch(records))

    def result(self):
        merged = collections.Counter()
        for raw, count in self.counts.items():
            merged[self.reader.present(raw)] += count
        return CountResult(self.plan.keys, ordered(merged.items()))


def _distribution_rows(distributions, reader):
    """Result rows from {raw key: Distribution}, merging raw keys shown alike
    (two sites of one probe), largest count first."""
    merged = {}
    for raw, distribution in distributions.items():
        values = reader.present(raw) if reader else ()
        if values in merged:
            merged[values].merge(distribution)
        else:
            merged[values] = distribution.copy()
    return sorted(merged.items(), key=lambda row: row_order(row[0], row[1].count))


def _add_counts(distributions, raw_key, counts, linear):
    """Fold {value: times} into the Distribution of `raw_key`, made on first use."""
    distribution = distributions.get(raw_key)
    if distribution is None:
        distribution = distributions[raw_key] = Distribution(linear)
    distribution.add_counts(counts)


class HistogramAggregator(Aggregator):
    def __init__(self, plan, sites):
        if plan.value.field is not None:
            raise SdtraceError(f"hist: the value must be an argument, not {plan.value.text!r}")
        self.plan = plan
        self.value = _KeyReader((plan.value,), sites, role="value")
        [index] = self.value.argument_indexes
        for site in sites:
            if index in site.string_arguments:
                raise SdtraceError(f"hist: argument {index} of {site.probe} is a string, "
                                   "not a number")
        self.reader = _KeyReader(plan.keys, sites) if plan.keys else None
        self.distributions = {}
        self.missing = 0

    def add(self, records):
        values = self.value.batch(records)
        if self.reader is None:
            self._fold((), collections.Counter(values))
            return
        grouped = collections.defaultdict(collections.Counter)
        for (raw_key, value), times in collections.Counter(
                zip(self.reader.batch(records), values)).items():
            grouped[raw_key][value] = times
        for raw_key, counts in grouped.items():
            self._fold(raw_key, counts)

    def _fold(self, raw_key, counts):
        self.missing += counts.pop(None, 0)
        if any(type(value) is not int for value in counts):     # floats: truncated
            integers = collections.Counter()
            for value, times in counts.items():
                integers[int(value)] += times
            counts = integers
        if counts:
            _add_counts(self.distributions, raw_key, counts, self.plan.linear)

    def result(self):
        return HistogramResult(self.plan.keys, _distribution_rows(self.distributions, self.reader),
                               self.missing)


class LatencyAggregator(Aggregator):
    def __init__(self, plan, sites, on_pair=None):
        self.plan = plan
        self.roles = site_roles(plan.start, plan.end, sites)
        starts = [site for site, (_span, is_start) in self.roles.items() if is_start]
        self.match = _KeyReader(plan.match, list(self.roles), role="match key") \
            if plan.match else None
        self.reader = _KeyReader(plan.keys, starts) if plan.keys else None
        self.pairer = Pairer(self.roles, self.match and self.match.one)
        self.order = TimeOrder()
        self.on_pair = on_pair
        self.distributions = {}
        self.pairs = 0

    def add(self, records):
        self._pair(self.order.add(records))

    def flush(self):
        """Pair what TimeOrder still holds."""
        self._pair(self.order.flush())

    def _pair(self, records):
        pairs = self.pairer.add(records)
        if not pairs:
            return
        self.pairs += len(pairs)
        reader, on_pair = self.reader, self.on_pair
        batch = collections.defaultdict(collections.Counter)
        for start, end in pairs:
            batch[reader.one(start) if reader else ()][end[TS] - start[TS]] += 1
            if on_pair is not None:
                on_pair(start, end, self.label(start))
        for raw_key, counts in batch.items():
            _add_counts(self.distributions, raw_key, counts, self.plan.linear)

    def label(self, start):
        """What names a pair: its match key values, or the START's probe."""
        if self.match is None:
            return start[SITE].probe
        return " ".join(str(value) for value in self.match.present(self.match.one(start)))

    def result(self):
        """The durations so far; records TimeOrder still holds count once flush() ran."""
        return LatencyResult(self.plan.keys, _distribution_rows(self.distributions, self.reader),
                             self.pairs, self.pairer.unmatched_ends, self.pairer.open_starts,
                             self.pairer.skipped_starts)


class UserSpaceExecutor:
    """Computes plans in this process, from the records of a started Session."""

    def __init__(self, session):
        self.session = session

    def aggregator(self, plan, on_pair=None):
        """An aggregator for `plan`: add(records), result(), and flush() for latency."""
        sites = self.session.sites
        if isinstance(plan, Count):
            return CountAggregator(plan, sites)
        if isinstance(plan, Histogram):
            return HistogramAggregator(plan, sites)
        if isinstance(plan, Latency):
            return LatencyAggregator(plan, sites, on_pair)
        raise TypeError(f"not an aggregation plan: {plan!r}")
