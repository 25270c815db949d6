"""Benchmark: arming and disarming libjvm.so's SDT sites (531), side by side.

Each tracer arms sites of libjvm.so system-wide, traces for 1 s (nothing runs
the JVM, so no hits) and disarms; the figure is the whole command's wall time
minus that second:

  * `sdtrace trace --executor bpf -d 1 LIBJVM:*:*`: one program and one
    uprobe_multi link for the file (the kernel registers and releases the
    uprobes as one), on all 531 sites -- the figure the issue sets (<= 1.5
    s) -- with the attach and the detach alone from its --debug log; and on
    the peers' sites, the "vs BPF" column's reference;
  * `sdtrace trace --executor tracefs -d 1 LIBJVM:PROVIDER:NAME...`, one
    tracefs uprobe and perf event per site and CPU;
  * bpftrace, if installed: `usdt:LIBJVM:PROVIDER:NAME,... { @ = count(); }`
    with an exit after 1 s (one program and probe per site).

The peers release their uprobes one at a time, each after an RCU grace
period, so all 531 sites take them 40 to 60 s each.  To keep the run near a
minute they arm the probes holding libjvm's first PEER_SITES sites (default
128, in file order, whole probes), and their figure for all 531 is
extrapolated from seconds per site, marked "est."; with PEER_SITES 531
(about two minutes) every row is measured.

Usage: python bench/bpf_attach.py [PEER_SITES]
"""
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

from common import ENVIRONMENT, REPO
from helpers import LIBJVM  # common put tests/ on the path

TRACE_SECONDS = 1.0
BPF_ROW = "sdtrace trace --executor bpf"
PEER_SITES = int(sys.argv[1]) if len(sys.argv) > 1 else 128

def whole(command, **environment):
    """(wall seconds of `command` minus the traced second, its stderr); exits on failure."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**ENVIRONMENT, **environment})
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed: {result.stderr.strip()[-300:]}")
    return elapsed - TRACE_SECONDS, result.stderr


def run_sdtrace(executor, specs):
    """(sites, seconds, notes) of `sdtrace trace --executor EXECUTOR -d 1 SPECS`, the
    attach and detach times its --debug log gives in the notes."""
    seconds, log = whole([sys.executable, "-m", "sdtrace", "trace", "--debug", "--executor",
                          executor, "-d", str(TRACE_SECONDS), *specs])
    attached = re.search(r"attached (\d+) site\(s\) with the \w+ executor in ([\d.]+) s", log)
    detached = re.search(r"detached in ([\d.]+) s", log)
    return (int(attached.group(1)), seconds,
            f"attach {float(attached.group(2)):.3f} s, detach {float(detached.group(1)):.3f} s")


def first_probes(sites, wanted):
    """The probes (provider, name) holding libjvm's first `wanted` sites in file order,
    whole probes; and how many sites they hold."""
    per_probe = Counter((site.provider, site.name) for site in sites)
    chosen = []
    for site in sorted(sites, key=lambda site: site.offset):
        if sum(per_probe[probe] for probe in chosen) >= wanted:
            break
        if (site.provider, site.name) not in chosen:
            chosen.append((site.provider, site.name))
    return chosen, sum(per_probe[probe] for probe in chosen)


def main():
    if os.geteuid() != 0:
        sys.exit("run as root: arming uprobes needs it")
    if not os.path.exists(LIBJVM):
        sys.exit(f"{LIBJVM} is not installed (apt-get install openjdk-17-jre-headless)")
    sys.path.insert(0, REPO)
    from sdtrace import read_probes
    sites = read_probes(LIBJVM)
    total = len(sites)
    probes, peer_sites = first_probes(sites, min(PEER_SITES, total))
    every = peer_sites == total
    rows = []                       # (name, sites, seconds, notes)
    chosen = [("*", "*")] if every else probes
    specs = [f"{LIBJVM}:{provider}:{name}" for provider, name in chosen]
    rows.append((BPF_ROW, *run_sdtrace("bpf", [f"{LIBJVM}:*:*"])))
    if not every:
        rows.append((BPF_ROW, *run_sdtrace("bpf", specs)))
    rows.append(("sdtrace trace --executor tracefs", *run_sdtrace("tracefs", specs)))
    bpftrace = shutil.which("bpftrace")
    if bpftrace is not None:
        points = ",".join(f"usdt:{LIBJVM}:{provider}:{name}" for provider, name in chosen)
        program = f"{points} {{ @ = count(); }} interval:s:1 {{ exit(); }}"
        # bpftrace 0.17 makes one program and probe per site and refuses more than 512 of each
        seconds, _ = whole([bpftrace, "-e", program], BPFTRACE_MAX_BPF_PROGS="2048",
                           BPFTRACE_MAX_PROBES="2048")
        rows.append(("bpftrace usdt:... (exit after 1 s)", peer_sites, seconds, ""))
    else:
        rows.append(("bpftrace (not installed: apt-get install bpftrace)", 0, None, ""))
    bpf_seconds = {count: seconds for name, count, seconds, _notes in rows
                   if name == BPF_ROW}
    print("arm + disarm libjvm.so's SDT sites, system-wide, 1 s traced in between (left out)")
    print(f"{'':46} {'sites':>5} {'seconds':>8} {'vs BPF':>8} {'all ' + str(total):>11}  notes")
    for name, count, seconds, notes in rows:
        if seconds is None:
            print(name)
            continue
        if count == total:
            everything = f"{seconds:.3f}"
        elif name == BPF_ROW:
            everything = "-"        # its cost does not grow with the sites: measured above
        else:
            everything = f"{seconds / count * total:.1f} est."
        print(f"{name:46} {count:5} {seconds:8.3f} {seconds / bpf_seconds[count]:7.1f}x "
              f"{everything:>11}  {notes}")
    verdict = "met" if bpf_seconds[total] <= 1.5 else "NOT met"
    print(f"BPF executor, all {total} sites: {bpf_seconds[total]:.3f} s "
          f"(target <= 1.5 s: {verdict})")


if __name__ == "__main__":
    main()
