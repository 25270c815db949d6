"""Counting in the kernel: a hit adds 1 to a map under its key, and nothing else happens.

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

Counts are added atomically (a sleepable program can be preempted between a
load and a store on one CPU).  Python reads the maps when asked (``counts()``,
batched, kernel/bpf.Map.items) and decodes each key with the site's layout
into the same raw key tuples as the record path's aggregators
(present/aggregate): an events.ArmedSite for the site, ints and strs for the
rest, None for an argument that could not be read.
"""
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Tuple, Union

from ...kernel.bpf import BPF_NOEXIST, Map, Owned
from .asm import R0, R1, R2, R3, R4, R7, R8, R10
from .codegen import OFFSETS, map_call
from .records import slot_format

FIELDS = ("site", "pid", "tid", "comm")
DEFAULT_MAX_KEYS = 1 << 16
KEY_START = OFFSETS["tid"]          # the key: the scratch record from here on
EEXIST = 17
COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class Tally:
    """What a hit counts under: a tuple of FIELDS and argument indexes; at most
    `max_keys` keys (and slots of a direct integer key)."""
    keys: Tuple[Union[str, int], ...]
    max_keys: int = DEFAULT_MAX_KEYS

    def __post_init__(self):
        for key in self.keys:
            if key not in FIELDS and not (type(key) is int and key >= 0):
                raise ValueError(f"not a key of a hit: {key!r}")

    @property
    def arguments(self):
        return [key for key in self.keys if type(key) is int]


class TallyMaps:
    """The maps of one Tally, for sites whose records are at most `record_size` bytes."""

    def __init__(self, tally, layouts, record_size):
        self.tally, self.layouts = tally, layouts        # layouts: site id -> RecordLayout
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
        except BaseException:
            self.close()
            raise

    def _direct_slots(self):
        keys = self.tally.keys
        if keys == ():
            return 1
        if keys == ("site",):
            return max(self.layouts, default=0) + 1
        if len(keys) == 1 and type(keys[0]) is int and all(
                _integer(layout.plans[keys[0]]) for layout in self.layouts.values()):
            return self.tally.max_keys
        return 1                                        # unused: every key is hashed

    @property
    def direct_kind(self):
        """"none", "site", "argument" or None (every key hashed)."""
        keys = self.tally.keys
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
        block.fill(("site", *(key for key in self.tally.keys if key in FIELDS)),
                   self.tally.arguments)
        self._hash_add_one(code, name)

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
            code.load_map(R1, self.counts.fd)
            code.mov(R2, R8)
            code.alu64("add", R2, KEY_START)
            code.call("map_lookup_elem")
            code.jump("jeq", R0, 0, label)
            code.mov(R1, 1)
            code.atomic_add(8, R0, 0, R1)
            code.goto("out")
            code.label(label)
            if attempt:
                break
            code.store(8, R10, -16, 1)
            code.load_map(R1, self.counts.fd)
            code.mov(R2, R8)
            code.alu64("add", R2, KEY_START)
            code.mov(R3, R10)
            code.alu64("add", R3, -16)
            code.mov(R4, BPF_NOEXIST)
            code.call("map_update_elem")
            code.jump("jeq", R0, 0, "out")
            code.jump("jeq", R0, -EEXIST, f"{name}_insert_raced")
            code.goto(f"{name}_dropped")
            code.label(f"{name}_insert_raced")
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

    def _decode(self, raw_key, sites):
        record = bytes(KEY_START) + raw_key
        site_id = int.from_bytes(record[OFFSETS["site"]:OFFSETS["site"] + 4], "little")
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

    def dropped_count(self):
        """Hits whose key the full hash had no room for."""
        return self.dropped.total_per_cpu(bytes(4))

    def close(self):
        self._owned.close()


def _integer(plan):
    return plan.kind is not None and not plan.string and not plan.is_float


def _zero_key(code):
    code.store(4, R10, -4, 0)
    return -4


def _key_end(tally, layout):
    """Where the last keyed field of `layout`'s records ends (the site id at least)."""
    end = OFFSETS["missing"] + 4
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
