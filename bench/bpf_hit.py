"""Benchmark: the cost of a hit with sdtrace's BPF executor, against the bare uprobe.

Target: the `flood` fixture (tests/fixtures/flood.c), flood:hit(long i,
const char *s) guarded by a semaphore and fired N times in a tight loop.
Every tracer attaches to the same running flood with -p, streams an int
and a string per hit to a JSON-lines file (except the floor), and flood
fires N hits, one tracer at a time:

  bare      bpftrace with an empty action: trap, uprobe dispatch, an empty
            BPF program -- the floor for any tracer (if bpftrace is installed);
  bpf       sdtrace's BPF executor (engine/bpf: one uprobe_multi link with
            the pid filter, a generated program, the BPF ring buffer),
            records written as JSON lines by the small driver below -- the
            executor is not yet behind the CLI's --executor;
  tracefs   `sdtrace trace --json -o FILE -p PID flood:hit(,str)`.

Per hit: in target (loop time - untraced loop time) / fired, in tracer (its
CPU time / fired), their total, and the ratios of the in-target cost to the
floor's -- the figure the issue sets (<= 1.6x).

Run as root after the test suite has built the fixtures:
    python3 bench/bpf_hit.py [HITS]        (default 1,000,000)
"""
import os
import shutil
import sys
import tempfile

from common import (FLOOD, HITS, REPO, bpftrace_ready, measure, require_flood, untraced_loop,
                    wait_for_line)
from helpers import Target, summary_counts  # the fixtures' driver (common put tests/ on the path)

RING_BYTES = 256 << 20      # the whole burst of ~100-byte records fits: no loss by design

BPF_DRIVER = f"""
import json, signal, sys
sys.path.insert(0, {REPO!r})
from sdtrace import read_probes
from sdtrace.engine.bpf.executor import BpfExecutor
pid, output = int(sys.argv[1]), sys.argv[2]
sites = [site for site in read_probes({FLOOD!r}) if site.name == "hit"]
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
written = 0
with BpfExecutor(sites, types=[(None, "str")], pid=pid, ring_bytes={RING_BYTES}) as executor, \\
        open(output, "w") as sink:
    sys.stderr.write("sdtrace: tracing\\n")
    sys.stderr.flush()
    while True:
        records = executor.read(0.1)
        sink.writelines(json.dumps({{"ts": r.ts, "pid": r.pid, "tid": r.tid, "cpu": r.cpu,
                                     "comm": r.comm, "probe": "flood:hit", "file": {FLOOD!r},
                                     "args": list(r.args)}}) + "\\n" for r in records)
        written += len(records)
        if stop and not records:
            break
    lost = executor.lost()
sys.stderr.write(f"sdtrace: {{written}} events, {{lost}} lost\\n")
"""


def main():
    require_flood()
    rows, summaries = {}, {}
    with Target(FLOOD, timeout=600) as flood, tempfile.TemporaryDirectory() as scratch:
        untraced_ns = untraced_loop(flood)
        if shutil.which("bpftrace"):
            rows["bare uprobe (bpftrace, empty action)"], _ = measure(
                flood, ["bpftrace", "-p", str(flood.pid), "-e", f"usdt:{FLOOD}:flood:hit {{ }}"],
                untraced_ns, bpftrace_ready(flood))
        name = "sdtrace BPF executor, JSON to a file"
        rows[name], summaries[name] = measure(
            flood, [sys.executable, "-c", BPF_DRIVER, str(flood.pid),
                    os.path.join(scratch, "bpf.json")], untraced_ns,
            wait_for_line("sdtrace: tracing"))
        name = "sdtrace tracefs: trace --json -o FILE"
        rows[name], summaries[name] = measure(
            flood, [sys.executable, "-m", "sdtrace", "trace", "--json", "--buffer-pages",
                    str(1 << 15), "-o", os.path.join(scratch, "tracefs.json"), "-p",
                    str(flood.pid), "flood:hit(,str)"], untraced_ns,
            wait_for_line("sdtrace: tracing"))
    floor = rows.get("bare uprobe (bpftrace, empty action)")
    print(f"{HITS:,} hits of flood:hit(long, str), untraced loop {untraced_ns / HITS:.3f} ns/hit")
    print(f"{'':40} {'in target':>10} {'in tracer':>10} {'total':>10} {'target/floor':>13}"
          f"  (us/hit)")
    for name, figures in rows.items():
        ratio = f"{figures['in_target'] / floor['in_target']:12.2f}x" if floor else "-"
        print(f"{name:40} {figures['in_target']:10.3f} {figures['in_tracer']:10.3f} "
              f"{figures['total']:10.3f} {ratio:>13}")
    for name, stderr in summaries.items():
        written, lost = summary_counts(stderr)
        print(f"{name}: {written:,} written, {lost:,} lost of {rows[name]['fired']:,} fired")


if __name__ == "__main__":
    main()
