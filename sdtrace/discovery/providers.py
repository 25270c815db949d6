"""Names and types of the arguments of well-known USDT providers.

An SDT note says only where each argument is and how wide it is (``8@%rax``),
not what it means: a ``const char *`` query string and a 64-bit counter look
the same.  The projects that ship probes document them, and this module
carries those definitions for the providers people trace most: per probe, an
argument name for each position and ``str`` where the argument is a
NUL-terminated C string.  Sources are cited at each provider's table; the
names are the documented ones, shortened to identifiers.

Effects, wherever a site's provider and probe name are in the table *and* its
note has exactly the documented number of arguments (probe definitions change
between releases; a different count means another version, and is left
alone rather than guessed at):

* ``fetchargs.argument_types`` -- a ``str`` argument is read as a string by
  default, but only where the operand is pointer-sized and fetchable; the
  types a spec gives explicitly win (``python:function__entry(u64)`` keeps
  the pointer);
* ``argument_names`` -- events and listings show the names next to the values.

Strings that are *not* NUL-terminated keep their integer type: HotSpot passes
every string as a pointer to unterminated modified UTF-8 plus a length, so
those arguments are named ``*_ptr`` / ``*_len`` and are not dereferenced.

Declarations are compact text, one per probe: names separated by spaces, a
``:str`` suffix for strings.  They are parsed on first use.

Next to the arguments, each runtime's rules: what a probe needs besides an
armed site to fire (RUNTIME_RULES: HotSpot's -XX:+DTrace*Probes flags, PHP's
USE_ZEND_DTRACE=1), and which builds have probes at all (RUNTIME_BUILDS:
Node.js and MySQL removed theirs).
"""
from collections import namedtuple

STRING = "str"

# -- CPython: Doc/howto/instrumentation.rst, "Available static markers"
#    (provider definition: Include/pydtrace.d).
_PYTHON = {
    "function__entry": "filename:str funcname:str lineno",
    "function__return": "filename:str funcname:str lineno",
    "line": "filename:str funcname:str lineno",
    "gc__start": "generation",
    "gc__done": "collected",
    "import__find__load__start": "modulename:str",
    "import__find__load__done": "modulename:str found",
    "audit": "event:str args_tuple",
}

# -- PostgreSQL: doc/src/sgml/monitoring.sgml, table "Built-in DTrace Probes"
#    (which documents src/backend/utils/probes.d; PostgreSQL 13 and later
#    pass the LWLock tranche name, earlier releases had other arguments).
_RELATION = "fork block tablespace database relation"
_POSTGRESQL = {
    "transaction__start": "transaction_id",
    "transaction__commit": "transaction_id",
    "transaction__abort": "transaction_id",
    **{f"query__{phase}": "query:str" for phase in (
        "start", "done", "parse__start", "parse__done", "rewrite__start", "rewrite__done")},
    "statement__status": "status:str",
    "checkpoint__start": "flags",
    "checkpoint__done": "buffers_written buffers_total wal_added wal_removed wal_recycled",
    **{f"{part}__checkpoint__{phase}": "normal" for part in ("clog", "subtrans", "multixact")
       for phase in ("start", "done")},
    "buffer__checkpoint__start": "flags",
    "buffer__sync__start": "buffers_total buffers_dirty",
    "buffer__sync__written": "buffer_id",
    "buffer__sync__done": "buffers_total buffers_written buffers_expected",
    "buffer__read__start": f"{_RELATION} backend extend",
    "buffer__read__done": f"{_RELATION} backend extend found",
    **{f"buffer__{action}__{phase}": _RELATION for action in ("flush", "write__dirty")
       for phase in ("start", "done")},
    "wal__insert": "rmid info",
    "smgr__md__read__start": f"{_RELATION} backend",
    "smgr__md__read__done": f"{_RELATION} backend bytes bytes_requested",
    "smgr__md__write__start": f"{_RELATION} backend",
    "smgr__md__write__done": f"{_RELATION} backend bytes bytes_requested",
    "sort__start": "sort_type unique key_columns work_mem_kb random_access parallel",
    "sort__done": "external space_used",
    **{f"lwlock__{event}": "tranche:str mode" for event in (
        "acquire", "wait__start", "wait__done", "condacquire", "condacquire__fail",
        "acquire__or__wait", "acquire__or__wait__fail")},
    "lwlock__release": "tranche:str",
    "lock__wait__start": "tag_field1 tag_field2 tag_field3 tag_field4 locktag_type mode",
    "lock__wait__done": "tag_field1 tag_field2 tag_field3 tag_field4 locktag_type mode",
}

# -- OpenJDK HotSpot: argument types from src/hotspot/os/posix/dtrace/hotspot.d,
#    names from the Java Virtual Machine Guide, "DTrace Probes in HotSpot VM"
#    (class-initialization arguments from the HOTSPOT_CLASS_INITIALIZATION_*
#    calls in src/hotspot/share/oops/instanceKlass.cpp).  Strings are
#    unterminated pointer/length pairs: never read as str.
_CLASS = "class_name_ptr class_name_len"
_METHOD = f"{_CLASS} method_name_ptr method_name_len signature_ptr signature_len"
_MONITOR = f"java_thread_id monitor_id {_CLASS}"
_CLASS_INIT = f"{_CLASS} class_loader_id thread_type"
_HOTSPOT = {
    "class__loaded": f"{_CLASS} class_loader_id shared",
    "class__unloaded": f"{_CLASS} class_loader_id shared",
    "class__initialization__required": _CLASS_INIT,
    **{f"class__initialization__{stage}": f"{_CLASS_INIT} wait" for stage in (
        "recursive", "concurrent", "erroneous", "super__failed", "clinit", "error", "end")},
    **{f"vmops__{phase}": "vmop_name_ptr vmop_name_len mode"
       for phase in ("request", "begin", "end")},
    "gc__begin": "full",
    **{f"mem__pool__gc__{phase}": "manager_name_ptr manager_name_len pool_name_ptr pool_name_len "
                                  "initial_size used committed max_size"
       for phase in ("begin", "end")},
    **{f"thread__{phase}": "thread_name_ptr thread_name_len java_thread_id native_thread_id daemon"
       for phase in ("start", "stop")},
    "thread__sleep__begin": "millis",
    "thread__sleep__end": "timed_out",
    "thread__park__begin": "parker_id absolute time",
    "thread__park__end": "parker_id",
    "thread__unpark": "parker_id",
    "method__compile__begin": f"compiler_name_ptr compiler_name_len {_METHOD}",
    "method__compile__end": f"compiler_name_ptr compiler_name_len {_METHOD} success",
    "compiled__method__load": f"{_METHOD} code_address code_size",
    "compiled__method__unload": _METHOD,
    **{f"monitor__{event}": _MONITOR for event in (
        "contended__enter", "contended__entered", "contended__exit", "waited", "notify",
        "notifyAll")},
    "monitor__wait": f"{_MONITOR} timeout",
    "object__alloc": f"java_thread_id {_CLASS} size",
    "method__entry": f"java_thread_id {_METHOD}",
    "method__return": f"java_thread_id {_METHOD}",
}

# -- GCC libstdc++: libstdc++-v3/libsupc++/unwind-cxx.h defines PROBE2 under
#    provider libstdcxx; eh_throw.cc fires throw and rethrow, eh_catch.cc
#    fires catch, each with the exception object and its std::type_info.
_LIBSTDCXX = {event: "object type_info" for event in ("throw", "rethrow", "catch")}

# -- Node.js: src/node_provider.d (the DTrace/SystemTap provider of Node.js
#    0.10 to 11, built with --with-dtrace); names from its translated
#    arguments (string a = remote address, p = port, m = method, u = url).
_CONNECTION = "connection remote:str port fd"
_NODE = {
    "net__server__connection": _CONNECTION,
    "net__stream__end": _CONNECTION,
    "net__socket__read": "connection bytes remote:str port fd",
    "net__socket__write": "connection bytes remote:str port fd",
    "http__server__request": "request connection remote:str port method:str url:str fd",
    "http__server__response": _CONNECTION,
    "http__client__request": "request connection remote:str port method:str url:str fd",
    "http__client__response": _CONNECTION,
    "gc__start": "type flags",
    "gc__done": "type flags",
}

# -- MySQL: include/probes_mysql.d.base (mysql-server 5.5 to 5.7; the probes
#    were removed in 8.0).  Names as declared there.
_TABLE = "db:str table:str"
_MYSQL = {
    "connection__start": "conn_id user:str host:str",
    "connection__done": "status conn_id",
    "command__start": "conn_id command user:str host:str",
    "query__start": "query:str conn_id db_name:str user:str host:str",
    "query__parse__start": "query:str",
    "query__cache__hit": "query:str rows",
    "query__cache__miss": "query:str",
    "query__exec__start": "query:str conn_id db_name:str user:str host:str exec_type",
    **{f"{operation}__start": _TABLE for operation in (
        "insert__row", "update__row", "delete__row", "index__read__row", "handler__rdlock",
        "handler__wrlock", "handler__unlock", "filesort")},
    "read__row__start": f"{_TABLE} scan_flag",
    **{f"{operation}__done": "status" for operation in (
        "command", "query", "query__parse", "query__exec", "insert__row", "update__row",
        "delete__row", "read__row", "index__read__row", "handler__rdlock", "handler__wrlock",
        "handler__unlock", "net__write")},
    **{f"{statement}__start": "query:str" for statement in (
        "select", "insert", "insert__select", "update", "multi__update", "delete",
        "multi__delete")},
    **{f"{statement}__done": "status rows" for statement in (
        "filesort", "select", "insert", "insert__select", "delete", "multi__delete")},
    "update__done": "status rows_matched rows_changed",
    "multi__update__done": "status rows_matched rows_changed",
    "net__read__done": "status bytes",
    "net__write__start": "bytes",
    "keycache__read__start": "filepath:str bytes mem_used mem_free",
    "keycache__read__block": "bytes",
    "keycache__read__done": "mem_used mem_free",
    "keycache__write__start": "filepath:str bytes mem_used mem_free",
    "keycache__write__block": "bytes",
    "keycache__write__done": "mem_used mem_free",
}

# -- Ruby: probes.d at the top of the ruby/ruby tree (names from its comments).
_RUBY = {
    **{f"{kind}__{phase}": "classname:str methodname:str filename:str lineno"
       for kind in ("method", "cmethod") for phase in ("entry", "return")},
    **{f"{kind}__{phase}": "requiredfile:str filename:str lineno"
       for kind in ("require", "find__require") for phase in ("entry", "return")},
    "load__entry": "loadedfile:str filename:str lineno",
    "load__return": "loadedfile:str filename:str lineno",
    "raise": "classname:str filename:str lineno",
    "object__create": "classname:str filename:str lineno",
    **{f"{kind}__create": "length filename:str lineno" for kind in ("array", "hash", "string")},
    "symbol__create": "string:str filename:str lineno",
    "parse__begin": "sourcefile:str lineno",
    "parse__end": "sourcefile:str lineno",
}

DECLARATIONS = {
    "python": _PYTHON,
    "postgresql": _POSTGRESQL,
    "hotspot": _HOTSPOT,
    "libstdcxx": _LIBSTDCXX,
    "node": _NODE,
    "mysql": _MYSQL,
    "ruby": _RUBY,
}

# The arguments that name a span (a START probe's slice on a timeline), per
# provider: the rest of a START probe's arguments are context, not identity.
SPAN_LABELS = {
    "python": {"function__entry": "funcname", "import__find__load__start": "modulename"},
    "postgresql": {f"query__{phase}start": "query" for phase in ("", "parse__", "rewrite__")},
    "mysql": {f"{statement}__start": "query" for statement in (
        "query", "query__parse", "query__exec", "select", "insert", "insert__select", "update",
        "multi__update", "delete", "multi__delete")},
    "ruby": {**{f"{kind}__entry": "classname methodname" for kind in ("method", "cmethod")},
             "require__entry": "requiredfile", "load__entry": "loadedfile",
             "parse__begin": "sourcefile"},
}


# -- Runtimes' rules: what must be true besides an armed site for a probe to fire.
#
# Semaphores to raise without arming their probe, per provider: {probe: the
# probe whose semaphore it needs}.  CPython 3.11 (Python/ceval.c) reaches its
# function__entry and function__return markers for Python-to-Python calls
# only on its tracing path, which it takes while the line marker's semaphore
# is raised (PyDTrace_LINE_ENABLED() turns cframe.use_tracing on); without
# it, a traced function__entry counts only the frames entered from C.
# Raising that semaphore alone costs nothing per line; arming line would
# cost a trap per line.  The session raises it as its own holding (the
# user-space semaphore manager, in either semaphore mode), exactly once per
# process and lowered at the end, and says so in one line.
SEMAPHORE_COMPANIONS = {
    "python": {"function__entry": "line", "function__return": "line"},
}


def semaphore_companion(provider, name):
    """The probe of `provider` whose semaphore must be raised for ``provider:name``
    to fire (SEMAPHORE_COMPANIONS), or None."""
    return SEMAPHORE_COMPANIONS.get(provider, {}).get(name)


# Probes that fire only in a runtime started so, per provider: {probe (or "*",
# every probe): RuntimeRule(kind, setting)}.  Kinds:
#   JVM_FLAG     a HotSpot flag, -XX:+SETTING, given at start (on the command
#                line or in JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, _JAVA_OPTIONS).
#                HotSpot tests DTraceMethodProbes, DTraceAllocProbes and
#                DTraceMonitorProbes before firing these probes (and JIT-compiles
#                the tests away when they are off); ExtendedDTraceProbes sets all
#                three (JDK 17; gone from JDK 25, which refuses it as an
#                unrecognized option).  discovery/jvm.py reads a running JVM's
#                values, and the tools' --jvm-probes puts the flag in
#                JAVA_TOOL_OPTIONS for -c.
#   ENVIRONMENT  an environment variable of the traced process: PHP's engine
#                (Zend/zend_dtrace.c) fires its probes only when started with
#                USE_ZEND_DTRACE=1, even in a build with --enable-dtrace.
RuntimeRule = namedtuple("RuntimeRule", "kind setting")
JVM_FLAG, ENVIRONMENT = "jvm flag", "environment"
EXTENDED_JVM_FLAG = "ExtendedDTraceProbes"     # JDK 17's flag for the three below
_MONITOR_PROBES = ("contended__enter", "contended__entered", "contended__exit", "wait",
                   "waited", "notify", "notifyAll")
RUNTIME_RULES = {
    "hotspot": {
        **{f"method__{phase}": RuntimeRule(JVM_FLAG, "DTraceMethodProbes")
           for phase in ("entry", "return")},
        "object__alloc": RuntimeRule(JVM_FLAG, "DTraceAllocProbes"),
        **{f"monitor__{event}": RuntimeRule(JVM_FLAG, "DTraceMonitorProbes")
           for event in _MONITOR_PROBES},
    },
    "php": {"*": RuntimeRule(ENVIRONMENT, "USE_ZEND_DTRACE=1")},
}

# Which builds of a runtime have its probes at all (a .note.stapsdt), as found
# with readelf -n in Debian 12's packages (checked for this table; the test
# suite runs Python, PostgreSQL and HotSpot).
RUNTIME_BUILDS = {
    "python": "python3.11 and libpython3.11 (built --with-dtrace): the python provider",
    "hotspot": "openjdk-17-jre-headless's libjvm.so (built --enable-dtrace): the hotspot "
               "provider, hotspot_jni too; Temurin 25's libjvm.so has them as well",
    "postgresql": "postgresql-15 (built --enable-dtrace): the postgresql provider",
    "ruby": "libruby3.1 (built --enable-dtrace): the ruby provider, 22 probes",
    "php": "php8.2-cli (built --enable-dtrace): the php provider, 11 probes, firing only "
           "under USE_ZEND_DTRACE=1",
    "node": "none: Debian's nodejs 18 (libnode108) has no notes; Node.js removed its "
            "DTrace/SystemTap provider (--with-dtrace) in version 12",
    "mysql": "none: MySQL removed its probes in 8.0, and Debian 12's MariaDB 10.11 "
             "(mariadb-server-core's mariadbd) has no notes",
}


def runtime_rule(provider, name):
    """The RuntimeRule ``provider:name`` needs to fire (RUNTIME_RULES), or None."""
    rules = RUNTIME_RULES.get(provider, {})
    return rules.get(name) or rules.get("*")


class ProbeArguments(namedtuple("ProbeArguments", "names types")):
    """The documented arguments of one probe: a name per position, and per
    position ``"str"`` (a NUL-terminated string) or None (a number)."""
    __slots__ = ()


_parsed = {}


def lookup(provider, name, argument_count=None):
    """ProbeArguments of ``provider:name``, or None if unknown or if the site
    has another number of arguments than documented."""
    key = (provider, name)
    if key not in _parsed:
        declaration = DECLARATIONS.get(provider, {}).get(name)
        _parsed[key] = None if declaration is None else _parse(declaration)
    arguments = _parsed[key]
    if arguments is None or (argument_count is not None and argument_count != len(arguments.names)):
        return None
    return arguments


def _parse(declaration):
    names, types = [], []
    for word in declaration.split():
        argument_name, _, argument_type = word.partition(":")
        names.append(argument_name)
        types.append(argument_type or None)
    return ProbeArguments(tuple(names), tuple(types))


def argument_names(provider, name, argument_count):
    """The names for a site of ``provider:name`` with `argument_count` arguments, or None."""
    arguments = lookup(provider, name, argument_count)
    return None if arguments is None else arguments.names


def span_label(provider, name, argument_count):
    """Positions of the arguments that name a span started by this probe (maybe empty)."""
    names = argument_names(provider, name, argument_count)
    label = SPAN_LABELS.get(provider, {}).get(name)
    if names is None or label is None:
        return ()
    return tuple(names.index(word) for word in label.split())
