"""Benchmark: the cost of tracing, side by side with bpftrace, in one run.

Target: the `flood` fixture (tests/fixtures/flood.c), whose probe
flood:hit(long i, const char *s) is guarded by a semaphore and fired N times
in a tight loop; the program itself reports the loop's wall time.  Each
tracer attaches to a running flood with -p, so both pay the same costs.

  1. per-hit cost in the traced program: untraced (semaphore 0) versus
     `sdtrace trace --json -o FILE` with each executor versus bpftrace
     printf("%d %s", arg0, str(arg1)); (loop time - untraced loop time) / N,
     also as a ratio to the floor, bpftrace with an empty action (a bare
     uprobe: the trap and an empty program);
  2. lossless throughput: events written + lost versus hits, and the rate at
     which the tracer wrote them (events / time from the burst's start to the
     tracer's last write);
  3. start-to-armed latency: from spawning the tracer until the running
     process has both the semaphore raised and the int3 at the site (from
     then on, hits count).

Run as root: python3 bench/trace.py [HITS]  (default 1,000,000; bpftrace's
printf path is slow, so it gets HITS/10 and its per-hit figure is scaled).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import (ENVIRONMENT, FLOOD, fire, hits_argument, require_flood, settled,
                    untraced_loop)
from helpers import Target, address_of, read_mem, summary_counts  # common put tests/ on the path


def probe_armed(flood):
    """A test of both halves of flood's probe being armed: the semaphore
    raised and the int3 at the site (read from flood's memory)."""
    from sdtrace.discovery import notes

    [probe] = notes.read_probes(FLOOD)
    semaphore = address_of(flood.pid, FLOOD, probe.semaphore, "rw-p")
    site = address_of(flood.pid, FLOOD, probe.offset, "r-xp")
    return lambda: (int.from_bytes(read_mem(flood.pid, semaphore, 2), "little") > 0
                    and read_mem(flood.pid, site, 1) == b"\xcc")


def timed_fire(flood, hits):
    """(hits that fired, loop nanoseconds, monotonic start time in seconds)."""
    started = time.monotonic()
    return (*fire(flood, hits), started)


def start_tracer(command, flood, ready_text, stream):
    """Spawn a tracer; return (process, seconds until flood's probe was armed)."""
    is_armed = probe_armed(flood)
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stream,
                               stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    while not is_armed():
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {process.stderr.read()}")
        time.sleep(0.001)
    armed = time.monotonic() - started
    if ready_text:  # also wait until the tracer says it is reading
        while ready_text not in process.stderr.readline():
            pass
    return process, armed


def run_sdtrace(flood, untraced_ns, output, executor, hits):
    command = [sys.executable, "-m", "sdtrace", "trace", "--executor", executor, "--json",
               "-o", output, "-p", str(flood.pid), "flood:hit(,str)"]
    process, armed = start_tracer(command, flood, "sdtrace: tracing", subprocess.DEVNULL)
    fired, elapsed, started = timed_fire(flood, hits)
    last_write = last_growth(output)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    written, lost = summary_counts(err)
    return {"per_hit_us": (elapsed - untraced_ns) / fired / 1000, "fired": fired,
            "written": written, "lost": lost, "rate": written / (last_write - started),
            "armed_ms": armed * 1000}


def run_bpftrace(flood, untraced_ns, output, action, untraced_hits):
    """bpftrace with `action`: printf of both arguments (a tenth of the untraced loop's
    hits: its printf path is slow), or nothing at all, the floor: a bare uprobe's trap and
    BPF program."""
    hits = max(1, untraced_hits // 10) if action else untraced_hits
    program = f'usdt:{FLOOD}:flood:hit {{ {action} }}'
    with open(output, "w") as stream:
        process, armed = start_tracer(["bpftrace", "-p", str(flood.pid), "-e", program],
                                      flood, None, stream)
        time.sleep(0.5)   # bpftrace's reader starts after its semaphore write
        fired, elapsed, started = timed_fire(flood, hits)
        last_write = last_growth(output)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    with open(output) as events:
        written = sum(1 for line in events if line[:1].isdigit()) if action else fired
    untraced_share = untraced_ns * hits / untraced_hits
    return {"per_hit_us": (elapsed - untraced_share) / fired / 1000, "fired": fired,
            "written": written, "lost": fired - written, "rate": written / (last_write - started),
            "armed_ms": armed * 1000}


def last_growth(path):
    """The time of the file's last growth, once it has not grown for half a second."""
    return settled(lambda: os.path.getsize(path), poll=0.02)[1]


def main():
    require_flood()
    hits = hits_argument()
    with Target(FLOOD, timeout=600) as flood:
        untraced_ns = untraced_loop(flood, hits)
        results = {}
        with tempfile.TemporaryDirectory() as scratch:
            if shutil.which("bpftrace"):
                results[FLOOR] = run_bpftrace(
                    flood, untraced_ns, os.path.join(scratch, "empty.txt"), "", hits)
            for executor in ("bpf", "tracefs"):
                results[f"sdtrace --executor {executor}"] = run_sdtrace(
                    flood, untraced_ns, os.path.join(scratch, f"{executor}.json"), executor, hits)
            if shutil.which("bpftrace"):
                results["bpftrace printf+str()"] = run_bpftrace(
                    flood, untraced_ns, os.path.join(scratch, "bpftrace.txt"),
                    'printf("%d %s\\n", arg0, str(arg1));', hits)
    floor = results.get(FLOOR, {}).get("per_hit_us")
    print(f"flood:hit(long, str), {hits:,} hits to a JSON file; untraced loop "
          f"{untraced_ns / hits:.3f} ns/hit; x floor: per-hit cost / {FLOOR}'s")
    print(f"{'tracer':30} {'µs/hit':>8} {'x floor':>8} {'fired':>10} {'written':>10} "
          f"{'lost':>9} {'events/s':>10} {'armed ms':>9}")
    for name, row in results.items():
        ratio = f"{row['per_hit_us'] / floor:8.2f}" if floor else f"{'-':>8}"
        print(f"{name:30} {row['per_hit_us']:8.2f} {ratio} {row['fired']:10,} "
              f"{row['written']:10,} {row['lost']:9,} {row['rate']:10,.0f} "
              f"{row['armed_ms']:9.0f}")
    bpf, tracefs = results["sdtrace --executor bpf"], results["sdtrace --executor tracefs"]
    print(f"bpf / tracefs executor: throughput {bpf['rate'] / tracefs['rate']:.2f}x, "
          f"per-hit cost {bpf['per_hit_us'] / tracefs['per_hit_us']:.2f}x")


FLOOR = "bpftrace (empty action)"


if __name__ == "__main__":
    main()
