"""Distributions of integers: exact statistics and log-linear buckets.

A ``Distribution`` keeps the count, sum, minimum and maximum exactly, and
the values in log-linear buckets (``fine_bucket``): exact below 16, then 16
buckets per power of two.  Percentiles come from those buckets (the
bucket's middle, clamped to the observed range), so they are within 1/32 of
the true value -- and memory stays bounded however long the run.
Power-of-two display buckets (bpftrace's ``hist()``) are sums of them;
linear buckets (``--linear``, a plans.Linear) are counted separately.
Distributions merge, so partial ones (per batch, per raw key) add up.
"""
import collections
from dataclasses import dataclass
from typing import Optional


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
