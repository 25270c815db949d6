"""What a HotSpot JVM runs with: the values of its DTrace flags, and its release.

HotSpot fires method__entry/return, object__alloc and the monitor probes only
when a flag turned them on at start (providers.RUNTIME_RULES).  Where the
values come from, best first:

1. **the JVM's memory** (``running_flags``): each flag is a global bool of
   libjvm.so (``DTraceAllocProbes`` ...).  Debian's libjvm.so keeps them in
   its ``.symtab`` (``nm -D`` shows none: they are not exported), so their
   addresses are the symbols' plus the library's load bias, read through
   /proc/PID/mem.  This is the value HotSpot tests, whatever set it;
2. where the symbols are stripped, **the options the JVM was started with**
   (``option_flags``): /proc/PID/cmdline up to the main class (or -jar, -m),
   and the variables HotSpot and the java launcher read, from
   /proc/PID/environ: JAVA_TOOL_OPTIONS (before the command line),
   JDK_JAVA_OPTIONS (the launcher's, before the command line too) and
   _JAVA_OPTIONS (after it); the last setting of a flag wins, and
   -XX:+ExtendedDTraceProbes sets the three flags.  -XX:Flags= and
   -XX:VMOptionsFile= files are not read.

For a command not started yet, ``option_flags`` reads its argv and this
process's environment.  ``release`` reads the JDK's ``release`` file next to
libjvm.so (lib/server/libjvm.so -> release): HotSpot before 18 passes
object__alloc's size only on its slow path (JDK-8276209), so the tools need
the major version.
"""
import os
import re
import shlex

from .providers import EXTENDED_JVM_FLAG, JVM_FLAG, RUNTIME_RULES

# the variables read for options, in the order HotSpot applies them around the command line
BEFORE_COMMAND_LINE = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS")
AFTER_COMMAND_LINE = ("_JAVA_OPTIONS",)
FLAGS = tuple(sorted({rule.setting for rules in RUNTIME_RULES.values()
                      for rule in rules.values() if rule.kind == JVM_FLAG}))
_XX_BOOLEAN = re.compile(r"-XX:([+-])(\w+)$")
# launcher options whose value is the next argument; -jar and -m end the options
_WITH_VALUE = {"-cp", "-classpath", "--class-path", "-p", "--module-path",
               "--upgrade-module-path", "--add-modules", "--limit-modules", "--add-reads",
               "--add-exports", "--add-opens", "--patch-module", "--enable-native-access"}
_LAST_OPTION = {"-jar", "-m", "--module"}
LIBJVM = ("lib", "server", "libjvm.so")       # in a JDK's home (JDK 9 and later)


def _settings(words, values):
    """Applies the -XX:+/-FLAG words of `words` to `values` ({flag: bool}), in order."""
    for word in words:
        match = _XX_BOOLEAN.match(word)
        if match is None:
            continue
        on, name = match[1] == "+", match[2]
        for flag in FLAGS if name == EXTENDED_JVM_FLAG else (name,):
            if flag in FLAGS:
                values[flag] = on


def _launcher_options(argv):
    """The JVM options of a java command line: its words up to the main class."""
    options, words = [], iter(argv[1:])
    for word in words:
        if not word.startswith("-"):
            break
        options.append(word)
        if word in _LAST_OPTION:
            break
        if word in _WITH_VALUE:
            next(words, None)
    return options


def option_flags(argv, environ):
    """{flag: bool} of the FLAGS that `argv` and the option variables of `environ`
    ({name: value}) set, each False unless set."""
    values = dict.fromkeys(FLAGS, False)
    for name in BEFORE_COMMAND_LINE:
        _settings(shlex.split(environ.get(name, "")), values)
    _settings(_launcher_options(argv), values)
    for name in AFTER_COMMAND_LINE:
        _settings(shlex.split(environ.get(name, "")), values)
    return values


def libjvm(pid):
    """(path as this process can open it, its first Mapping) of the libjvm.so that
    process `pid` maps, or None."""
    from ..kernel.procfs import mapped_files, read_maps
    from .targets import mapped_path

    for mapping in mapped_files(read_maps(pid)).values():
        if os.path.basename(mapping.path) == "libjvm.so":
            return mapped_path(pid, mapping), mapping
    return None


def _memory_flags(pid, path, mapping):
    """{flag: bool} read from the JVM's memory, or None if libjvm.so has no symbols for them."""
    from ..kernel.procmem import ProcessMemory
    from .elf import PT_LOAD, ElfFile

    with ElfFile(path) as elf:
        addresses = elf.symbol_values(FLAGS)
        first = min((item for item in elf.segments if item.type == PT_LOAD),
                    key=lambda item: item.offset, default=None)
    if set(addresses) != set(FLAGS) or first is None or mapping.offset != first.offset:
        return None
    bias = mapping.start - (first.vaddr - first.vaddr % os.sysconf("SC_PAGE_SIZE"))
    memory = ProcessMemory(pid, writable=False)
    try:
        return {flag: memory.read(bias + address, 1) != b"\0"
                for flag, address in addresses.items()}
    finally:
        memory.close()


def running_flags(pid):
    """({flag: bool}, where they were read) for the JVM of process `pid`, or (None, why)
    if it runs no libjvm.so."""
    from ..kernel.procfs import read_proc

    found = libjvm(pid)
    if found is None:
        return None, f"process {pid} maps no libjvm.so"
    path, mapping = found
    if path is not None:
        values = _memory_flags(pid, path, mapping)
        if values is not None:
            return values, "its memory"
    argv = [word.decode("utf-8", "surrogateescape")
            for word in read_proc(pid, "cmdline").split(b"\0")[:-1]]
    environ = dict(entry.decode("utf-8", "surrogateescape").partition("=")[::2]
                   for entry in read_proc(pid, "environ").split(b"\0") if entry)
    return option_flags(argv, environ), "its command line and environment"


def java_home(program):
    """The JDK (or JRE) home whose launcher `program` (a path, or a name looked up in
    $PATH) is: the directory above its bin/ that holds lib/server/libjvm.so; or None."""
    import shutil

    found = shutil.which(program)
    if found is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(found)))
    return home if os.path.isfile(os.path.join(home, *LIBJVM)) else None


def release(libjvm_path):
    """The JDK's major version (17) from the release file of `libjvm_path`, or None."""
    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(libjvm_path))))
    try:
        with open(os.path.join(home, "release"), encoding="utf-8", errors="replace") as text:
            for line in text:
                name, _, value = line.partition("=")
                if name.strip() == "JAVA_VERSION":
                    major = value.strip().strip('"').split(".")[0]
                    return int(major) if major.isdecimal() else None
    except OSError:
        return None
    return None
