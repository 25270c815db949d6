"""What the bench/ scripts share: the flood fixture, the tracers' environment,
and waiting for a figure to settle.

The flood benchmarks (count.py, trace.py) drive tests/fixtures/flood.c, as
built by the test suite, with the tests' own driver: importing this module
puts tests/ on sys.path, so they import ``Target`` (and ``summary_counts``,
the parser of sdtrace's summary line) from helpers.  ``[HITS]`` is their
one argument.
"""
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

FLOOD = os.path.join(REPO, "tests", "fixtures", "build", "O2", "flood")
HITS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000

# As installed by pip: byte-compiled.  (This machine sets PYTHONDONTWRITEBYTECODE,
# which would make every run recompile sdtrace from source.)
ENVIRONMENT = {name: value for name, value in os.environ.items()
               if name != "PYTHONDONTWRITEBYTECODE"}


def require_flood():
    """Exit with a hint unless the test suite has built flood."""
    if not os.path.exists(FLOOD):
        sys.exit(f"{FLOOD} is not built: run the test suite once (bash .ci/run)")


def fire(flood, hits):
    """(hits fired with the semaphore up, loop nanoseconds) of a running flood (a helpers.Target)."""
    reply = flood.send(f"fire {hits}", timeout=600)
    return int(reply[0].split()[1]), int(reply.done)


def untraced_loop(flood):
    """Nanoseconds of HITS rounds of flood's loop with its semaphore at 0; exits if it is raised."""
    fired, loop_ns = fire(flood, HITS)
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
