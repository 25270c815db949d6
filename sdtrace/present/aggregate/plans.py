"""Aggregation plans and results: what to compute, and what comes back.

A plan says what to compute in terms of probes and keys only, whoever
computes it: ``Count(keys)``, ``Histogram(value, keys, linear)`` and
``Latency(start, end, match, keys)``.  A key is ``probe``, ``pid``, ``tid``,
``comm``, ``argN`` (or just ``N``) or an argument's documented name
(providers.py).  A result is plain data (``CountResult``, ``HistogramResult``,
``LatencyResult``, rows of key values with a count or a
distribution.Distribution), largest first, that report.py renders.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ...errors import SdtraceError
from .distribution import Distribution

RECORD_FIELDS = ("probe", "pid", "tid", "comm")     # the keys that are not arguments


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
    if text in RECORD_FIELDS:
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
        return CountResult(self.keys, ordered([row for row in rows if row[1]]))


def row_order(values, size):
    """The sort key of a result row: the largest size first, then by key values."""
    return -size, tuple(map(_sortable, values))


def ordered(rows):
    """(values, count) rows, largest count first."""
    return sorted(rows, key=lambda row: row_order(row[0], row[1]))


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


