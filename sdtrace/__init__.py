"""sdtrace: trace USDT (SystemTap SDT) markers on Linux, in pure Python.

The public API, thin and stable:

* ``Session(specs, pid=None, command=None, buffer_pages=None)`` -- a context
  manager that arms probe specs and yields ``Event`` objects
  (``ts, pid, tid, cpu, comm, probe, file, args``);
* ``read_probes(path)`` -- the probe sites of an ELF file;
* ``SdtraceError`` -- every user-facing failure, as one line; the common ones
  are subclasses that carry the thing at fault as attributes:
  ``NoSuchProcess`` (pid), ``AccessDenied`` (path, pid, errno), ``ElfError``
  (path), ``BadSpec`` (text), ``ProbeNotFound`` (spec), ``KernelRefused``
  (uprobe, path, offset, reason, errno).

Names are imported on first use, so ``import sdtrace`` (and the command line,
which lives in this package) stays cheap.
"""
from .errors import (AccessDenied, BadSpec, ElfError, KernelRefused, NoSuchProcess,
                     ProbeNotFound, SdtraceError)

__version__ = "0.1.0"   # the one place the version is written; pyproject.toml reads it
__all__ = ["AccessDenied", "BadSpec", "ElfError", "Event", "KernelRefused", "NoSuchProcess",
           "ProbeNotFound", "Session", "SdtraceError", "read_probes"]

_LAZY = {"Session": ("engine.session", "Session"), "Event": ("engine.events", "Event"),
         "read_probes": ("discovery.notes", "read_probes")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sdtrace' has no attribute {name!r}")
    from importlib import import_module

    module, attribute = _LAZY[name]
    value = getattr(import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value
