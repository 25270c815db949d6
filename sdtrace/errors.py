"""The one exception type sdtrace raises for user-facing failures.

Every error that reaches the command line is an SdtraceError whose message is a
single line naming the thing at fault (file, probe, PID) and the cause.  The CLI
prints it as ``sdtrace: MESSAGE`` and exits non-zero; it never shows a traceback.
"""


class SdtraceError(Exception):
    """A failure the user can act on; str(error) is one line."""
