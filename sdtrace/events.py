"""Raw perf samples -> events: who hit which probe, when, with which arguments.

Every armed site is one trace event with its own kernel sample id (one per
CPU).  A ``Decoder`` maps each sample id to the site's ``ProbeSite`` and its
precompiled field layout, and turns a drained batch of samples into records
``(ts, pid, tid, cpu, comm, site, args)``.  The first fetched field of every
event is the thread's ``comm`` (fetched by the kernel at the hit, so it is
right even for a process that has exited since); the rest go through the
site's assembler (fetchargs.py), which fills in constants, conversions and
unavailable (None) arguments.

Records are plain tuples because the hot loop handles hundreds of thousands
per second; ``Event`` is the friendly object the Python API hands out.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

COMM_FETCH = "comm=$comm:string"


@dataclass(frozen=True)
class ProbeSite:
    """One armed site as events refer to it."""
    probe: str                  # "provider:name"
    file: str
    offset: int
    event: str                  # the trace event's name in the session's group
    plans: tuple                # fetchargs.ArgumentPlan per argument
    assemble: Callable          # fetched values -> argument list
    decode: Optional[Callable] = None   # raw sample -> (comm, *fetched values)


class Event:
    """One probe hit.  Attributes are the keys of ``sdtrace trace --json``."""
    __slots__ = ("ts", "pid", "tid", "cpu", "comm", "probe", "file", "args")

    def __init__(self, ts, pid, tid, cpu, comm, probe, file, args):
        self.ts, self.pid, self.tid, self.cpu = ts, pid, tid, cpu
        self.comm, self.probe, self.file, self.args = comm, probe, file, args

    @classmethod
    def from_record(cls, record):
        ts, pid, tid, cpu, comm, site, args = record
        return cls(ts, pid, tid, cpu, comm, site.probe, site.file, args)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self):
        return (f"Event(ts={self.ts}, pid={self.pid}, tid={self.tid}, cpu={self.cpu}, "
                f"comm={self.comm!r}, probe={self.probe!r}, args={self.args!r})")


class Decoder:
    """Sample id -> site, and samples -> records."""

    def __init__(self):
        self.sites_by_id = {}

    def add(self, sample_ids, site):
        for sample_id in sample_ids:
            self.sites_by_id[sample_id] = site

    def records(self, samples) -> List[tuple]:
        sites = self.sites_by_id
        records = []
        append = records.append
        for sample_id, pid, tid, ts, cpu, raw in samples:
            site = sites[sample_id]
            comm, *values = site.decode(raw)
            append((ts, pid, tid, cpu, comm, site, site.assemble(values)))
        return records
