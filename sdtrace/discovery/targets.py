"""Targets -> the ELF files whose probes a spec may name.

A target is written four ways:

* a path (anything with a ``/``, or an existing file);
* a glob of paths (``/usr/lib/*/libfoo*.so``), expanded like the shell: every
  ELF file that matches, in order, a ``*`` never crossing a ``/`` (symlinks to
  a file already matched, such as ``libfoo.so`` -> ``libfoo.so.1``, count once);
* a library name such as ``libc``, ``libpython3.11`` or ``libstdc++``,
  resolved as the dynamic loader would: first ``/etc/ld.so.cache``, then the
  standard directories;
* a process (``-p PID``) or a command (``-c CMD``): the objects it maps.

Only regular files are targets (elf.open_regular_file): a named pipe would
block the reader, a device node could act on its device.

**A process's objects** are the ELF files of ``/proc/PID/maps``, one per
(device, inode).  A path there is the process's own view: in another mount
namespace (a container, ``unshare -m``, a private tmpfs) it may name nothing
here, or another file, even when the process has the same root directory.
So each object is opened the way the process sees it, the first of these
whose (device, inode) is the mapping's:

    the path itself               the same file here (the common case)
    /proc/PID/root + the path     the path looked up in the process's root and mounts
    /proc/PID/map_files/START-END the mapping itself (a deleted or replaced file)

All three are paths the kernel resolves too, from our side, so the uprobe is
defined on the openable path (``ObjectFile.path``); ``seen_as`` keeps the
process's name for it.  An object that cannot be opened at all is named in a
warning, never dropped in silence; a process that maps no ELF file (a
kernel thread) is an error saying so.

**A command's objects** are its executable and, transitively, the DT_NEEDED
libraries its loader will map, found as ld.so(8) finds them, in the
command's environment:

    LD_PRELOAD                    preloaded first
    DT_RPATH                      of the object, then of the executable, only
                                  when the object has no DT_RUNPATH
    LD_LIBRARY_PATH
    DT_RUNPATH                    of the object
    /etc/ld.so.cache, then the standard directories

``$ORIGIN`` (the object's directory), ``$LIB`` and ``$PLATFORM`` are expanded
in each of these; a candidate of another ELF class or machine is skipped, as
the loader skips it.  A library the loader would not find is left out: the
command then fails to start on its own.

Within a process's or a command's objects, a spec's library name (``liba``,
``libfoo.so``), path or glob names the objects the process maps (or the
command's loader would map) under that name; only when none does is it
resolved on the system.
"""
import fnmatch
import functools
import glob
import os
import struct
from collections import namedtuple

from ..errors import NoSuchProcess, SdtraceError
from .elf import (DT_NEEDED, DT_RPATH, DT_RUNPATH, ELF_MAGIC, ElfError, ElfFile,
                  check_regular_file, open_regular_file)

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
# What the loader substitutes for $LIB: Debian's multiarch directory, else lib64 or lib.
LIB_DIRECTORY = next((name for name in (f"lib/{MACHINE}-linux-gnu", "lib64")
                      if os.path.isdir("/usr/" + name)), "lib")
GLOB_CHARACTERS = "*?["


class ObjectFile(namedtuple("ObjectFile", "path seen_as owner")):
    """One ELF object of a process or command.

    path     opens the file from here; the kernel resolves it too (uprobes)
    seen_as  the path the process maps it by (or the loader will find it at)
    owner    whose object it is, for messages: "process 1234 (prog)", "command ./prog"
    """
    __slots__ = ()


# --- targets named in specs -------------------------------------------------

def looks_like_library_name(text):
    return "/" not in text and text.startswith("lib") and not os.path.exists(text)


def resolve_target(text, context=()):
    """The absolute paths a spec's target names: one, or every match of a glob.

    `context` holds the ObjectFiles of the process or command being traced;
    a target naming some of them resolves to those."""
    if context:
        known = [item.path for item in context if _names_object(text, item.seen_as)]
        if known:
            return known
    if "/" in text and any(char in text for char in GLOB_CHARACTERS):
        matches = {}   # (device, inode) -> the first path: symlinks name a library thrice
        for match in sorted(glob.glob(text)):
            if _is_elf(match):    # not directories, nor libc.so's linker script
                status = os.stat(match)
                matches.setdefault((status.st_dev, status.st_ino), os.path.abspath(match))
        if not matches:
            raise SdtraceError(f"{text}: no ELF file matches")
        return list(matches.values())
    if not looks_like_library_name(text):
        return [_checked_path(text)]
    path = find_library(text)
    if path is None:
        raise SdtraceError(f"{text}: library not found in {LD_SO_CACHE} or the standard directories")
    return [path]


def _names_object(text, seen_as):
    """Whether a spec's target `text` names the object a process maps as `seen_as`."""
    if "/" not in text:
        return _library_matches(os.path.basename(seen_as), text)
    if any(char in text for char in GLOB_CHARACTERS):
        pattern, path = os.path.abspath(text).split("/"), seen_as.split("/")
        return len(pattern) == len(path) and all(
            fnmatch.fnmatchcase(part, glob_part) for part, glob_part in zip(path, pattern))
    return os.path.abspath(text) == seen_as


def _checked_path(text):
    """The absolute path of the regular file `text`; SdtraceError naming it otherwise."""
    path = os.path.abspath(text)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SdtraceError(f"{text}: no such file") from None
    except OSError as error:
        raise SdtraceError(f"{text}: {error.strerror}") from None
    check_regular_file(text, mode)
    return path


def _library_matches(filename, name):
    """Whether a file is library `name`: libc -> libc.so.6, libfoo.so -> libfoo.so.1."""
    return (filename == name or filename.startswith(name + ".so")
            or (name.endswith(".so") and filename.startswith(name + ".")))


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


# --- a process's objects ------------------------------------------------------

def process_objects(pid, warn=None):
    """The distinct ELF files process `pid` maps, as ObjectFiles, in map order.

    `warn(message)` hears of a mapped file that cannot be opened (default: an error)."""
    from ..kernel.procfs import ProcessGone, mapped_files, process_name, read_maps

    try:
        mappings = read_maps(pid)   # unreadable: ProcessDenied, an SdtraceError
    except ProcessGone:
        raise NoSuchProcess(pid) from None
    owner = f"process {pid} ({process_name(pid)})"
    files = mapped_files(mappings).values()
    objects, unopened = [], []
    for mapping in files:
        path = mapped_path(pid, mapping)
        if path is None:
            unopened.append(mapping.path)
        elif _is_elf(path):
            objects.append(ObjectFile(path, mapping.path, owner))
    if unopened:
        message = (f"{owner}: cannot open {len(unopened)} mapped file(s) as the process sees "
                   f"them; their probes are not searched: {', '.join(unopened)}")
        if warn is None or not objects:
            raise SdtraceError(message)
        warn(message)
    if not objects:
        raise SdtraceError(f"{owner} maps no ELF file: a kernel thread (or an exited process) "
                           "has no SDT probes" if not files else f"{owner} maps no ELF file")
    return objects


def mapped_path(pid, mapping):
    """A path that opens the very file `mapping` (of process `pid`) maps, or None."""
    from ..kernel.procfs import file_identity

    candidates = (mapping.path, f"/proc/{pid}/root{mapping.path}",
                  f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}")
    for candidate in candidates:
        try:
            if file_identity(candidate) == mapping.file_id:
                return candidate
        except OSError:
            continue
    return None


def _is_elf(path):
    try:
        fd = open_regular_file(path)
    except ElfError:
        return False
    try:
        return os.pread(fd, 4, 0) == ELF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


# --- a command's objects --------------------------------------------------------

def command_objects(command, environment=None):
    """The executable `command` would run and the libraries its loader would map
    for it, as ObjectFiles; `environment` is the command's (default: ours)."""
    import shutil

    environment = os.environ if environment is None else environment
    executable = command
    if "/" not in command:
        executable = shutil.which(command, path=environment.get("PATH"))
    if executable is None or not os.path.exists(executable):
        raise SdtraceError(f"{command}: command not found")
    main = _loaded(os.path.realpath(executable), None)
    loader = _Loader(main, environment)
    queue = [main, *(loader.find(name, main) for name in loader.preload)]
    found = {}   # (device, inode) -> _Loaded, in load order
    while queue:
        item = queue.pop(0)
        if item is not None and item.identity not in found:
            found[item.identity] = item
            queue.extend(loader.find(name, item) for name in item.needed)
    owner = f"command {command}"
    return [ObjectFile(real, real, owner)   # the kernel names mapped files by their real paths
            for real in (os.path.realpath(item.path) for item in found.values())]


# One object the loader maps: where, its identity and ABI, its dynamic entries, who needed it.
_Loaded = namedtuple("_Loaded", "path identity abi needed rpath runpath requester")


def _loaded(path, requester, abi=None):
    """The _Loaded of the ELF file at `path`; None if it is not of the `abi` given."""
    with ElfFile(path) as elf:
        if abi is not None and (elf.word_size, elf.machine) != abi:
            return None
        dynamic = elf.dynamic_strings((DT_NEEDED, DT_RPATH, DT_RUNPATH))
        status = os.stat(path)
        return _Loaded(path, (status.st_dev, status.st_ino), (elf.word_size, elf.machine),
                       tuple(dynamic[DT_NEEDED]), tuple(dynamic[DT_RPATH]),
                       tuple(dynamic[DT_RUNPATH]), requester)


class _Loader:
    """Finds a command's libraries as its dynamic loader will (see the module's essay)."""

    def __init__(self, main, environment):
        self.main = main
        self.library_path = _expand([environment.get("LD_LIBRARY_PATH", "")], main.path)
        self.preload = environment.get("LD_PRELOAD", "").replace(":", " ").split()

    def find(self, name, requester):
        """The _Loaded of library `name` that `requester` needs, or None if not found."""
        if "/" in name:
            candidates = [os.path.abspath(name)]
        else:
            candidates = [os.path.join(directory, name)
                          for directory in self._search_path(requester)]
            candidates += [path for filename, path in _ld_cache_entries() if filename == name]
            candidates += [os.path.join(directory, name) for directory in STANDARD_DIRS]
        for candidate in candidates:
            try:
                found = _loaded(candidate, requester, self.main.abi)
            except ElfError:
                continue
            if found is not None:     # a library of another ABI is skipped, as the loader does
                return found
        return None

    def _search_path(self, requester):
        """The directories searched before the cache for what `requester` needs."""
        if requester.runpath:
            return [*self.library_path, *_expand(requester.runpath, requester.path)]
        rpath = []
        item = requester
        while item is not None:       # the requester's DT_RPATH, then its loaders' up to main
            if not item.runpath:
                rpath += _expand(item.rpath, item.path)
            item = item.requester
        return [*rpath, *self.library_path]


def _expand(entries, origin_object):
    """The directories of DT_RPATH/DT_RUNPATH strings (or LD_LIBRARY_PATH), with
    $ORIGIN, $LIB and $PLATFORM replaced as the loader does for `origin_object`;
    an empty entry of a list is the current directory."""
    values = {"ORIGIN": os.path.dirname(origin_object), "LIB": LIB_DIRECTORY,
              "PLATFORM": MACHINE}
    directories = []
    for entry in entries:
        if not entry:
            continue
        for directory in entry.replace(";", ":").split(":"):
            for token, value in values.items():
                directory = directory.replace("${" + token + "}", value)
                directory = directory.replace("$" + token, value)
            directories.append(directory or ".")
    return directories
