"""The C library, loaded once: the system calls Python's os module does not offer.

``libc()`` is ctypes' handle on the libc this process already runs on
(``CDLL(None)``, so nothing is loaded from disk), opened with ``use_errno``
so that ``ctypes.get_errno()`` tells why a call failed.  ctypes keeps one
function object per name on a handle, so prototypes set on it would be
shared by every caller: they are declared once, here, in ``PROTOTYPES``.
Calls that have no libc wrapper go through ``syscall(2)`` with the number
the caller's table gives for ``machine()``, this kernel's architecture.
"""
import ctypes
import functools
import os

# name -> (restype, argtypes); argtypes None for syscall(2), whose arguments vary
PROTOTYPES = {
    "syscall": (ctypes.c_long, None),
    "ptrace": (ctypes.c_long, (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)),
    "mount": (ctypes.c_int, (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_void_p)),
    "fanotify_init": (ctypes.c_int, (ctypes.c_uint, ctypes.c_uint)),
    "fanotify_mark": (ctypes.c_int, (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                     ctypes.c_char_p)),
}


@functools.lru_cache(maxsize=None)
def libc():
    """The process's C library, with the prototypes of PROTOTYPES."""
    library = ctypes.CDLL(None, use_errno=True)
    for name, (restype, argtypes) in PROTOTYPES.items():
        function = getattr(library, name, None)   # fanotify is missing from some libcs
        if function is not None:
            function.restype = restype
            if argtypes is not None:
                function.argtypes = argtypes
    return library


@functools.lru_cache(maxsize=None)
def machine():
    """This kernel's architecture, as uname -m says it ("x86_64", "aarch64", ...)."""
    return os.uname().machine


def syscall_number(numbers):
    """This machine's entry of `numbers` ({machine: system call number}), or None."""
    return numbers.get(machine())


def checked(result, what):
    """`result` of a C call that returns -1 on failure; OSError "what: reason" if it failed."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result
