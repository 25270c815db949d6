"""The in-kernel executor: Count plans compiled into the probe programs, their maps read back.

``tally_for(plan)`` is what a Session needs before it arms: a function of
the selected sites that gives the engine's bpf.tally.Tally of the plan (its
keys resolved against the sites as the user-space executor resolves them),
or None for a plan the kernel does not compute (histograms and latencies go
through records).  Once armed, ``KernelExecutor(session).aggregator(plan)``
reads the session's maps whenever a result is asked for, so ``--interval``
and the end both read the kernel's counts; the records' path is never taken.
A session that did not count in the kernel (the tracefs executor) gets the
user-space executor's aggregator instead: the commands do not change.
"""
from collections import namedtuple

from .plans import Count, CountResult, ordered
from .userspace import Aggregator, UserSpaceExecutor, _argument_index, _KeyReader

DEFAULT_MAX_KEYS = 1 << 16
_FIELDS = {"probe": "site", "pid": "pid", "tid": "tid", "comm": "comm"}
# what _argument_index reads of a site, for the notes.Site of a session not yet armed
_Signature = namedtuple("_Signature", "probe provider name plans")


def tally_for(plan, max_keys=DEFAULT_MAX_KEYS):
    """sites (notes.Site) -> the Tally of `plan`, or None if the kernel does not count it."""
    if not isinstance(plan, Count):
        return None

    def tally(sites):
        from ...engine.bpf.tally import Tally

        signatures = [_Signature(site.qualified_name, site.provider, site.name, site.operands)
                      for site in sites]
        return Tally(tuple(_FIELDS[key.field] if key.field is not None
                           else _argument_index(key, signatures, "key") for key in plan.keys),
                     max_keys)
    return tally


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


class KernelExecutor:
    """Aggregators of a started session: the kernel's where it counts, else user space's."""

    def __init__(self, session):
        self.session = session

    def aggregator(self, plan, on_pair=None):
        if isinstance(plan, Count) and self.session.counting_in_kernel:
            return KernelCountAggregator(plan, self.session)
        return UserSpaceExecutor(self.session).aggregator(plan, on_pair)
