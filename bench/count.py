"""Benchmark: the per-hit cost of `sdtrace count --by arg0` versus bpftrace's map count.

Target: the `flood` fixture (tests/fixtures/flood.c): flood:hit(long i,
const char *s) guarded by a semaphore, fired N times in a tight loop; flood
reports "fired K" (hits seen with the semaphore raised) and the loop's wall
time.  Every tracer attaches to the same running flood with -p, then flood
fires N hits, one tracer at a time:

  untraced   semaphore 0: the loop skips the probe (the baseline);
  bare       bpftrace with an empty action: the breakpoint trap, the uprobe
             dispatch and an empty BPF program -- the floor for any tracer;
  bpftrace   usdt:FLOOD:flood:hit { @[arg0] = count(); } (the map sized for
             N keys: arg0 runs 0..N-1, so every hit is a new key);
  sdtrace    sdtrace count -p PID flood:hit with the BPF executor, which
             counts in the kernel, in each of its maps: --by arg0 (a per-CPU
             array slot per value, --max-keys N), --by probe (a slot per
             site), --by comm,arg0 (a per-CPU hash); and --by arg0 with the
             tracefs executor, which counts records in Python.

Per tracer, per hit:
  in target  (loop time - untraced loop time) / fired: what the traced
             program pays (trap, handler, the perf sample or map update);
  in tracer  the tracer's CPU time (user + system, /proc/PID/stat) from
             before the burst until it has consumed everything, / fired:
             what the tracer process pays to aggregate (bpftrace: ~0, the
             kernel did it);
  total      the sum; ratios are of totals.  Printing the final table or
             map is not included for either.

The tracefs executor's count is only meaningful without loss: its ring is
sized to hold the whole burst (--buffer-pages), and the lost count is
printed.  Then PRODUCERS floods fire N hits each at once, counted
system-wide by sdtrace (in the kernel) and by bpftrace's @ = count(): both
totals must be PRODUCERS x N.

Run as root after the test suite has built the fixtures:
    python3 bench/count.py [HITS]        (default 1,000,000)
"""
import re
import shutil
import signal
import subprocess
import sys

from common import (ENVIRONMENT, FLOOD, bpftrace_ready, hits_argument, measure, require_flood,
                    untraced_loop, wait_for_line)
from helpers import Target, at_once, summary_counts  # the fixtures' driver (common put tests/ on the path)

BUFFER_PAGES = 1 << 15          # 128 MiB per CPU: a whole burst of ~100-byte samples


def sdtrace_aggregate(flood, untraced_ns, hits, *options):
    """sdtrace count, or hist if `options` name an --arg, measured on `flood` over `hits`."""
    command = "hist" if "--arg" in options else "count"
    return measure(flood, [sys.executable, "-m", "sdtrace", command, *options,
                           "--buffer-pages", str(BUFFER_PAGES), "-p", str(flood.pid),
                           "flood:hit"], untraced_ns, wait_for_line("sdtrace: tracing"), hits)


def per_hit_costs(hits):
    """{row: figures}, {row: sdtrace's stderr}: each tracer on one flood, one at a time,
    over `hits` hits."""
    rows, errs = {}, {}
    with Target(FLOOD, timeout=600) as flood:
        untraced_ns = untraced_loop(flood, hits)
        probe = f"usdt:{FLOOD}:flood:hit"
        if shutil.which("bpftrace"):
            rows[FLOOR], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e", f"{probe} {{ }}"], untraced_ns,
                bpftrace_ready(flood), hits)
            rows["bpftrace @[arg0] = count()"], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e",
                        f"{probe} {{ @[arg0] = count(); }}"], untraced_ns, bpftrace_ready(flood),
                hits, {"BPFTRACE_MAP_KEYS_MAX": str(hits + 4096)})
            rows["bpftrace @ = hist(arg0)"], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e",
                        f"{probe} {{ @ = hist(arg0); }}"], untraced_ns, bpftrace_ready(flood),
                hits)
        keys = str(hits + 4096)
        for name, options in (
                ("count --by arg0 (bpf: per-CPU array slot)", ("--by", "arg0", "--max-keys", keys)),
                ("count --by probe (bpf: per-CPU array slot)", ("--by", "probe")),
                ("count --by comm,arg0 (bpf: per-CPU hash)",
                 ("--by", "comm,arg0", "--max-keys", keys)),
                ("count --by arg0 --executor tracefs", ("--by", "arg0", "--executor", "tracefs")),
                ("hist --arg 0 (bpf: log-linear buckets)", ("--arg", "0"))):
            rows[f"sdtrace {name}"], errs[f"sdtrace {name}"] = sdtrace_aggregate(
                flood, untraced_ns, hits, *options)
    return rows, errs


def exactness(hits):
    """(sdtrace's total and lost, bpftrace's total) of PRODUCERS floods firing `hits` each at
    once, counted system-wide."""
    floods = [Target(FLOOD, timeout=600) for _ in range(PRODUCERS)]
    for flood in floods:
        flood.start()
    try:
        results = {}
        tracers = {"sdtrace": [sys.executable, "-m", "sdtrace", "count", "--json",
                               f"{FLOOD}:flood:hit"],
                   "bpftrace": ["bpftrace", "-e", f"usdt:{FLOOD}:flood:hit {{ @ = count(); }}"]}
        for name, command in tracers.items():
            if not shutil.which(command[0]) and name == "bpftrace":
                continue
            tracer = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
            if name == "sdtrace":
                wait_for_line("sdtrace: tracing")(tracer)
            else:
                bpftrace_ready(floods[0])(tracer)
            at_once(floods, f"fire {hits}", timeout=600)
            tracer.send_signal(signal.SIGINT)
            out, err = tracer.communicate(timeout=600)
            if name == "sdtrace":
                results[name] = summary_counts(err)
            else:
                # less the one hit bpftrace_ready fired to see it attached
                results[name] = (int(re.search(r"@: (\d+)", out).group(1)) - 1, None)
        return results
    finally:
        for flood in floods:
            flood.stop()


def main():
    require_flood()
    hits = hits_argument()
    rows, errs = per_hit_costs(hits)
    floor = rows.get(FLOOR, {}).get("in_target")
    print(f"{hits:,} hits of flood:hit (arg0 runs 0..N-1: every hit a new key), per hit (us); "
          f"x floor: in target / {FLOOR}'s")
    print(f"{'':52} {'in target':>10} {'in tracer':>10} {'total':>10} {'x floor':>8}")
    for name, figures in rows.items():
        ratio = f"{figures['in_target'] / floor:8.2f}" if floor else f"{'-':>8}"
        print(f"{name:52} {figures['in_target']:10.3f} {figures['in_tracer']:10.3f} "
              f"{figures['total']:10.3f} {ratio}")
    for name, err in errs.items():
        received, lost = summary_counts(err)
        print(f"{name}: {received:,} counted, {lost:,} lost")
    exact = exactness(hits)
    print(f"{PRODUCERS} floods x {hits:,} hits at once, counted system-wide "
          f"(expected {PRODUCERS * hits:,}):")
    for name, (total, lost) in exact.items():
        print(f"  {name}: {total:,}" + ("" if lost is None else f" counted, {lost:,} lost"))


FLOOR = "bare uprobe (bpftrace, empty action)"
PRODUCERS = 4


if __name__ == "__main__":
    main()
