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
  sdtrace    sdtrace count --by arg0 -p PID flood:hit.

Per tracer, per hit:
  in target  (loop time - untraced loop time) / fired: what the traced
             program pays (trap, handler, the perf sample or map update);
  in tracer  the tracer's CPU time (user + system, /proc/PID/stat) from
             before the burst until it has consumed everything, / fired:
             what the tracer process pays to aggregate (bpftrace: ~0, the
             kernel did it);
  total      the sum; ratios are of totals.  Printing the final table or
             map is not included for either.

sdtrace's count is only meaningful without loss: its ring is sized to hold
the whole burst (--buffer-pages), and the lost count is printed.

Run as root after the test suite has built the fixtures:
    python3 bench/count.py [HITS]        (default 1,000,000)
"""
import shutil
import sys

from common import (FLOOD, HITS, bpftrace_ready, measure, require_flood, untraced_loop,
                    wait_for_line)
from helpers import Target, summary_counts  # the fixtures' driver (common put tests/ on the path)

BUFFER_PAGES = 1 << 15          # 128 MiB per CPU: a whole burst of ~100-byte samples


def main():
    require_flood()
    rows = {}
    with Target(FLOOD, timeout=600) as flood:
        untraced_ns = untraced_loop(flood)
        probe = f"usdt:{FLOOD}:flood:hit"
        if shutil.which("bpftrace"):
            rows["bare uprobe (bpftrace, empty action)"], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e", f"{probe} {{ }}"], untraced_ns,
                bpftrace_ready(flood))
            rows["bpftrace @[arg0] = count()"], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e",
                        f"{probe} {{ @[arg0] = count(); }}"], untraced_ns, bpftrace_ready(flood),
                {"BPFTRACE_MAP_KEYS_MAX": str(HITS + 4096)})
        rows["sdtrace count --by arg0"], err = measure(
            flood, [sys.executable, "-m", "sdtrace", "count", "--by", "arg0", "--buffer-pages",
                    str(BUFFER_PAGES), "-p", str(flood.pid), "flood:hit"], untraced_ns,
            wait_for_line("sdtrace: tracing"))
    received, lost = summary_counts(err)
    print(f"{HITS:,} hits of flood:hit, untraced loop {untraced_ns / HITS:.3f} ns/hit")
    print(f"{'':40} {'in target':>10} {'in tracer':>10} {'total':>10}  (us/hit)")
    for name, figures in rows.items():
        print(f"{name:40} {figures['in_target']:10.3f} {figures['in_tracer']:10.3f} "
              f"{figures['total']:10.3f}")
    print(f"sdtrace received {received:,} events, lost {lost:,}")
    sdtrace = rows["sdtrace count --by arg0"]["total"]
    for name in ("bpftrace @[arg0] = count()", "bare uprobe (bpftrace, empty action)"):
        if name in rows:
            print(f"sdtrace / {name}: {sdtrace / rows[name]['total']:.2f}x")


if __name__ == "__main__":
    main()
