"""Aggregations of probe hits: counts, histograms, latencies.

The layer has three parts, so that where the work happens can change
without the commands changing:

* **plans** say what to compute, in terms of probes and keys only:
  ``Count(keys)``, ``Histogram(value, keys, linear)`` and
  ``Latency(start, end, match, keys)``.  A key is ``probe``, ``pid``, ``tid``,
  ``comm``, ``argN`` (or just ``N``) or an argument's documented name
  (providers.py);
* **executors** compute plans.  ``UserSpaceExecutor`` is the one here: it
  builds an aggregator per plan, validated against the session's sites, and
  is fed every batch of records a Session reads (``Session.batches``).  An in-kernel
  executor would compile the same plans to BPF maps and read them back;
* **results** are plain data (``CountResult``, ``Distribution``,
  ``LatencyResult``) that report.py renders, whoever computed them.

The user-space aggregators keep the per-hit path in C where they can:
``Counter.update`` over ``map(itemgetter(...))`` pipelines, and histograms
fold per-batch ``Counter``s of distinct values into their buckets.

Histograms keep, per key, the count, sum, minimum and maximum exactly, and
the values in log-linear buckets: exact below 16, then 16 buckets per power
of two.  Percentiles come from those buckets (the bucket's middle, clamped
to the observed range), so they are within 1/32 of the true value -- and
memory stays bounded however long the run.  Power-of-two display buckets are
sums of them; ``--linear`` buckets are counted separately.

Latency pairs a START record with the next END record of the same thread
(LIFO: a stack per thread, so nested spans pair innermost first).  With
match keys, an END pairs with the innermost open START whose keys are equal;
the STARTs above it never got their END and are counted as skipped.  An END
with no open START is counted as unmatched, STARTs still open at the end as
open.  Pairing needs time order across CPUs, which one drain of the rings
does not give (perf.py): ``TimeOrder`` holds back the newest records of each
batch until later drains can no longer deliver anything older.
"""
import bisect
import collections
import operator
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..engine.events import ARGS, COMM, PID, SITE, TID, TS  # the fields of a record
from ..errors import SdtraceError

_RECORD_FIELDS = {"pid": PID, "tid": TID, "comm": COMM, "probe": SITE}


# -- plans ------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One grouping key: a record field (probe, pid, tid, comm) or an argument,
    by position (``argument`` = N for ``argN``) or by documented name."""
    text: str
    field: Optional[str] = None        # "probe", "pid", "tid", "comm"; None for arguments
    argument: Optional[int] = None     # N of argN
    argument_name: Optional[str] = None


def parse_key(text):
    """A Key from its text; a bare number N is argN."""
    text = text.strip()
    if text in _RECORD_FIELDS:
        return Key(text, field=text)
    if text.isdecimal():
        return Key(f"arg{text}", argument=int(text))
    if text.startswith("arg") and text[3:].isdecimal():
        return Key(text, argument=int(text[3:]))
    if text.isidentifier():
        return Key(text, argument_name=text)
    raise SdtraceError(f"bad key {text!r}: expected probe, pid, tid, comm, argN, N or an "
                       "argument name")


def parse_keys(text):
    """Keys from ``"probe,arg0"``; an empty key (an empty text, too) is an error."""
    return tuple(parse_key(word) for word in text.split(","))


@dataclass(frozen=True)
class Linear:
    """Linear buckets [minimum, minimum + step), ... up to maximum."""
    minimum: int
    maximum: int
    step: int


def parse_linear(text):
    try:
        minimum, maximum, step = (int(word) for word in text.split(","))
    except ValueError:
        raise SdtraceError(f"--linear {text!r}: expected MIN,MAX,STEP (integers)") from None
    if step <= 0 or maximum <= minimum:
        raise SdtraceError(f"--linear {text!r}: needs MIN < MAX and STEP > 0")
    return Linear(minimum, maximum, step)


@dataclass(frozen=True)
class Count:
    """Hits per key."""
    keys: Tuple[Key, ...]


@dataclass(frozen=True)
class Histogram:
    """The distribution of a numeric argument, per key."""
    value: Key
    keys: Tuple[Key, ...] = ()
    linear: Optional[Linear] = None


@dataclass(frozen=True)
class Latency:
    """Time from a START probe to the matching END probe, per key of the START.

    `start` and `end` are specs.ProbeSpec selectors; `match` keys must be
    equal in START and END for them to pair.
    """
    start: object
    end: object
    match: Tuple[Key, ...] = ()
    keys: Tuple[Key, ...] = ()
    linear: Optional[Linear] = None


# -- results ------------------------------------------------------------------------

def _sortable(value):
    """Sort keys of mixed types: numbers, then strings, then None."""
    if value is None:
        return (2, 0)
    if isinstance(value, str):
        return (1, value)
    return (0, value)


@dataclass
class CountResult:
    """Counts per key tuple, largest first."""
    keys: Tuple[Key, ...]
    rows: List[Tuple[tuple, int]]

    def minus(self, earlier):
        """The counts since `earlier` (a previous result of the same aggregation)."""
        before = dict(earlier.rows)
        rows = [(values, count - before.get(values, 0)) for values, count in self.rows]
        return CountResult(self.keys, _ordered([row for row in rows if row[1]]))


def _row_order(values, size):
    """The sort key of a result row: the largest size first, then by key values."""
    return -size, tuple(map(_sortable, values))


def _ordered(rows):
    """(values, count) rows, largest count first."""
    return sorted(rows, key=lambda row: _row_order(row[0], row[1]))


SUB_BUCKET_BITS = 4
SUB_BUCKETS = 1 << SUB_BUCKET_BITS     # per power of two; values below this are exact


def fine_bucket(value):
    """The log-linear bucket index of an integer (negative values mirror positive ones)."""
    if value < 0:
        return -1 - fine_bucket(-value)
    if value < SUB_BUCKETS:
        return value
    exponent = value.bit_length() - 1
    shift = exponent - SUB_BUCKET_BITS
    return SUB_BUCKETS * (shift + 1) + (value >> shift) - SUB_BUCKETS


def fine_bucket_range(index):
    """(lowest, highest) integer of a log-linear bucket."""
    if index < 0:
        low, high = fine_bucket_range(-1 - index)
        return -high, -low
    if index < SUB_BUCKETS:
        return index, index
    shift, sub_bucket = divmod(index - SUB_BUCKETS, SUB_BUCKETS)
    low = (SUB_BUCKETS + sub_bucket) << shift
    return low, low + (1 << shift) - 1


def power_of_two_bucket(value):
    """bpftrace's hist() bucket: -1 for negatives, 0 for 0, else bit length (1 -> [1], 2 -> [2, 4))."""
    return -1 if value < 0 else value.bit_length()


@dataclass(frozen=True)
class Bucket:
    low: Optional[int]       # None: unbounded below
    high: Optional[int]      # exclusive; None: unbounded above
    count: int


class Distribution:
    """Exact count, sum, min and max of integers, with log-linear (and optionally
    linear) bucket counts; mergeable, and what a histogram result is."""

    def __init__(self, linear=None):
        self.linear = linear
        # linear bucket indexes: -1 below MIN, 0 .. slots - 1 from MIN, slots from MAX on
        self._linear_slots = (None if linear is None
                              else -(-(linear.maximum - linear.minimum) // linear.step))
        self.count = 0
        self.total = 0
        self.minimum = None
        self.maximum = None
        self.fine = collections.Counter()
        self.linear_counts = collections.Counter()   # bucket index; -1 below, n above

    def add_counts(self, value_counts):
        """Fold in {value: times}."""
        fine = self.fine
        linear = self.linear
        for value, times in value_counts.items():
            fine[fine_bucket(value)] += times
            self.total += value * times
            if linear is not None:
                if value < linear.minimum:
                    self.linear_counts[-1] += times
                else:
                    self.linear_counts[min((value - linear.minimum) // linear.step,
                                           self._linear_slots)] += times
        self.count += sum(value_counts.values())
        low, high = min(value_counts), max(value_counts)
        self.minimum = low if self.minimum is None else min(self.minimum, low)
        self.maximum = high if self.maximum is None else max(self.maximum, high)

    def copy(self):
        other = Distribution(self.linear)
        other.merge(self)
        return other

    def merge(self, other):
        """Add another distribution (with the same linear buckets) to this one."""
        self.count += other.count
        self.total += other.total
        self.fine.update(other.fine)
        self.linear_counts.update(other.linear_counts)
        for bound, pick in (("minimum", min), ("maximum", max)):
            mine, theirs = getattr(self, bound), getattr(other, bound)
            setattr(self, bound, theirs if mine is None else
                    mine if theirs is None else pick(mine, theirs))

    @property
    def mean(self):
        return self.total / self.count if self.count else None

    def percentile(self, percent):
        """The nearest-rank percentile, from the log-linear buckets."""
        if not self.count:
            return None
        rank = max(1, -(-self.count * percent // 100))
        seen = 0
        for index in sorted(self.fine):
            seen += self.fine[index]
            if seen >= rank:
                low, high = fine_bucket_range(index)
                return min(max((low + high) // 2, self.minimum), self.maximum)
        return self.maximum

    def power_of_two_buckets(self):
        """bpftrace-style buckets, from the first to the last non-empty one."""
        counts = collections.Counter()
        for index, times in self.fine.items():
            low, _high = fine_bucket_range(index)
            counts[power_of_two_bucket(low)] += times
        if not counts:
            return []
        buckets = []
        for slot in range(min(counts), max(counts) + 1):
            if slot == -1:
                buckets.append(Bucket(None, 0, counts[slot]))
            elif slot == 0:
                buckets.append(Bucket(0, 1, counts[slot]))
            else:
                buckets.append(Bucket(1 << (slot - 1), 1 << slot, counts[slot]))
        return buckets

    def linear_buckets(self):
        """Linear buckets from the first to the last non-empty one (open-ended outside MIN..MAX)."""
        counts = self.linear_counts
        if not counts:
            return []
        linear, slots = self.linear, self._linear_slots
        buckets = []
        for slot in range(min(counts), max(counts) + 1):
            if slot == -1:
                buckets.append(Bucket(None, linear.minimum, counts[slot]))
            elif slot == slots:
                buckets.append(Bucket(linear.maximum, None, counts[slot]))
            else:
                low = linear.minimum + slot * linear.step
                buckets.append(Bucket(low, min(low + linear.step, linear.maximum), counts[slot]))
        return buckets

    def buckets(self):
        return self.linear_buckets() if self.linear is not None else self.power_of_two_buckets()


@dataclass
class HistogramResult:
    """Distributions per key tuple, largest count first."""
    keys: Tuple[Key, ...]
    rows: List[Tuple[tuple, Distribution]]
    missing: int = 0          # hits whose value was unavailable (None)


@dataclass
class LatencyResult:
    """Durations (ns) per key tuple, and what could not be paired."""
    keys: Tuple[Key, ...]
    rows: List[Tuple[tuple, Distribution]]
    pairs: int = 0
    unmatched_ends: int = 0    # ENDs with no open START on their thread
    open_starts: int = 0       # STARTs with no END yet
    skipped_starts: int = 0    # STARTs left open under a START whose END came


# -- the user-space executor --------------------------------------------------------

def _is_string(plan):
    return plan.fetch is not None and plan.fetch.endswith(":string")


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
        self.getters = [(operator.itemgetter(_RECORD_FIELDS[key.field]), None)
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
    from ..discovery.providers import argument_names

    index = key.argument
    for site in sites:
        if key.argument_name is None:
            if index >= len(site.plans):
                raise SdtraceError(f"{role} {key.text!r}: {site.probe} has only "
                                   f"{len(site.plans)} arguments")
            continue
        names = argument_names(site.probe, len(site.plans)) or ()
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
        return CountResult(self.plan.keys, _ordered(merged.items()))


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
    return sorted(merged.items(), key=lambda row: _row_order(row[0], row[1].count))


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
            if _is_string(site.plans[index]):
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


class TimeOrder:
    """Releases records in timestamp order across drains.

    One drain is time-ordered, but a record of one CPU's ring can be older
    than what the previous drain returned from another ring.  Records newer
    than HOLDBACK_NS before now (timestamps are CLOCK_MONOTONIC, see perf.py)
    are held for the next call, which merges them with its batch.
    """
    HOLDBACK_NS = 50_000_000

    def __init__(self, clock=time.monotonic_ns):
        self.clock = clock
        self.held = []

    def add(self, records):
        if self.held:
            records = self.held + list(records)
            records.sort(key=operator.itemgetter(TS))
        if not records:
            return []
        cutoff = self.clock() - self.HOLDBACK_NS
        if records[-1][TS] <= cutoff:
            self.held = []
            return records
        split = bisect.bisect_right([record[TS] for record in records], cutoff)
        self.held = records[split:]
        return records[:split]

    def flush(self):
        held, self.held = self.held, []
        return held


class Pairer:
    """Pairs START and END records per (span, thread), LIFO, optionally on match keys.

    `roles` maps a site to (span, is_start); records of other sites are ignored.
    """

    def __init__(self, roles, match=None):
        self.roles = roles
        self.match = match          # record -> match value, or None
        self.stacks = {}            # (span, tid) -> [(match value, start record)]
        self.unmatched_ends = 0
        self.skipped_starts = 0

    def add(self, records):
        """The (start, end) pairs completed by `records` (which must be in time order)."""
        roles, stacks, match = self.roles, self.stacks, self.match
        pairs = []
        for record in records:
            role = roles.get(record[SITE])
            if role is None:
                continue
            span, is_start = role
            stack_key = (span, record[TID])
            value = match(record) if match is not None else None
            if is_start:
                stack = stacks.get(stack_key)
                if stack is None:
                    stack = stacks[stack_key] = []
                stack.append((value, record))
                continue
            stack = stacks.get(stack_key)
            position = len(stack) - 1 if stack else -1
            if match is not None:
                while position >= 0 and stack[position][0] != value:
                    position -= 1
            if position < 0:
                self.unmatched_ends += 1
                continue
            self.skipped_starts += len(stack) - 1 - position
            pairs.append((stack[position][1], record))
            del stack[position:]
        return pairs

    @property
    def open_starts(self):
        return sum(len(stack) for stack in self.stacks.values())


def site_roles(start, end, sites):
    """{site: (0, is_start)} for the sites the START and END specs select."""
    roles = {}
    for site in sites:
        provider, _, name = site.probe.partition(":")
        selected = [spec for spec in (start, end) if spec.matches_name(provider, name)]
        if len(selected) == 2:
            raise SdtraceError(f"{site.probe} matches both {start.text!r} and {end.text!r}")
        if selected:
            roles[site] = (0, selected[0] is start)
    for spec, is_start in ((start, True), (end, False)):
        if not any(role[1] == is_start for role in roles.values()):
            raise SdtraceError(f"no armed site matches {spec.text!r}")
    return roles


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
