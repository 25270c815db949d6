"""``sdtrace threads``: every thread a JVM starts and ends, with its name (bcc's ``uthreads``).

Java (HotSpot) fires ``hotspot:thread__start`` and ``thread__stop`` with the
thread's name (a pointer and a length), its java.lang.Thread id, its OS
thread id and whether it is a daemon, for the JVM's own threads (GC, JIT,
Reference Handler...) as for the program's.  The name is an unterminated
string that only the bpf executor reads: on tracefs the tool ends with one
line saying so.  CPython 3.11 has no thread probe: a Python target is one
line naming that.
"""
import json
import sys
import time

from .runtimes import JAVA, PYTHON

HELP = "thread starts and ends, with names (like uthreads)"
DESCRIPTION = ("Show each thread a Java (HotSpot) process starts or ends: its name, OS thread "
               "id, Java thread id and whether it is a daemon. TARGET: a libjvm.so "
               "(system-wide, or with -p/-c as the objects to search). Needs the bpf executor "
               "(HotSpot's names are strings it alone reads).")
PROBES = ("thread__start", "thread__stop")
HEADER = (f"{'TIME(s)':>10} {'PID':>7}  {'EVENT':<5} {'TID':>7} {'JAVA-ID':>7}  "
          f"{'DAEMON':<6}  NAME\n")


def add_arguments(parser):
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")


def thread_line(record, as_json, started_ns):
    """The line (text or JSON) of one thread__start or thread__stop record."""
    from ..engine.events import ARGS, COMM, PID, SITE, TID, TS

    name, _length, java_id, native_id, daemon = record[ARGS]
    event = "start" if record[SITE].name == "thread__start" else "stop"
    daemon = None if daemon is None else bool(daemon)
    if as_json:
        return json.dumps({"ts": record[TS], "pid": record[PID], "tid": record[TID],
                           "comm": record[COMM], "event": event, "name": name,
                           "java_thread_id": java_id, "native_thread_id": native_id,
                           "daemon": daemon}) + "\n"
    shown = "?" if daemon is None else "yes" if daemon else "no"
    return (f"{(record[TS] - started_ns) / 1e9:>10.3f} {record[PID]:>7}  {event:<5} "
            f"{native_id!s:>7} {java_id!s:>7}  {shown:<6}  {name if name is not None else '?'}\n")


def run(args):
    from ..present import runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, (JAVA, PYTHON)), args)
    runtimes.no_probe_for(found, "thread")
    runtimes.require_bpf(args, "threads reads HotSpot's thread names")
    specs = [item.spec(probe) for item in found if item.runtime == JAVA for probe in PROBES]
    started_ns = time.monotonic_ns()

    def write(records):
        if records:
            sys.stdout.write("".join(thread_line(record, args.json, started_ns)
                                     for record in records))
            sys.stdout.flush()
    if not args.json:
        sys.stdout.write(HEADER)
    return runner.stream(args, specs, write).exit_status or 0
