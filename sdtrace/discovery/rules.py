"""Whether a runtime's rule holds: the JVM flag or the environment variable that
providers.RUNTIME_RULES says a probe needs to fire, checked for a running process
(``-p``), a command about to run (``-c``), or, system-wide, said as a condition.

A JVM's flags are read by jvm.py (from its memory, else its options); an
environment variable from /proc/PID/environ, or the environment a command
inherits.  A rule that cannot be checked (a process that runs no JVM, a command
that is not a java launcher: ``sh -c 'java ...'``) counts as met: nothing
is guessed.
"""
import os

from . import providers


def setting(rule):
    """How a user gives `rule`: ``-XX:+DTraceMethodProbes``, ``USE_ZEND_DTRACE=1``."""
    return f"-XX:+{rule.setting}" if rule.kind == providers.JVM_FLAG else rule.setting


def needed(probes):
    """{rule: "provider:name" of the first probe needing it} for (provider, name) pairs."""
    rules = {}
    for provider, name in probes:
        rule = providers.runtime_rule(provider, name)
        if rule is not None:
            rules.setdefault(rule, f"{provider}:{name}")
    return rules


def unmet(rule, pid=None, argv=None):
    """None if `rule` holds for process `pid` (or the command `argv`, run in this
    process's environment), else what lacks it: "process 42's JVM runs without
    -XX:+DTraceMethodProbes (read from its memory)"."""
    if rule.kind == providers.JVM_FLAG:
        from . import jvm

        if pid is not None:
            values, where = jvm.running_flags(pid)
            if values is None or values[rule.setting]:
                return None
            return f"process {pid}'s JVM runs without {setting(rule)} (read from {where})"
        if jvm.java_home(argv[0]) is None or jvm.option_flags(argv, os.environ)[rule.setting]:
            return None          # not a java launcher's options: nothing to read them from
        return f"the command's JVM runs without {setting(rule)}"
    name, _, value = rule.setting.partition("=")
    if pid is not None:
        from ..kernel.procfs import read_proc

        if f"{name}={value}".encode() in read_proc(pid, "environ").split(b"\0"):
            return None
        return f"process {pid} was started without {setting(rule)} in its environment"
    if os.environ.get(name) == value:
        return None
    return f"the command runs without {setting(rule)} in its environment"
