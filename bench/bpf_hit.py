"""Benchmark: the cost of a hit with sdtrace's BPF executor, against the bare uprobe.

Target: the `flood` fixture (tests/fixtures/flood.c), flood:hit(long i,
const char *s) guarded by a semaphore and fired N times in a tight loop.
Every tracer attaches to the same running flood with -p (a pid filter), and
flood fires N hits, one tracer at a time:

  no tracing   the loop with the semaphore at 0: what the others add to;
  bare uprobe  the floor: an empty BPF program (`r0 = 0; exit`) on a
               uprobe_multi link with the pid filter and the semaphore's
               ref_ctr_offset, as the BPF executor arms its sites: trap,
               uprobe dispatch, program run, nothing else;
  BPF          `sdtrace trace --executor bpf --json -o FILE -p PID
               flood:hit(,str)`: the same link, the generated program, a
               record with an int and a string on the BPF ring buffer;
  tracefs      the same with `--executor tracefs`;
  bpftrace     if installed: an empty action (its own floor), and
               `@ = count()`, the counter it keeps in the kernel.

Per hit: in target (loop time - untraced loop time) / fired, in tracer (its
CPU time / fired), their total, and the in-target cost against the bare
uprobe's -- the figure the issue sets for the BPF executor (<= 1.6x).  The
machine has two cores that others share, and single bursts of this loop
vary by +-0.1 us: flood runs on CPU 0 and each tracer on CPU 1, each tracer
sees ROUNDS bursts of HITS / ROUNDS, the tracer drained between them, and
the in-target figure is the cheapest burst's (the untraced loop's too), the
least disturbed one.  (common.measure takes one burst; this file's
measure_bursts is its several-bursts twin, kept here since common.py is not
this bench's to change.)

Run as root after the test suite has built the fixtures:
    python3 bench/bpf_hit.py [HITS]        (default 1,000,000)
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from common import (ENVIRONMENT, FLOOD, REPO, bpftrace_ready, cpu_seconds, fire, hits_argument,
                    require_flood, settled, wait_for_line)
from helpers import Target, summary_counts  # the fixtures' driver (common put tests/ on the path)

BUFFER_PAGES = str(1 << 15)  # 128 MiB of ring per CPU: the whole burst fits, no loss by design
READY = "sdtrace: tracing"

FLOOR_DRIVER = f"""
import signal, sys
sys.path.insert(0, {REPO!r})
from sdtrace import read_probes
from sdtrace.engine.bpf.asm import R0, Assembler
from sdtrace.kernel.bpf import BPF_TRACE_UPROBE_MULTI, Program, UprobeMultiLink
[site] = [site for site in read_probes({FLOOD!r}) if site.name == "hit"]
code = Assembler()
code.mov(R0, 0)
code.exit()
program = Program(code.assemble(), "bare_uprobe", expected_attach_type=BPF_TRACE_UPROBE_MULTI)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
with UprobeMultiLink(program, site.file, [site.offset], [site.semaphore], [0], int(sys.argv[1])):
    sys.stderr.write("{READY}\\n")
    sys.stderr.flush()
    signal.sigwait([signal.SIGINT])
"""

ROUNDS = 5
FLOOD_CPU, TRACER_CPU = 0, 1    # flood and each tracer (its later threads too) on their own
FLOOR = "bare uprobe (empty BPF program)"
BPF = "sdtrace trace --executor bpf --json -o"
TRACEFS = "sdtrace trace --executor tracefs --json -o"


def untraced_ns_per_hit(flood, hits):
    """The cheapest of ROUNDS untraced bursts of hits / ROUNDS, in ns per round of flood's loop."""
    bursts = [fire(flood, hits // ROUNDS) for _ in range(ROUNDS)]
    if any(fired for fired, _loop_ns in bursts):
        sys.exit("flood's semaphore is already raised: another tracer is attached; "
                 "run the benchmark on a quiet machine")
    return min(loop_ns for _fired, loop_ns in bursts) / (hits // ROUNDS)


def measure_bursts(flood, command, untraced, ready, hits):
    """Per-hit figures of one tracer attached to `flood` over ROUNDS bursts of hits / ROUNDS
    (the cheapest burst's cost in the target; the tracer's CPU over all of them); (figures,
    its stderr)."""
    tracer = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    costs, fired = [], 0
    try:
        os.sched_setaffinity(tracer.pid, {TRACER_CPU})
        ready(tracer)
        started = cpu_seconds(tracer.pid)
        for _ in range(ROUNDS):
            burst, loop_ns = fire(flood, hits // ROUNDS)
            if not burst:
                raise RuntimeError(f"{command[0]} did not raise the semaphore")
            costs.append((loop_ns / burst - untraced) / 1000)
            fired += burst
            spent = settled(lambda: cpu_seconds(tracer.pid))[0] - started
    finally:
        tracer.send_signal(signal.SIGINT)
        _out, err = tracer.communicate(timeout=600)
    figures = {"fired": fired, "in_target": min(costs), "in_tracer": spent / fired * 1e6}
    return {**figures, "total": figures["in_target"] + figures["in_tracer"]}, err


def main():
    require_flood()
    hits = hits_argument()
    rows, summaries = {}, {}
    with Target(FLOOD, timeout=600) as flood, tempfile.TemporaryDirectory() as scratch:
        os.sched_setaffinity(flood.pid, {FLOOD_CPU})
        untraced = untraced_ns_per_hit(flood, hits)
        pid = str(flood.pid)
        rows[FLOOR], _ = measure_bursts(flood, [sys.executable, "-c", FLOOR_DRIVER, pid],
                                        untraced, wait_for_line(READY), hits)
        for name, executor in ((BPF, "bpf"), (TRACEFS, "tracefs")):
            rows[name], summaries[name] = measure_bursts(
                flood, [sys.executable, "-m", "sdtrace", "trace", "--executor", executor,
                        "--json", "--buffer-pages", BUFFER_PAGES, "-o",
                        os.path.join(scratch, f"{executor}.json"), "-p", pid,
                        "flood:hit(,str)"], untraced, wait_for_line(READY), hits)
        if shutil.which("bpftrace"):
            for name, action in (("bpftrace, empty action", ""),
                                 ("bpftrace, @ = count()", "@ = count();")):
                rows[name], _ = measure_bursts(
                    flood, ["bpftrace", "-p", pid, "-e", f"usdt:{FLOOD}:flood:hit {{ {action} }}"],
                    untraced, bpftrace_ready(flood), hits)
        else:
            rows["bpftrace (not installed: apt-get install bpftrace)"] = None
    floor = rows[FLOOR]["in_target"]
    print(f"{hits:,} hits of flood:hit(long, str) in {ROUNDS} bursts per tracer, the cheapest "
          f"burst's cost in target; us per hit; the floor is the bare uprobe")
    print(f"{'':40} {'in target':>10} {'in tracer':>10} {'total':>10} {'target/floor':>13}")
    print(f"{'no tracing (loop ' + format(untraced, '.1f') + ' ns/hit)':40} "
          f"{0:10.3f} {0:10.3f} {0:10.3f} {'-':>13}")
    for name, figures in rows.items():
        if figures is None:
            print(name)
            continue
        print(f"{name:40} {figures['in_target']:10.3f} {figures['in_tracer']:10.3f} "
              f"{figures['total']:10.3f} {figures['in_target'] / floor:12.2f}x")
    for name, stderr in summaries.items():
        written, lost = summary_counts(stderr)
        print(f"{name}: {written:,} written, {lost:,} lost of {rows[name]['fired']:,} fired")
    ratio = rows[BPF]["in_target"] / floor
    print(f"BPF executor: {ratio:.2f}x the bare uprobe in the program "
          f"(target <= 1.6x: {'met' if ratio <= 1.6 else 'NOT met'})")


if __name__ == "__main__":
    main()
