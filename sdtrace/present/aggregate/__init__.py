"""Aggregations of probe hits: counts, histograms, latencies.

The layer has three parts, so that where the work happens can change
without the commands changing:

* **plans** say what to compute, in terms of probes and keys only, and
  **results** are the plain data that comes back, which report.py renders
  whoever computed it (plans.py);
* **executors** compute plans: ``UserSpaceExecutor`` (userspace.py) in this
  process, from the records of a Session; ``KernelExecutor`` (kernel.py)
  reads back the maps of a Session whose BPF programs counted the hits
  themselves (``tally_for(plan)``: Count plans), and hands other plans, or
  sessions on the tracefs executor, to the user-space one;
* their building blocks: distributions with exact statistics and
  log-linear buckets (distribution.py), and the pairing of START and END
  records in time order (pairing.py).

The commands and the timeline take their names from here.
"""
from .distribution import Bucket, Distribution
from .pairing import Pairer, TimeOrder, site_roles
from .plans import (Count, CountResult, Histogram, HistogramResult, Key, Latency, LatencyResult,
                    Linear, parse_key, parse_keys, parse_linear)
from .kernel import DEFAULT_MAX_KEYS, KernelExecutor, tally_for
from .userspace import UserSpaceExecutor

__all__ = ["Bucket", "Count", "CountResult", "DEFAULT_MAX_KEYS", "Distribution", "Histogram",
           "HistogramResult", "Key", "KernelExecutor", "Latency", "LatencyResult", "Linear",
           "Pairer", "TimeOrder", "UserSpaceExecutor", "parse_key", "parse_keys",
           "parse_linear", "site_roles", "tally_for"]
