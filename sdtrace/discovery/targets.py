"""Targets -> the ELF files whose probes a spec may name.

A target is written three ways:

* a path (anything with a ``/``, or an existing file);
* a library name such as ``libc``, ``libpython3.11`` or ``libstdc++``,
  resolved as the dynamic loader would: first ``/etc/ld.so.cache``, then the
  standard directories;
* a process (``-p PID``): every ELF object in ``/proc/PID/maps``, opened
  through ``/proc/PID/root`` so that a process in a container or another mount
  namespace is read from its own file system, and deduplicated by
  (device, inode) because one file usually shows up as several mappings.

For ``-c CMD`` the objects are the command's executable and, transitively,
the DT_NEEDED libraries the loader will map.
"""
import functools
import os
import struct

from ..errors import NoSuchProcess, SdtraceError
from .elf import DT_NEEDED, DT_RPATH, DT_RUNPATH, ELF_MAGIC, ElfError, ElfFile

LD_SO_CACHE = "/etc/ld.so.cache"
CACHE_MAGIC = b"glibc-ld.so.cache1.1"
# header after the magic: nlibs, len_strings, flags(u8)+pad, extension offset, 3 unused
CACHE_HEADER = struct.Struct("<IIB3xI12x")
# entry: flags, key (name) offset, value (path) offset, os version, hwcap
CACHE_ENTRY = struct.Struct("<iIIIQ")
# ld.so.cache flag bits that name the ABI of an entry, per architecture.
CACHE_ABI_FLAGS = {"x86_64": 0x0303, "aarch64": 0x0a03, "i386": 0x0003, "i686": 0x0003}
MACHINE = os.uname().machine
STANDARD_DIRS = (
    f"/lib/{MACHINE}-linux-gnu", f"/usr/lib/{MACHINE}-linux-gnu",
    "/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib",
)


def looks_like_library_name(text):
    return "/" not in text and text.startswith("lib") and not os.path.exists(text)


def resolve_target(text):
    """The absolute path of a target written as a path or a library name."""
    if not looks_like_library_name(text):
        path = os.path.abspath(text)
        if not os.path.exists(path):
            raise SdtraceError(f"{text}: no such file")
        if os.path.isdir(path):
            raise SdtraceError(f"{text}: is a directory, not an ELF file")
        return path
    path = find_library(text)
    if path is None:
        raise SdtraceError(f"{text}: library not found in {LD_SO_CACHE} or the standard directories")
    return path


def _library_matches(filename, name):
    return filename == name or filename.startswith(name + ".so")


def find_library(name, search_path=()):
    """Resolve a library name the way the loader does; None if not found.

    `search_path` holds the asking object's RPATH/RUNPATH directories."""
    for directory in search_path:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    for filename, path in _ld_cache_entries():
        if _library_matches(filename, name) and os.path.exists(path):
            return path
    for directory in STANDARD_DIRS:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for filename in entries:
            if _library_matches(filename, name):
                return os.path.join(directory, filename)
    return None


@functools.lru_cache(maxsize=1)   # read once: a command's libraries are looked up one by one
def _ld_cache_entries():
    """(file name, path) pairs of this machine's ABI from /etc/ld.so.cache, in cache order."""
    try:
        with open(LD_SO_CACHE, "rb") as cache_file:
            cache = cache_file.read()
    except OSError:
        return ()
    start = cache.find(CACHE_MAGIC)  # after an old-format block, if any
    if start < 0 or len(cache) < start + len(CACHE_MAGIC) + CACHE_HEADER.size:
        return ()
    nlibs, _strings_len, _flags, _ext = CACHE_HEADER.unpack_from(cache, start + len(CACHE_MAGIC))
    abi = CACHE_ABI_FLAGS.get(MACHINE)
    first = start + len(CACHE_MAGIC) + CACHE_HEADER.size
    entries = []
    for index in range(nlibs):
        position = first + index * CACHE_ENTRY.size
        if position + CACHE_ENTRY.size > len(cache):
            break
        flags, key, value, _os, _hwcap = CACHE_ENTRY.unpack_from(cache, position)
        if abi is not None and flags & 0xffff != abi:
            continue
        entries.append((_cstring(cache, key), _cstring(cache, value)))
    return tuple(entries)


def _cstring(blob, offset):
    end = blob.find(b"\0", offset)
    return blob[offset:end].decode("utf-8", "replace") if 0 <= offset < end else ""


def process_objects(pid):
    """The distinct ELF files mapped by process `pid`, as paths the tracer can open."""
    from ..kernel.procfs import ProcessGone, mapped_files, read_maps

    try:
        mappings = read_maps(pid)   # unreadable: ProcessDenied, an SdtraceError
    except ProcessGone:
        raise NoSuchProcess(pid) from None
    root = _process_root(pid)
    return [root + mapping.path for mapping in mapped_files(mappings).values()
            if not mapping.path.endswith(" (deleted)") and _is_elf(root + mapping.path)]


def _process_root(pid):
    """'' when the process shares our root directory, else its /proc/PID/root prefix."""
    prefix = f"/proc/{pid}/root"
    try:
        theirs, ours = os.stat(prefix + "/"), os.stat("/")
    except OSError:
        return prefix
    return "" if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else prefix


def _is_elf(path):
    try:
        with open(path, "rb") as candidate:
            return candidate.read(4) == ELF_MAGIC
    except OSError:
        return False


def command_objects(command):
    """The executable `command` would run and the libraries the loader would map for it."""
    import shutil

    executable = command if "/" in command else shutil.which(command)
    if executable is None or not os.path.exists(executable):
        raise SdtraceError(f"{command}: command not found")
    executable = os.path.realpath(executable)
    objects, pending = [], [executable]
    while pending:
        path = pending.pop(0)
        if path in objects:
            continue
        objects.append(path)
        try:
            with ElfFile(path) as elf:
                dynamic = elf.dynamic_strings((DT_NEEDED, DT_RPATH, DT_RUNPATH))
        except ElfError:
            if path == executable:
                raise
            continue
        origin = os.path.dirname(path)
        search_path = [directory.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                       for entry in dynamic[DT_RUNPATH] + dynamic[DT_RPATH]
                       for directory in entry.split(":") if directory]
        for name in dynamic[DT_NEEDED]:
            library = find_library(name, search_path)
            if library is not None:
                pending.append(os.path.realpath(library))
    return objects
