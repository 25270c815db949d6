"""The exceptions sdtrace raises for user-facing failures.

Every error that reaches the command line is an SdtraceError whose message is a
single line naming the thing at fault (file, probe, PID) and the cause.  The CLI
prints it as ``sdtrace: MESSAGE`` and exits non-zero; it never shows a traceback.

A program using the library can also tell the common failures apart, as with
psutil's ``NoSuchProcess(pid)``: each subclass carries the thing at fault as
attributes, and its text is the same one line::

    class              attributes                     raised when
    NoSuchProcess      pid                            a PID names no process
    AccessDenied       path, pid, errno               a file or process cannot be read or written
    ElfError           path, reason                   a file is not ELF, or is damaged
    BadSpec            text, reason                   a probe spec cannot be parsed
    ProbeNotFound      spec, where                    a spec selects no site
    KernelRefused      uprobe, path, offset, reason,  the kernel refused a uprobe definition
                       errno
    BpfRefused         what, errno, log               the bpf() system call refused an object
                                                      (log: the verifier's, for a program)

Attributes that do not apply are None.
"""


class SdtraceError(Exception):
    """A failure the user can act on; str(error) is one line."""


class NoSuchProcess(SdtraceError):
    """Process `pid` does not exist (any more)."""

    def __init__(self, pid):
        super().__init__(f"process {pid} does not exist")
        self.pid = pid


class AccessDenied(SdtraceError):
    """`path` (a /proc file, a process's memory, tracefs, /run/sdtrace) cannot be
    read or written, as process `pid` if it is one's; `errno` is the kernel's."""

    def __init__(self, message, path=None, pid=None, errno=None):
        super().__init__(message)
        self.path, self.pid, self.errno = path, pid, errno


class ElfError(SdtraceError):
    """The file at `path` is not a readable ELF file, or is damaged: `reason`."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class BadSpec(SdtraceError):
    """The probe spec `text` cannot be parsed: `reason`."""

    def __init__(self, text, reason):
        super().__init__(f"bad probe spec {text!r}: {reason}" if text.strip()
                         else "empty probe spec")
        self.text, self.reason = text, reason


class ProbeNotFound(SdtraceError):
    """The probe spec `spec` (its text) selects no site in `where` (a path, or
    "N objects"); `message` says it otherwise when the file has no notes at all."""

    def __init__(self, spec, where, message=None):
        super().__init__(message or f"no probe matches {spec!r} in {where}")
        self.spec, self.where = spec, where


class KernelRefused(SdtraceError):
    """The kernel refused the uprobe definition `uprobe` (GROUP/EVENT) at
    `path`:`offset`, for `reason` (tracefs error_log's words, or errno's)."""

    def __init__(self, uprobe, path, offset, reason, errno=None):
        super().__init__(f"uprobe {uprobe} at {path}:{offset:#x}: {reason}")
        self.uprobe, self.path, self.offset = uprobe, path, offset
        self.reason, self.errno = reason, errno


class BpfRefused(SdtraceError):
    """The bpf() system call refused `what` ("loading program NAME", "creating map NAME",
    "attaching ..."), with errno `errno`; `log` is the verifier's log of a refused program
    load (its last line ends the message), else None."""

    def __init__(self, message, what, errno, log=None):
        super().__init__(message)
        self.what, self.errno, self.log = what, errno, log
