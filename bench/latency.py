"""Benchmark: Python function latencies paired in the kernel against the same pairs from records.

Target: Debian's python3.11 running a script of nested calls (SCRIPT: three
functions, CALLS rounds) once it reads a line, so that both tracers attach to
the same process first:

  sdtrace latency --executor bpf      START and END paired in the kernel: a
                                      stack per thread and funcname, the
                                      durations counted in maps;
  sdtrace latency --executor tracefs  every hit a record, paired in Python.

Both take `--match funcname --by funcname -p PID python:function__entry
python:function__return` (the sessions raise python:line's semaphore
themselves, without arming it: CPython 3.11 fires function__entry for every
frame only while it is raised).  Both sessions hold the same uprobes at
once, so every hit runs both tracers' handlers, in the same order at START
and at END: the two measure the same calls, and each measures the other's
handler where it runs between its own two clock reads.  The kernel runs the
consumer attached last first, so tracefs attaches first: the bpf program
reads the clock first at every hit, with nothing of tracefs's inside its
durations, and tracefs's durations hold what the bpf program does at an
END beyond what it does at a START (pop and count against push), the same
for every function.  (In the other order tracefs's ring wake-ups, one per
so many samples, land inside bpf's durations: at the same hit of the
script's 8-hit cycle each time, so on one function.)  Per function: the
calls each counted (must be equal, and the script's own count) and the
total time each measured, their difference per call.  Also each tracer's
summary line.

Run as root: python3 bench/latency.py [CALLS]   (default 20,000)
"""
import json
import os
import signal
import subprocess
import sys

from common import ENVIRONMENT, wait_for_line
from helpers import SYSTEM_PYTHON, summary_counts  # common put tests/ on the path

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
SCRIPT = f"""
import sys
def leaf(x):
    return x + 1
def middle(x):
    return leaf(x) * 2
def outer(x):
    return middle(x) + leaf(x)
sys.stdin.readline()
for i in range({CALLS}):
    outer(i)
"""
EXPECTED = {"outer": CALLS, "middle": CALLS, "leaf": 2 * CALLS}
EXECUTORS = ("tracefs", "bpf")


def main():
    if not os.path.exists(SYSTEM_PYTHON):
        sys.exit(f"{SYSTEM_PYTHON} is not installed (apt-get install python3.11)")
    script = subprocess.Popen([SYSTEM_PYTHON, "-c", SCRIPT], stdin=subprocess.PIPE, text=True)
    tracers = {}
    try:
        for executor in EXECUTORS:
            tracers[executor] = subprocess.Popen(
                [sys.executable, "-m", "sdtrace", "latency", "--json", "--executor", executor,
                 "--buffer-pages", "4096", "--match", "funcname",
                 "--by", "funcname", "-p", str(script.pid), "python:function__entry",
                 "python:function__return"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
            wait_for_line("sdtrace: tracing")(tracers[executor])
        script.communicate("go\n", timeout=600)
        results = {}
        for executor, tracer in tracers.items():
            out, err = tracer.communicate(timeout=600)     # -p: ends with the process
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            results[executor] = ({row["funcname"]: row for row in rows if "funcname" in row},
                                 summary_counts(err))
    finally:
        for process in (script, *tracers.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=60)
    print(f"python3.11, {CALLS:,} rounds of outer -> middle -> leaf, leaf; both tracers on "
          "the same process at once")
    print(f"{'function':10} {'calls':>8} " + " ".join(
        f"{executor + ' calls':>14} {executor + ' total us':>16}" for executor in EXECUTORS)
        + f" {'difference/call ns':>19}")
    for name, calls in EXPECTED.items():
        rows = [results[executor][0].get(name, {}) for executor in EXECUTORS]
        totals = [row.get("mean", 0) * row.get("count", 0) for row in rows]
        counted = [row.get("count", 0) for row in rows]
        print(f"{name:10} {calls:8,} " + " ".join(
            f"{count:14,} {total / 1000:16,.1f}" for count, total in zip(counted, totals))
            + f" {(totals[0] - totals[1]) / max(1, calls):19.1f}")
    for executor in EXECUTORS:
        received, lost = results[executor][1]
        print(f"sdtrace --executor {executor}: {received:,} events, {lost:,} lost")


if __name__ == "__main__":
    main()
