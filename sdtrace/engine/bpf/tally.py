"""Aggregating in the kernel: a hit adds to maps under its key, and nothing else happens.

``count`` over the record path sends every hit to Python; under load the
ring overflows and the counts are short (the records are lost, counted, but
lost).  With a ``Tally`` the program of a site keeps the count itself: the
key of a hit is a tuple of ``"site"``, ``"pid"``, ``"tid"``, ``"comm"`` and
argument indexes, and the program adds 1 to the count of that key, in the
cheapest map that can hold it:

* ``direct`` -- a per-CPU array indexed by the key itself, when the key is
  the site id (keys ``("site",)``), nothing (``()``: one slot), or one
  integer argument whose value lies in [0, max_keys): the program checks
  the bound and adds to the slot (an array lookup the verifier inlines);
* ``counts`` -- a per-CPU hash map for every other key, and for an integer
  argument outside that range.  Its key is built in ``scratch``, a per-CPU
  array of one record (codegen.RecordLayout): the record is zeroed from
  ``tid`` on, then filled with the keyed fields only (and the site id, which
  tells the layout the key was built with), and its bytes from ``tid`` to
  the end of the last keyed field are the key.  A key not yet in the map is
  inserted with BPF_NOEXIST (another CPU inserting it first is retried as a
  lookup); an insert the full map refuses is counted in ``dropped``, never
  silent.

A tally with a ``value`` keeps a histogram of an integer argument instead:
``stats`` holds the count, a 128-bit sum, the minimum and the maximum per
key, and ``counts`` the hits per key and bucket, the bucket computed in the
program as present/aggregate/distribution does it (log-linear: exact below
16, then 16 per power of two; and linear ones if asked), so that the same
Distribution comes back.  A tally with ``spans`` keeps a histogram of
durations: a START pushes the time on a stack (``stacks``, per thread and
match values), an END pops it.

Counts are added atomically (a sleepable program can be preempted between a
load and a store on one CPU).  Python reads the maps when asked (``counts()``,
batched, kernel/bpf.Map.items) and decodes each key with the site's layout
into the same raw key tuples as the record path's aggregators
(present/aggregate): an events.ArmedSite for the site, ints and strs for the
rest, None for an argument that could not be read.
"""
import errno
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ...errors import SdtraceError
from ...kernel.bpf import BPF_NOEXIST, Map, Owned
from .asm import R0, R1, R2, R3, R4, R5, R7, R8, R9, R10
from .codegen import OFFSETS, map_call
from .records import slot_format

FIELDS = ("site", "pid", "tid", "comm")
DEFAULT_MAX_KEYS = 1 << 16
KEY_START = OFFSETS["tid"]          # the key: the scratch record from here on
EEXIST = errno.EEXIST             # what an insert of a key already there returns (negated)
COUNT = struct.Struct("<Q")
# a histogram's statistics per key and CPU: count (which tells the CPUs that saw the key),
# sum as 128 bits (low, then high word), minimum, maximum, the extremes as the value's type
# has them (a u64 is compared and summed unsigned)
STATS = struct.Struct("<QQQQQ")
STATS_OFFSETS = {"count": 0, "sum": 8, "sum_high": 16, "minimum": 24, "maximum": 32}
# a thread's open spans: their depth, then the START times of the innermost STACK_DEPTH
STACK_DEPTH = 32
STACK = struct.Struct(f"<I4x{STACK_DEPTH}Q")
STACK_TIMES = 8
TIME_SLOT = -48                # a span's time, then its duration, on the program's stack
# per-CPU counters of spans: ENDs with no open START, STARTs nested too deep to time,
# STARTs that found no room for their thread's stack
SPAN_COUNTERS = ("unmatched", "too_deep", "no_stack")
# where a histogram's buckets go in the key: header fields a tally never keys on
BUCKET_FIELDS = {"fine": OFFSETS["truncated"], "linear": OFFSETS["cpu"]}
SUB_BUCKET_BITS = 4                    # distribution.SUB_BUCKET_BITS, as the program computes it
SUB_BUCKETS = 1 << SUB_BUCKET_BITS


@dataclass(frozen=True)
class Tally:
    """What a hit counts under: a tuple of FIELDS and argument indexes; at most
    `max_keys` keys (and slots of a direct integer key).  With `value` (an argument
    index) the count is of that integer's distribution per key: its log-linear
    bucket (present/aggregate/distribution.fine_bucket) and, with `linear` (minimum,
    maximum, step), its linear one, and its count, sum, minimum and maximum.  With
    `spans` (the site ids that start a span, those that end one) the distribution is of
    the durations: a START pushes its time on a stack (STACK_DEPTH deep) of its thread
    and its `match` values, an END pops the innermost of its own and counts the
    difference under the key (keys: FIELDS of the thread, or `match` values, which the
    END knows as its START did); other sites only arm (their semaphores)."""
    keys: Tuple[Union[str, int], ...]
    max_keys: int = DEFAULT_MAX_KEYS
    value: Optional[int] = None
    linear: Optional[Tuple[int, int, int]] = None
    spans: Optional[Tuple[frozenset, frozenset]] = None   # latency: START, END site ids
    match: Tuple[Union[str, int], ...] = ()   # latency: what a START and its END share

    def __post_init__(self):
        for key in (*self.keys, *self.match):
            if key not in FIELDS and not (type(key) is int and key >= 0):
                raise ValueError(f"not a key of a hit: {key!r}")

    @property
    def arguments(self):
        """The arguments the keys and match values name."""
        return sorted({key for key in (*self.keys, *self.match) if type(key) is int})


class TallyMaps:
    """The maps of one Tally, for sites whose records are at most `record_size` bytes."""

    def __init__(self, tally, layouts, record_size):
        self.tally, self.layouts = tally, layouts        # layouts: site id -> RecordLayout
        for layout in layouts.values():
            value = tally.value is not None and layout.plans[tally.value]
            if value and (value.string or value.is_float):
                raise SdtraceError(f"hist: argument {tally.value} is a string or a float, "
                                   "not an integer")
        self.key_size = max((_key_end(tally, layout) for layout in layouts.values()),
                            default=OFFSETS["site"] + 4) - KEY_START
        self.record_size = record_size
        self._owned = Owned()
        try:
            self.direct = self._owned.own(Map.percpu_array(8, self._direct_slots(),
                                                           "sdtrace_direct"))
            self.counts = self._owned.own(Map.percpu_hash(self.key_size, 8, tally.max_keys,
                                                          "sdtrace_counts"))
            self.scratch = self._owned.own(Map.percpu_array(record_size, 1, "sdtrace_scratch"))
            self.dropped = self._owned.own(Map.percpu_array(8, 1, "sdtrace_dropped"))
            if tally.value is not None or tally.spans is not None:
                self.stats = self._owned.own(Map.percpu_hash(self.key_size, STATS.size,
                                                             tally.max_keys, "sdtrace_stats"))
                self.missing = self._owned.own(Map.percpu_array(8, 1, "sdtrace_missing"))
            if tally.spans is not None:
                self.stacks = self._owned.own(Map.hash(self.key_size, STACK.size,
                                                       tally.max_keys, "sdtrace_stacks"))
                self.empty = self._owned.own(Map.percpu_array(STACK.size, 1, "sdtrace_empty"))
                self.spans = self._owned.own(Map.percpu_array(8, len(SPAN_COUNTERS),
                                                              "sdtrace_spans"))
        except BaseException:
            self.close()
            raise

    def _direct_slots(self):
        """The slots of `direct`: one per site id, per integer value below max_keys, or one
        (a single count, or none used: every key is hashed)."""
        return {"site": max(self.layouts, default=0) + 1,
                "argument": self.tally.max_keys}.get(self.direct_kind, 1)

    @property
    def direct_kind(self):
        """"none", "site", "argument" or None (every key hashed)."""
        keys = self.tally.keys
        if self.tally.value is not None or self.tally.spans is not None:
            return None
        if keys == ():
            return "none"
        if keys == ("site",):
            return "site"
        if len(keys) == 1 and type(keys[0]) is int and all(
                _integer(layout.plans[keys[0]]) for layout in self.layouts.values()):
            return "argument"
        return None

    # -- the program -----------------------------------------------------------------

    def emit(self, block, _record_size):
        """The code of `block` (a codegen.Block): count the hit under its key."""
        code, name, kind = block.code, block.name, self.direct_kind
        code.label(block.name)
        if self.tally.spans is not None:
            self._span(block)
            return
        if kind in ("none", "site"):
            code.store(4, R10, -4, R7 if kind == "site" else 0)
            self._add_one(code, self.direct.fd, -4)
            return
        map_call(code, "map_lookup_elem", self.scratch.fd, _zero_key(code))
        code.jump("jeq", R0, 0, "out")
        code.mov(R8, R0)
        if kind == "argument":
            [index] = self.tally.arguments
            block.fill((), [index])
            code.load(4, R1, R8, OFFSETS["missing"])
            code.jump("jset", R1, 1 << index, f"{name}_hashed")
            code.load(8, R1, R8, block.layout.argument(index))
            code.jump("jge", R1, self.tally.max_keys, f"{name}_hashed")
            code.store(4, R10, -4, R1)
            self._add_one(code, self.direct.fd, -4)
            code.label(f"{name}_hashed")
        for offset in range(KEY_START, KEY_START + self.key_size, 8):
            code.store(8, R8, offset, 0)
        value = self.tally.value
        block.fill(("site", *(key for key in self.tally.keys if key in FIELDS)),
                   self.tally.arguments + ([] if value is None else [value]))
        if value is not None:
            self._distribution(block, value)
        self._hash_add_one(code, name)

    def _span(self, block):
        """A START site pushes the time, an END site pops it and counts the duration (as a
        histogram's value); the block's sites are told apart by their cookie (R7)."""
        code, name = block.code, block.name
        starts, ends = self.tally.spans
        for site_id in sorted(starts):
            code.jump("jeq", R7, site_id, f"{name}_start")
        for site_id in sorted(ends):
            code.jump("jeq", R7, site_id, f"{name}_end")
        code.goto("out")                                        # a site that only arms
        code.label(f"{name}_start")
        self._now(code)
        self._stack(block, create=True)
        code.load(4, R1, R8, 0)                                 # the depth
        code.mov(R2, R1)
        code.alu64("add", R2, 1)
        code.store(4, R8, 0, R2)
        code.jump("jge", R1, STACK_DEPTH, f"{name}_too_deep")  # pushed, but not timed
        code.alu64("lsh", R1, 3)
        code.alu64("add", R1, R8)
        code.load(8, R2, R10, TIME_SLOT)
        code.store(8, R1, STACK_TIMES, R2)
        code.goto("out")
        code.label(f"{name}_too_deep")
        self._count_span(code, "too_deep")
        code.label(f"{name}_no_stack")
        self._count_span(code, "no_stack")
        code.label(f"{name}_end")
        self._now(code)
        self._stack(block, create=False)
        code.load(4, R1, R8, 0)
        code.jump("jeq", R1, 0, f"{name}_unmatched")
        code.alu64("sub", R1, 1)
        code.store(4, R8, 0, R1)
        code.jump("jge", R1, STACK_DEPTH, "out")                # its START was not timed
        code.alu64("lsh", R1, 3)
        code.alu64("add", R1, R8)
        code.load(8, R1, R1, STACK_TIMES)
        code.load(8, R2, R10, TIME_SLOT)
        code.alu64("sub", R2, R1)                               # the duration
        code.store(8, R10, TIME_SLOT, R2)
        self._key(block, ("site", *self.tally.keys))
        code.load(8, R9, R10, TIME_SLOT)
        self._statistics(code, name, unsigned=False)
        self._fine_bucket(code, name, unsigned=False)
        if self.tally.linear is not None:
            self._linear_bucket(code, name, unsigned=False)
        self._hash_add_one(code, name)
        code.label(f"{name}_unmatched")
        self._count_span(code, "unmatched")

    @staticmethod
    def _now(code):
        """The time of the hit, first thing (so that both ends of a span are timed alike,
        before any lookup), kept in TIME_SLOT of the program's stack: fill() takes R9."""
        code.call("ktime_get_ns")
        code.store(8, R10, TIME_SLOT, R0)

    def _key(self, block, fields):
        """R8 = the scratch record, holding the key of `fields` (FIELDS and arguments) from
        KEY_START on, the rest of the key zero."""
        code = block.code
        map_call(code, "map_lookup_elem", self.scratch.fd, _zero_key(code))
        code.jump("jeq", R0, 0, "out")
        code.mov(R8, R0)
        for offset in range(KEY_START, KEY_START + self.key_size, 8):
            code.store(8, R8, offset, 0)
        block.fill([field for field in fields if field in FIELDS],
                   [field for field in fields if type(field) is int])

    def _stack(self, block, create):
        """R8 = the stack of START times of this thread and match values; an END without
        one goes to its "unmatched", a START creates it, empty."""
        code, name = block.code, block.name
        self._key(block, ("tid", *self.tally.match))
        code.load(4, R1, R8, OFFSETS["missing"])                # the match values' alone:
        code.alu64("and", R1, sum(1 << index for index in self.tally.arguments
                                  if index in self.tally.match))
        code.store(4, R8, OFFSETS["missing"], R1)              # a START's and an END's differ
        _look_up_key(code, self.stacks.fd, f"{name}_unmatched" if not create
                     else f"{name}_new_stack")
        if create:
            code.goto(f"{name}_stack")
            code.label(f"{name}_new_stack")
            map_call(code, "map_lookup_elem", self.empty.fd, _zero_key(code))
            code.jump("jeq", R0, 0, "out")
            code.mov(R3, R0)
            code.load_map(R1, self.stacks.fd)
            code.mov(R2, R8)
            code.alu64("add", R2, KEY_START)
            code.mov(R4, BPF_NOEXIST)
            code.call("map_update_elem")
            _look_up_key(code, self.stacks.fd, f"{name}_no_stack")
            code.label(f"{name}_stack")
        code.mov(R8, R0)

    def _count_span(self, code, counter):
        """Adds 1 to one of SPAN_COUNTERS, then returns."""
        code.store(4, R10, -4, SPAN_COUNTERS.index(counter))
        self._add_one(code, self.spans.fd, -4)

    def _distribution(self, block, index):
        """The value (argument `index`) into R9, out of the key; its statistics added to
        `stats`; its buckets written into the key (BUCKET_FIELDS); a missing one counted."""
        code, name, layout = block.code, block.name, block.layout
        plan, slot, bit = layout.plans[index], layout.argument(index), 1 << index
        code.load(4, R1, R8, OFFSETS["missing"])
        code.jump("jset", R1, bit, f"{name}_no_value")
        code.load(8, R9, R8, slot)
        if plan.signed and plan.size < 8:                       # sign-extend it
            code.alu64("lsh", R9, 64 - 8 * plan.size)
            code.alu64("arsh", R9, 64 - 8 * plan.size)
        if slot < KEY_START + self.key_size:                    # the value is no key
            code.store(8, R8, slot, 0)
        unsigned = not plan.signed and plan.size == 8           # past the s64 range
        self._statistics(code, name, unsigned)
        self._fine_bucket(code, name, unsigned)
        if self.tally.linear is not None:
            self._linear_bucket(code, name, unsigned)
        code.goto(f"{name}_bucketed")
        code.label(f"{name}_no_value")
        self._add_one(code, self.missing.fd, _zero_key(code))
        code.label(f"{name}_bucketed")

    def _statistics(self, code, name, unsigned):
        """stats[key] += (1, R9) and its minimum and maximum, or inserted as (1, R9, R9, R9).

        The map is per CPU: a key another CPU inserted has zeros in this CPU's slot, so
        a slot whose count is 0 takes R9 as its minimum and maximum before comparing.

        The sum is 128 bits wide, so that it never wraps: the low word gets R9, the high
        word R9's sign and the carry; being two words it is not added atomically (a
        sleepable program preempted on its CPU between them by the same key's hit is
        the rare loss), the count is."""
        low, high = ("jle", "jge") if unsigned else ("jsle", "jsge")
        for attempt in (0, 1):
            label = f"{name}_stats_insert{attempt}"
            _look_up_key(code, self.stats.fd, label)
            code.load(8, R1, R0, STATS_OFFSETS["count"])          # this CPU's first hit of a
            code.jump("jne", R1, 0, f"{name}_stats_seen{attempt}")  # key another CPU inserted:
            code.store(8, R0, STATS_OFFSETS["minimum"], R9)       # its extremes are R9, not 0
            code.store(8, R0, STATS_OFFSETS["maximum"], R9)
            code.label(f"{name}_stats_seen{attempt}")
            code.mov(R1, 1)
            code.atomic_add(8, R0, STATS_OFFSETS["count"], R1)
            code.load(8, R1, R0, STATS_OFFSETS["sum"])
            code.alu64("add", R1, R9)
            code.store(8, R0, STATS_OFFSETS["sum"], R1)
            code.load(8, R2, R0, STATS_OFFSETS["sum_high"])
            if not unsigned:                                    # R9's sign: 0 or -1
                code.mov(R3, R9)
                code.alu64("arsh", R3, 63)
                code.alu64("add", R2, R3)
            code.jump("jge", R1, R9, f"{name}_no_carry{attempt}")
            code.alu64("add", R2, 1)
            code.label(f"{name}_no_carry{attempt}")
            code.store(8, R0, STATS_OFFSETS["sum_high"], R2)
            code.load(8, R1, R0, STATS_OFFSETS["minimum"])
            code.jump(low, R1, R9, f"{name}_stats_low{attempt}")
            code.store(8, R0, STATS_OFFSETS["minimum"], R9)
            code.label(f"{name}_stats_low{attempt}")
            code.load(8, R1, R0, STATS_OFFSETS["maximum"])
            code.jump(high, R1, R9, f"{name}_stats_done")
            code.store(8, R0, STATS_OFFSETS["maximum"], R9)
            code.goto(f"{name}_stats_done")
            code.label(label)
            if attempt:
                break
            start = -STATS.size
            code.store(8, R10, start, 1)
            for field in ("sum", "minimum", "maximum"):
                code.store(8, R10, start + STATS_OFFSETS[field], R9)
            code.mov(R1, 0)                                     # a u64 has no sign
            if not unsigned:
                code.mov(R1, R9)
                code.alu64("arsh", R1, 63)
            code.store(8, R10, start + STATS_OFFSETS["sum_high"], R1)
            _insert_key(code, self.stats.fd, start, f"{name}_stats_done", f"{name}_dropped")
        code.label(f"{name}_stats_done")

    @staticmethod
    def _fine_bucket(code, name, unsigned):
        """The log-linear bucket of R9 (distribution.fine_bucket) into the key: exact below
        16, then 16 buckets per power of two; a negative value mirrors its magnitude."""
        code.mov(R1, R9)
        code.mov(R3, 0)                                          # 1 if negative
        if not unsigned:
            code.jump("jsge", R1, 0, f"{name}_fine_positive")
            code.alu64("neg", R1, 0)
            code.mov(R3, 1)
            code.label(f"{name}_fine_positive")
        code.jump("jlt", R1, SUB_BUCKETS, f"{name}_fine_exact")
        code.mov(R2, 0)                                          # the exponent, found by halves
        code.mov(R4, R1)
        for bits in (32, 16, 8, 4, 2, 1):
            code.mov(R5, R4)
            code.alu64("rsh", R5, bits)
            code.jump("jeq", R5, 0, f"{name}_fine_{bits}")
            code.mov(R4, R5)
            code.alu64("add", R2, bits)
            code.label(f"{name}_fine_{bits}")
        code.alu64("sub", R2, SUB_BUCKET_BITS)                   # the shift
        code.alu64("rsh", R1, R2)
        code.alu64("lsh", R2, SUB_BUCKET_BITS)
        code.alu64("add", R1, R2)                                # SUB_BUCKETS * shift + v >> shift
        code.label(f"{name}_fine_exact")
        code.jump("jeq", R3, 0, f"{name}_fine_store")
        code.alu64("neg", R1, 0)
        code.alu64("sub", R1, 1)
        code.label(f"{name}_fine_store")
        code.store(4, R8, BUCKET_FIELDS["fine"], R1)

    def _linear_bucket(self, code, name, unsigned):
        """R9's linear bucket into the key: -1 below the minimum, then one per step, the
        last for the maximum and above (distribution.Distribution's).  R9 - minimum is
        exact as a u64 whenever R9 >= minimum; a u64 at or past the maximum is the last
        bucket before that subtraction could wrap."""
        minimum, maximum, step = self.tally.linear
        slots = -(-(maximum - minimum) // step)
        done = f"{name}_linear_store"
        code.mov(R1, slots)
        if unsigned and maximum <= 0:
            code.goto(done)
        elif unsigned:
            code.load_imm64(R2, maximum)
            code.jump("jge", R9, R2, done)
        code.mov(R1, -1)
        code.load_imm64(R2, minimum)
        if not unsigned:
            code.jump("jslt", R9, R2, done)
        elif minimum > 0:
            code.jump("jlt", R9, R2, done)
        code.mov(R1, R9)
        code.alu64("sub", R1, R2)
        code.alu64("div", R1, step)
        code.jump("jle", R1, slots, f"{name}_linear_store")
        code.mov(R1, slots)
        code.label(f"{name}_linear_store")
        code.store(4, R8, BUCKET_FIELDS["linear"], R1)

    @staticmethod
    def _add_one(code, map_fd, key_slot):
        """*lookup(map, R10 + key_slot) += 1 atomically, then return."""
        map_call(code, "map_lookup_elem", map_fd, key_slot)
        code.jump("jeq", R0, 0, "out")
        code.mov(R1, 1)
        code.atomic_add(8, R0, 0, R1)
        code.goto("out")

    def _hash_add_one(self, code, name):
        """The count of the key at R8 + KEY_START, in the hash: +1, or inserted as 1."""
        for attempt in (0, 1):
            label = f"{name}_insert{attempt}"
            _look_up_key(code, self.counts.fd, label)
            code.mov(R1, 1)
            code.atomic_add(8, R0, 0, R1)
            code.goto("out")
            code.label(label)
            if attempt:
                break
            code.store(8, R10, -16, 1)
            _insert_key(code, self.counts.fd, -16, "out", f"{name}_dropped")
        code.label(f"{name}_dropped")
        self._add_one(code, self.dropped.fd, _zero_key(code))

    # -- reading ---------------------------------------------------------------------

    def counts_by_key(self, sites):
        """Counter of raw key tuples (a bare value for one key), from both maps;
        `sites`: site id -> events.ArmedSite."""
        counted = Counter()
        kind = self.direct_kind
        if kind is not None:
            for raw_index, values in self.direct.items():
                total = _total(values, self.direct.slot_size)
                if not total:
                    continue
                index = int.from_bytes(raw_index, "little")
                key = {"none": (), "site": sites.get(index), "argument": index}[kind]
                counted[key] += total
        for raw_key, values in self.counts.items():
            counted[self._decode(raw_key, sites)] += _total(values, self.counts.slot_size)
        return counted

    @staticmethod
    def _site_id(raw_key):
        """The id of the site whose hit made the key `raw_key`."""
        start = OFFSETS["site"] - KEY_START
        return int.from_bytes(raw_key[start:start + 4], "little")

    def _layout(self, raw_key):
        """The RecordLayout of the site whose hit made the key `raw_key`."""
        return self.layouts[self._site_id(raw_key)]

    def _decode(self, raw_key, sites):
        record = bytes(KEY_START) + raw_key
        site_id = self._site_id(raw_key)
        layout = self.layouts[site_id]
        missing = int.from_bytes(record[OFFSETS["missing"]:OFFSETS["missing"] + 4], "little")
        values = []
        for key in self.tally.keys:
            if key == "site":
                values.append(sites[site_id])
            elif key in ("pid", "tid"):
                values.append(int.from_bytes(record[OFFSETS[key]:OFFSETS[key] + 4], "little"))
            elif key == "comm":
                values.append(record[OFFSETS["comm"]:OFFSETS["comm"] + 16].split(b"\0", 1)[0]
                              .decode(errors="replace"))
            else:
                values.append(_argument(record, layout, key, missing))
        return values[0] if len(values) == 1 else tuple(values)

    def histograms(self, sites):
        """With a value: {raw key: Histogram} from both maps (`sites`: site id ->
        events.ArmedSite)."""
        histograms = {}
        for raw_key, values in self.stats.items():
            histogram = histograms.setdefault(self._decode(raw_key, sites), Histogram())
            signed = True                               # a duration is an s64
            if self.tally.value is not None:
                plan = self._layout(raw_key).plans[self.tally.value]
                signed = plan.signed or plan.size < 8
            for start in range(0, len(values), self.stats.slot_size):
                count, low, high, minimum, maximum = STATS.unpack_from(values, start)
                if signed:
                    minimum, maximum = (extreme - (1 << 64) if extreme >> 63 else extreme
                                        for extreme in (minimum, maximum))
                high -= (1 << 64) if high >> 63 else 0
                histogram.add_statistics(count, (high << 64) + low, minimum, maximum)
        for raw_key, values in self.counts.items():
            record = bytes(KEY_START) + raw_key
            fine, linear = (struct.unpack_from("<i", record, BUCKET_FIELDS[field])[0]
                            for field in ("fine", "linear"))
            histogram = histograms.setdefault(self._decode(raw_key, sites), Histogram())
            times = _total(values, self.counts.slot_size)
            histogram.fine[fine] += times
            if self.tally.linear is not None:
                histogram.linear[linear] += times
        return histograms

    def span_counts(self):
        """Latency: {SPAN_COUNTERS name: hits}, and "open": STARTs still on a stack."""
        counts = {name: self.spans.total_per_cpu(struct.pack("<I", index))
                  for index, name in enumerate(SPAN_COUNTERS)}
        counts["open"] = sum(min(STACK.unpack_from(value)[0], STACK_DEPTH)
                             for _key, value in self.stacks.items())
        return counts

    def missing_count(self):
        """Hits whose value could not be read."""
        return self.missing.total_per_cpu(bytes(4))

    def dropped_count(self):
        """Hits whose key the full hash had no room for."""
        return self.dropped.total_per_cpu(bytes(4))

    def close(self):
        self._owned.close()


class Histogram:
    """One key's distribution as the maps hold it: bucket counts and statistics."""

    def __init__(self):
        self.fine, self.linear = Counter(), Counter()
        self.count, self.total, self.minimum, self.maximum = 0, 0, None, None

    def add_statistics(self, count, total, minimum, maximum):
        """One CPU's statistics (none if it never saw the key)."""
        if not count:
            return
        self.count += count
        self.total += total
        self.minimum = minimum if self.minimum is None else min(self.minimum, minimum)
        self.maximum = maximum if self.maximum is None else max(self.maximum, maximum)


def _integer(plan):
    return plan.kind is not None and not plan.string and not plan.is_float


def _look_up_key(code, map_fd, absent):
    """R0 = the value of the key at R8 + KEY_START in `map_fd`; to `absent` if none."""
    code.load_map(R1, map_fd)
    code.mov(R2, R8)
    code.alu64("add", R2, KEY_START)
    code.call("map_lookup_elem")
    code.jump("jeq", R0, 0, absent)


def _insert_key(code, map_fd, value_slot, done, failed):
    """Inserts the key at R8 + KEY_START with the value at R10 + `value_slot`, then goes
    to `done`; falls through where another CPU inserted it first (to look it up again),
    and goes to `failed` where the map refuses it (full)."""
    code.load_map(R1, map_fd)
    code.mov(R2, R8)
    code.alu64("add", R2, KEY_START)
    code.mov(R3, R10)
    code.alu64("add", R3, value_slot)
    code.mov(R4, BPF_NOEXIST)
    code.call("map_update_elem")
    code.jump("jeq", R0, 0, done)
    code.jump("jne", R0, -EEXIST, failed)


def _zero_key(code):
    code.store(4, R10, -4, 0)
    return -4


def _key_end(tally, layout):
    """Where the last keyed field of `layout`'s records ends (the site id, the missing
    word and a histogram's buckets at least)."""
    end = OFFSETS["truncated"] + 4
    for index in tally.arguments:
        end = max(end, layout.argument(index) + 8)
        if index in layout.strings:
            end = max(end, layout.strings[index] + ((layout.string_length + 1 + 7) & ~7))
    return end


def _total(values, slot_size):
    return sum(COUNT.unpack_from(values, start)[0] for start in range(0, len(values), slot_size))


def _argument(record, layout, index, missing):
    plan = layout.plans[index]
    if missing >> index & 1:
        return None
    slot = layout.argument(index)
    if plan.string:
        length = int.from_bytes(record[slot:slot + 8], "little")
        start = layout.strings[index]
        text = record[start:start + length - (plan.length is None)]
        return text.split(b"\0", 1)[0].decode(errors="replace")
    return struct.unpack_from("<" + slot_format(plan), record, slot)[0]
