"""Pairing START and END records: time order across drains, then LIFO per thread.

Latency pairs a START record with the next END record of the same thread
(LIFO: a stack per thread, so nested spans pair innermost first).  With
match keys, an END pairs with the innermost open START whose keys are equal;
the STARTs above it never got their END and are counted as skipped.  An END
with no open START is counted as unmatched, STARTs still open at the end as
open.  Which sites start and which end a span are their *roles*
(``site_roles`` for a START and an END spec; perfetto.span_roles by naming
convention).

Pairing needs time order across CPUs, which one drain of the rings does not
give (perf.py): ``TimeOrder`` holds back the newest records of each batch
until later drains can no longer deliver anything older.
"""
import bisect
import operator
import time

from ...engine.events import SITE, TID, TS  # the fields of a record
from ...errors import SdtraceError


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
        selected = [spec for spec in (start, end) if spec.matches_name(site.provider, site.name)]
        if len(selected) == 2:
            raise SdtraceError(f"{site.probe} matches both {start.text!r} and {end.text!r}")
        if selected:
            roles[site] = (0, selected[0] is start)
    for spec, is_start in ((start, True), (end, False)):
        if not any(role[1] == is_start for role in roles.values()):
            raise SdtraceError(f"no armed site matches {spec.text!r}")
    return roles
