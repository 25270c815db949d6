"""What the bench/ scripts share: the flood fixture, the tracers' environment,
and waiting for a figure to settle.

The flood benchmarks (count.py, trace.py) drive tests/fixtures/flood.c, as
built by the test suite, with the tests' own driver: importing this module
puts tests/ on sys.path, so they import ``Target`` (and ``summary_counts``,
the parser of sdtrace's summary line) from helpers.  ``[HITS]`` is their
one argument, which their main() reads (hits_argument); importing this module
reads no argument, since the other scripts' arguments are theirs.
"""
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

FLOOD = os.path.join(REPO, "tests", "fixtures", "build", "O2", "flood")

# As installed by pip: byte-compiled.  (This machine sets PYTHONDONTWRITEBYTECODE,
# which would make every run recompile sdtrace from source.)
ENVIRONMENT = {name: value for name, value in os.environ.items()
               if name != "PYTHONDONTWRITEBYTECODE"}


def hits_argument(default=1_000_000):
    """The flood benchmarks' one argument, [HITS], for their main() to read."""
    return int(sys.argv[1]) if len(sys.argv) > 1 else default


def require_flood():
    """Exit with a hint unless the test suite has built flood."""
    if not os.path.exists(FLOOD):
        sys.exit(f"{FLOOD} is not built: run the test suite once (bash .ci/run)")


def fire(flood, hits):
    """(hits fired with the semaphore up, loop nanoseconds) of a running flood (a helpers.Target)."""
    reply = flood.send(f"fire {hits}", timeout=600)
    return int(reply[0].split()[1]), int(reply.done)


def untraced_loop(flood, hits):
    """Nanoseconds of `hits` rounds of flood's loop with its semaphore at 0; exits if it is
    raised."""
    fired, loop_ns = fire(flood, hits)
    if fired:
        sys.exit("flood's semaphore is already raised: another tracer is attached; "
                 "run the benchmark on a quiet machine")
    return loop_ns


def settled(read, quiet=0.5, poll=0.05):
    """(read()'s value, the monotonic time it last changed) once it has not
    changed for `quiet` seconds, reading it every `poll` seconds."""
    value, changed = read(), time.monotonic()
    while time.monotonic() - changed < quiet:
        time.sleep(poll)
        current = read()
        if current != value:
            value, changed = current, time.monotonic()
    return value, changed


BUFFER_PAGES = 1 << 15          # 128 MiB per CPU: a whole burst of ~100-byte samples
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS    # utime, stime


def measure(flood, command, untraced_ns, ready, hits, environment=None):
    """Per-hit figures of one tracer attached to `flood` over `hits` hits (untraced_ns: the
    untraced loop's nanoseconds for as many); returns (figures, tracer stderr)."""
    tracer = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={**ENVIRONMENT, **(environment or {})})
    try:
        ready(tracer)
        before = cpu_seconds(tracer.pid)
        fired, loop_ns = fire(flood, hits)
        used = settled(lambda: cpu_seconds(tracer.pid))[0] - before
    finally:
        tracer.send_signal(signal.SIGINT)
        _out, err = tracer.communicate(timeout=600)
    if not fired:
        raise RuntimeError(f"{command[0]} did not raise the semaphore: {err}")
    in_target = (loop_ns - untraced_ns) / fired / 1000
    in_tracer = used / fired * 1e6
    return {"fired": fired, "in_target": in_target, "in_tracer": in_tracer,
            "total": in_target + in_tracer}, err


def wait_for_line(text):
    def ready(tracer):
        line = ""
        while text not in line:
            line = tracer.stderr.readline()
            if not line:
                raise RuntimeError(f"tracer exited before {text!r}")
    return ready


def bpftrace_ready(flood):
    def ready(tracer):
        deadline = time.monotonic() + 30
        while fire(flood, 1)[0] == 0:       # attached once a hit counts
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bpftrace did not attach: {tracer.stderr.read()}")
            time.sleep(0.05)
    return ready
