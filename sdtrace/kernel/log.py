"""The library's diagnostics: one logger per module under ``sdtrace``, silent by default.

Modules log their decisions (which semaphore mode and why, each uprobe
definition, perf fds, counters raised and lowered, attach and detach times)
at DEBUG on ``logging.getLogger(__name__)``.  The ``sdtrace`` logger gets a
NullHandler, so a program using the library sees nothing unless it
configures logging; ``sdtrace --debug`` does.  Warnings are not logged: they
reach the caller through a ``warn`` callback or a session's ``warnings``.
``logging`` is imported by the modules that run sessions, never by ``import
sdtrace`` or ``sdtrace list``.
"""
import logging

ROOT = "sdtrace"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


def logger(name):
    """The logger of module `name` (``__name__``), a child of ``sdtrace``."""
    return logging.getLogger(name)
