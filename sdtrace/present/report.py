"""Aggregation results -> text: aligned tables, histograms with bars, JSON rows.

Renders the results of aggregate (plans.py) whoever computed them.  Tables put the
count first, right-aligned, then the key columns; histograms are drawn the
way bpftrace's ``hist()`` and ``lhist()`` draw them (a bucket label, its
count, and a bar of ``@`` scaled to the largest bucket), followed by the
statistics line.  JSON rows are one object per key tuple, named by the keys
as the user wrote them plus ``count`` (and the statistics and buckets for
histograms); their field names are part of sdtrace's contract.
"""
import json

from .output import table

BAR_WIDTH = 52
PERCENTILES = (50, 90, 99)
_SUFFIXES = ("", "K", "M", "G", "T", "P", "E")


def _shown(value):
    return "?" if value is None else str(value)


def count_table(result, top=None):
    """The table of a CountResult: COUNT then one column per key."""
    rows = result.rows[:top] if top else result.rows
    header = ["COUNT", *(key.text.upper() for key in result.keys)]
    lines = [[str(count), *map(_shown, values)] for values, count in rows]
    return table(header, lines, right={0}) + "\n"


def _key_record(keys, values):
    return {key.text: value for key, value in zip(keys, values)}


def count_json(result, top=None, extra=None):
    rows = result.rows[:top] if top else result.rows
    return "".join(json.dumps({**_key_record(result.keys, values), "count": count, **(extra or {})})
                   + "\n" for values, count in rows)


def _size(number):
    """bpftrace's bucket bound: 1024 -> 1K, 3 << 20 -> 3M; others as they are."""
    if number is None:
        return "..."
    magnitude = abs(number)
    suffix = 0
    while magnitude and magnitude % 1024 == 0 and suffix < len(_SUFFIXES) - 1:
        magnitude //= 1024
        suffix += 1
    return f"{'-' if number < 0 else ''}{magnitude}{_SUFFIXES[suffix]}"


def bucket_label(bucket):
    if bucket.low is None:
        return f"(..., {_size(bucket.high)})"
    if bucket.high is None:
        return f"[{_size(bucket.low)}, ...)"
    if bucket.high == bucket.low + 1:
        return f"[{_size(bucket.low)}]"
    return f"[{_size(bucket.low)}, {_size(bucket.high)})"


def statistics(distribution):
    """{count, min, max, mean, p50, p90, p99} of a Distribution."""
    mean = distribution.mean
    record = {"count": distribution.count, "min": distribution.minimum,
              "max": distribution.maximum,
              "mean": None if mean is None else round(mean, 3)}
    for percent in PERCENTILES:
        record[f"p{percent}"] = distribution.percentile(percent)
    return record


def histogram_text(distribution, title="", unit=""):
    """One histogram: the title line, the buckets with bars, the statistics line."""
    buckets = distribution.buckets()
    largest = max((bucket.count for bucket in buckets), default=0)
    labels = [bucket_label(bucket) for bucket in buckets]
    label_width = max([20, *map(len, labels)])
    count_width = max([8, *(len(str(bucket.count)) for bucket in buckets)])
    lines = [title] if title else []
    for label, bucket in zip(labels, buckets):
        bar = "@" * (bucket.count * BAR_WIDTH // largest) if largest else ""
        lines.append(f"{label:<{label_width}} {bucket.count:>{count_width}} "
                     f"|{bar:<{BAR_WIDTH}}|")
    stats = statistics(distribution)
    lines.append(", ".join(f"{name} {_shown(value)}" for name, value in stats.items())
                 + (f" ({unit})" if unit else ""))
    return "\n".join(lines) + "\n"


def _title(keys, values):
    return " ".join(f"{key.text}={_shown(value)}" for key, value in zip(keys, values))


def histograms_text(result, unit=""):
    """Every row of a HistogramResult or LatencyResult, separated by blank lines."""
    if not result.rows:
        return "no values\n"
    return "\n".join(histogram_text(distribution, _title(result.keys, values), unit)
                     for values, distribution in result.rows)


def histograms_json(result):
    lines = []
    for values, distribution in result.rows:
        record = {**_key_record(result.keys, values), **statistics(distribution),
                  "buckets": [{"low": bucket.low, "high": bucket.high, "count": bucket.count}
                              for bucket in distribution.buckets()]}
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


def latency_summary(result):
    """The pairing counts of a LatencyResult."""
    return {"pairs": result.pairs, "unmatched_ends": result.unmatched_ends,
            "open_starts": result.open_starts, "skipped_starts": result.skipped_starts}


def latency_summary_text(result):
    summary = latency_summary(result)
    return (f"{summary['pairs']} pairs, {summary['unmatched_ends']} unmatched ENDs, "
            f"{summary['open_starts']} STARTs still open, "
            f"{summary['skipped_starts']} STARTs skipped (an outer END came first)\n")
