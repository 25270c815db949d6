"""The language tools: questions about a managed runtime, as subcommands.

bcc answers the common questions about Python, Java and PostgreSQL with one
tool each (``ucalls``, ``uflow``, ``ugc``, ``uobjnew``, ``uthreads``,
``ustat``, ``dbslower``/``dbstat``).  sdtrace's tools ask the same questions
of the same USDT probes, but as plans of the aggregation layer
(present/aggregate: ``Count``, ``Histogram``, ``Latency``), so a busy runtime
is counted in the kernel by the BPF executor, exactly, at the cost of a bare
uprobe -- and each runtime's quirks (discovery/providers.RUNTIME_RULES) are
handled by the session, as they are for every command.

A tool finds its runtime from the traced process's objects (runtimes.py):
no ``-l LANG`` is needed.  Each tool is a module with ``HELP`` (one line),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args)``; ``TOOLS``
names them in the order ``sdtrace --help`` lists them.  The modules import
nothing heavy at their top, so building the parser stays cheap.
"""
import importlib

TOOLS = ("calls", "flow", "gc", "objnew", "threads", "stat", "queries")


def tool(name):
    """The module of tool `name`."""
    return importlib.import_module(f"{__name__}.{name}")
