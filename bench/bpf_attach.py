"""Benchmark: arming and disarming every SDT site of libjvm.so (531), side by side.

Each tracer arms all of libjvm's sites system-wide, traces for 1 s (nothing
runs the JVM, so no hits) and disarms; the figure is the whole command's
wall time minus that second, and for sdtrace's BPF executor also the
attach and the detach alone, timed in its own process:

  * sdtrace's BPF executor: one program and one uprobe_multi link for the
    file (the kernel registers and releases the 531 uprobes as one);
  * sdtrace's tracefs executor: `sdtrace trace -d 1 LIBJVM:*:*`, one
    tracefs uprobe and perf event per site and CPU;
  * bpftrace, if installed: `usdt:LIBJVM:*:*` with a count and an exit after 1 s.

Usage: python bench/bpf_attach.py   (SKIP_TRACEFS=1 leaves out the tracefs run, ~40 s)
"""
import os
import shutil
import subprocess
import sys
import time

from common import ENVIRONMENT, REPO

LIBJVM = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"
TRACE_SECONDS = 1.0

BPF_SCRIPT = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from sdtrace import read_probes
from sdtrace.engine.bpf.executor import BpfExecutor
sites = read_probes({LIBJVM!r})
started = time.monotonic()
executor = BpfExecutor(sites)
attached = time.monotonic()
time.sleep({TRACE_SECONDS})
closing = time.monotonic()
executor.close()
print(len(sites), attached - started, time.monotonic() - closing)
"""


def whole(command, **environment):
    """Wall seconds of `command` minus the traced second; exits on failure."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**ENVIRONMENT, **environment})
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed: {result.stderr.strip()[-300:]}")
    return elapsed - TRACE_SECONDS, result.stdout


def main():
    if os.geteuid() != 0:
        sys.exit("run as root: arming uprobes needs it")
    if not os.path.exists(LIBJVM):
        sys.exit(f"{LIBJVM} is not installed (apt-get install openjdk-17-jre-headless)")
    rows = []
    seconds, output = whole([sys.executable, "-c", BPF_SCRIPT])
    sites, attach, detach = output.split()
    rows.append((f"sdtrace BPF executor ({sites} sites, one link)", seconds,
                 f"attach {float(attach):.3f} s, detach {float(detach):.3f} s"))
    if not os.environ.get("SKIP_TRACEFS"):
        seconds, _ = whole([sys.executable, "-m", "sdtrace", "trace", "-d", str(TRACE_SECONDS),
                            f"{LIBJVM}:*:*"])
        rows.append(("sdtrace tracefs executor (trace -d 1)", seconds, ""))
    bpftrace = shutil.which("bpftrace")
    if bpftrace is not None:
        program = (f"usdt:{LIBJVM}:*:* {{ @hits = count(); }} "
                   f"interval:s:1 {{ exit(); }}")
        # bpftrace 0.17 makes one program and probe per site and refuses more than 512 of each
        seconds, _ = whole([bpftrace, "-e", program], BPFTRACE_MAX_BPF_PROGS="2048", BPFTRACE_MAX_PROBES="2048")
        rows.append(("bpftrace usdt:LIBJVM:*:* (exit after 1 s)", seconds, ""))
    else:
        rows.append(("bpftrace", None, "not installed (apt-get install bpftrace)"))
    print(f"{'arm + disarm all libjvm.so sites':<46} {'seconds':>8}  notes")
    for name, value, notes in rows:
        shown = "-" if value is None else f"{value:8.3f}"
        print(f"{name:<46} {shown:>8}  {notes}")


if __name__ == "__main__":
    main()
