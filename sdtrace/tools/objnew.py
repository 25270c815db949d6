"""``sdtrace objnew``: allocations per class, with counts and bytes (bcc's ``uobjnew``).

Java (HotSpot) fires ``hotspot:object__alloc(java_thread_id, class_name,
class_name_len, size)`` for every object it allocates -- only in a JVM
started with -XX:+DTraceAllocProbes (providers.RUNTIME_RULES; the tool reads
a running JVM's flag, discovery/jvm.py, and --jvm-probes gives it to -c's
JVM).  The bpf executor counts per class in the kernel (a Count plan, or a
Histogram of ``size``, whose total is the bytes), so a JVM allocating
millions of objects a second is counted exactly; the class names are
strings only it reads (tracefs: one line saying so).

Bytes only where the runtime gives a size: HotSpot before 18 passes the size
on its slow path alone (the interpreter's and C1/C2's fast paths leave the
argument unset: 0, 4608 and 256M were seen for a 24-byte object;
JDK-8276209, fixed in 18), so for such a JVM the tool counts allocations
and says in one line why it shows no bytes.  CPython 3.11 has no allocation
probe: a Python target is one line naming that.
"""
import json
import sys

from .runtimes import JAVA, PYTHON

HELP = "allocations per class, with counts and bytes (like uobjnew)"
DESCRIPTION = ("Count the objects a Java (HotSpot) process allocates, per class, and their "
               "bytes where the JVM gives sizes (JDK 18 and later). The JVM must run with "
               "-XX:+DTraceAllocProbes (with -c, --jvm-probes adds it). TARGET: a libjvm.so "
               "(system-wide, or with -p/-c as the objects to search). Needs the bpf executor.")
PROBE = "object__alloc"
SIZES_FROM = 18      # the first JDK whose object__alloc size is right on every path
NO_SIZES = ("no bytes: HotSpot {release} passes object__alloc's size only on its slow path "
            "(JDK-8276209, fixed in 18)")


def add_arguments(parser):
    from .runtimes import add_jvm_probes_option

    parser.add_argument("--top", type=int, metavar="N", help="show the N classes allocated most")
    parser.add_argument("--sort", choices=("count", "bytes"), default="count",
                        help="order classes by allocations (default) or bytes")
    add_jvm_probes_option(parser)
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a file of the runtime (path, glob or library name)")


def java_release(args, found):
    """The JDK major version of the JVM the session reaches, or None if unknown."""
    import os
    import shlex

    from ..discovery import jvm, targets

    for item in found:
        if item.target is not None:
            for path in targets.resolve_target(item.target):
                return jvm.release(path)
    if args.pid is not None:
        located = jvm.libjvm(args.pid)
        return None if located is None or located[0] is None else jvm.release(located[0])
    home = args.command is not None and jvm.java_home(shlex.split(args.command)[0])
    return jvm.release(os.path.join(home, *jvm.LIBJVM)) if home else None


def rows(result, with_bytes):
    """[(class, count, bytes or None)] of a CountResult or HistogramResult."""
    if with_bytes:
        return [(values[0], distribution.count, distribution.total)
                for values, distribution in result.rows]
    return [(values[0], count, None) for values, count in result.rows]


def run(args):
    from ..present import aggregate, output, runner
    from . import runtimes

    found = runtimes.present(runtimes.find(args, (JAVA, PYTHON)), args)
    runtimes.no_probe_for(found, "allocation")
    found = [item for item in found if item.runtime == JAVA]
    runtimes.require_bpf(args, "objnew reads HotSpot's class names")
    runtimes.check_rules(args, found, (PROBE,), runner.warn)
    release = java_release(args, found)
    with_bytes = release is None or release >= SIZES_FROM
    if not with_bytes:
        runner.warn(NO_SIZES.format(release=release))
    keys = (aggregate.parse_key("class_name_ptr"),)
    plan = (aggregate.Histogram(aggregate.parse_key("size"), keys) if with_bytes
            else aggregate.Count(keys))
    result, session = runner.aggregate(args, [item.spec(PROBE) for item in found], plan)
    allocations = rows(result, with_bytes)
    if args.sort == "bytes" and with_bytes:
        allocations.sort(key=lambda row: (-row[2], row[0] or ""))
    allocations = allocations[:args.top] if args.top else allocations
    if args.json:
        sys.stdout.write("".join(json.dumps({"class": name, "count": count, "bytes": size})
                                 + "\n" for name, count, size in allocations))
    else:
        header = ["COUNT", *(["BYTES"] if with_bytes else []), "CLASS"]
        lines = [[str(count), *([str(size)] if with_bytes else []), name or "?"]
                 for name, count, size in allocations]
        sys.stdout.write(output.table(header, lines, right={0, 1} if with_bytes else {0})
                         + "\n")
    return session.exit_status or 0
