"""A small, fast ELF reader: just what SDT discovery needs, from an mmap.

An ELF file starts with an identification block that fixes the word size
(32/64-bit) and the byte order.  Every other header's layout follows from
those two facts, so the layouts are declared once below as ``struct.Struct``
tables keyed by (class, byte order) and the reader never computes an offset by
hand.  From the file we need:

* the program headers (PT_LOAD segments), to turn a virtual address into a
  file offset the way the loader maps the file -- section headers alone are
  wrong for some linkers;
* the section headers, to find ``.note.stapsdt``, ``.stapsdt.base`` and the
  symbol tables;
* the notes themselves, and symbol values on demand.

The two identification facts are kept on the file (``byteorder``,
``word_size``) for the layers that read the process's memory or size a bare
operand: they come from EI_DATA and EI_CLASS, never from the machine name
(32-bit PowerPC and s390 files share their 64-bit siblings' operand grammar,
not their word size).

Only regular files are opened: a path is checked before it is opened and its
descriptor again after, because opening a named pipe waits for a writer and
opening a device node can act on the device.  The file is then mapped
read-only and only the pages that are touched are read, so a 30 MB libjvm.so
costs the same as a small program.  Every malformed field raises
errors.ElfError (path, reason) naming the file and the cause; no bounds are
trusted.
"""
import mmap
import os
import stat
import struct
from collections import namedtuple

from ..errors import ElfError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2

PT_LOAD, PT_INTERP = 1, 3
PF_X, PF_W = 1, 2
SHT_SYMTAB, SHT_DYNAMIC, SHT_NOTE, SHT_NOBITS, SHT_DYNSYM = 2, 6, 7, 8, 11
DT_NULL, DT_NEEDED, DT_RPATH, DT_RUNPATH = 0, 1, 15, 29

# e_machine values, mapped to the architecture names operands.py understands.
# 32-bit PowerPC and s390 files share their 64-bit siblings' operand syntax.
MACHINES = {
    3: "i386",
    62: "x86_64",
    40: "arm",
    183: "aarch64",
    20: "ppc64",
    21: "ppc64",
    22: "s390x",
    243: "riscv64",
}

# What a path that is not a regular file is, for the error that refuses it.
FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe (FIFO)",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket"}

Segment = namedtuple("Segment", "type flags offset vaddr filesz memsz")
Section = namedtuple("Section", "name type flags addr offset size link entsize")
Note = namedtuple("Note", "owner type desc")


class _Layouts:
    """The struct layouts of one (class, byte order) pair."""

    def __init__(self, elfclass, order):
        wide = elfclass == ELFCLASS64
        self.address = struct.Struct(order + ("Q" if wide else "I"))
        # Elf_Ehdr after e_ident: type machine version entry phoff shoff flags
        #                         ehsize phentsize phnum shentsize shnum shstrndx
        self.header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        if wide:  # type flags offset vaddr paddr filesz memsz align
            self.segment = struct.Struct(order + "IIQQQQQQ")
        else:     # type offset vaddr paddr filesz memsz flags align
            self.segment = struct.Struct(order + "IIIIIIII")
        # name type flags addr offset size link info addralign entsize
        self.section = struct.Struct(order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII"))
        self.note_header = struct.Struct(order + "III")  # namesz descsz type
        if wide:  # name info other shndx value size
            self.symbol = struct.Struct(order + "IBBHQQ")
        else:     # name value size info other shndx
            self.symbol = struct.Struct(order + "IIIBBH")
        self.dynamic_entry = struct.Struct(order + ("qQ" if wide else "iI"))  # tag, value
        self.wide = wide


_LAYOUTS = {
    (c, d): _Layouts(c, "<" if d == ELFDATA2LSB else ">")
    for c in (ELFCLASS32, ELFCLASS64)
    for d in (ELFDATA2LSB, ELFDATA2MSB)
}


def check_regular_file(path, mode):
    """Raises ElfError naming what `path` is unless `mode` (st_mode) is a regular file's."""
    if not stat.S_ISREG(mode):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ElfError(path, f"is {kind}, not an ELF file")


def open_regular_file(path):
    """A read-only descriptor of the regular file at `path`; ElfError for anything else."""
    try:
        check_regular_file(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise ElfError(path, error.strerror) from None
    try:
        check_regular_file(path, os.fstat(fd).st_mode)   # replaced since the stat?
    except ElfError:
        os.close(fd)
        raise
    return fd


class ElfFile:
    """An ELF file mapped read-only.  Use as a context manager or call close().

    byteorder  "little" or "big" (for int.from_bytes), from EI_DATA
    word_size  4 or 8: the size of an address, from EI_CLASS
    machine    the operand grammar's name (operands.py), from e_machine
    """

    def __init__(self, path):
        self.path = path
        fd = open_regular_file(path)
        try:
            size = os.fstat(fd).st_size
            if size < 64:
                raise ElfError(path, f"not an ELF file (only {size} bytes)")
            self.data = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except OSError as error:
            raise ElfError(path, f"cannot map: {error.strerror}") from None
        finally:
            os.close(fd)
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def close(self):
        self.data.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- headers ---------------------------------------------------------

    def _read_header(self):
        data = self.data
        if data[:4] != ELF_MAGIC:
            raise ElfError(self.path, "not an ELF file")
        key = (data[4], data[5])
        if key not in _LAYOUTS:
            raise ElfError(self.path, f"unknown ELF class/byte order {key}")
        self.layout = layout = _LAYOUTS[key]
        self.byteorder = "little" if key[1] == ELFDATA2LSB else "big"   # for int.from_bytes
        self.word_size = layout.address.size
        (self.type, e_machine, _version, _entry, phoff, shoff, _flags, _ehsize,
         phentsize, phnum, shentsize, shnum, shstrndx) = layout.header.unpack_from(data, 16)
        self.machine = MACHINES.get(e_machine, f"machine-{e_machine}")
        self.segments = [
            self._segment(record)
            for record in self._table(phoff, phentsize, phnum, layout.segment, "program header")
        ]
        raw_sections = list(self._table(shoff, shentsize, shnum, layout.section, "section header"))
        names = None
        if raw_sections and shstrndx < len(raw_sections):
            names = raw_sections[shstrndx]
        self.sections = [
            Section(self._string(names[4], names[5], record[0]) if names else "",
                    record[1], record[2], record[3], record[4], record[5], record[6], record[9])
            for record in raw_sections
        ]

    def _segment(self, record):
        if self.layout.wide:
            p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align = record
        else:
            p_type, offset, vaddr, _paddr, filesz, memsz, flags, _align = record
        return Segment(p_type, flags, offset, vaddr, filesz, memsz)

    def _table(self, offset, entry_size, count, layout, what):
        if count == 0 or offset == 0:
            return
        if entry_size < layout.size:
            raise ElfError(self.path, f"{what} entries too small ({entry_size} bytes)")
        self._check_range(offset, entry_size * count, f"{what} table")
        for index in range(count):
            yield layout.unpack_from(self.data, offset + index * entry_size)

    def _check_range(self, offset, size, what):
        if offset + size > len(self.data):
            raise ElfError(self.path, f"{what} lies beyond the end of the file")

    def _string(self, table_offset, table_size, index):
        """The NUL-terminated string at `index` of a string table."""
        self._check_range(table_offset, table_size, "string table")
        if index >= table_size:
            raise ElfError(self.path, f"string index {index} outside its table")
        start = table_offset + index
        end = self.data.find(b"\0", start, table_offset + table_size)
        if end < 0:
            raise ElfError(self.path, "unterminated string in string table")
        return self.data[start:end].decode("utf-8", "replace")

    # -- queries ---------------------------------------------------------

    def section(self, name):
        for section in self.sections:
            if section.name == name:
                return section
        return None

    def section_bytes(self, section):
        if section.type == SHT_NOBITS:
            return b""
        self._check_range(section.offset, section.size, f"section {section.name}")
        return self.data[section.offset:section.offset + section.size]

    def notes(self, section):
        """The notes of a SHT_NOTE section, as (owner, type, desc bytes)."""
        if section.type != SHT_NOTE:
            raise ElfError(self.path, f"section {section.name} is not a note section")
        blob = self.section_bytes(section)
        header = self.layout.note_header
        position, end = 0, len(blob)
        while position + header.size <= end:
            namesz, descsz, note_type = header.unpack_from(blob, position)
            position += header.size
            name_end = position + namesz
            desc_start = position + ((namesz + 3) & ~3)
            desc_end = desc_start + descsz
            if desc_end > end:
                raise ElfError(self.path, f"truncated note in {section.name}")
            yield Note(bytes(blob[position:name_end]).rstrip(b"\0"), note_type,
                       blob[desc_start:desc_end])
            position = desc_start + ((descsz + 3) & ~3)

    def load_segment(self, address):
        """The PT_LOAD segment whose file-backed part contains `address`, or None."""
        for segment in self.segments:
            if segment.type == PT_LOAD and segment.vaddr <= address < segment.vaddr + segment.filesz:
                return segment
        return None

    def interpreter(self):
        """The program interpreter (PT_INTERP: the dynamic loader's path), or None."""
        for segment in self.segments:
            if segment.type == PT_INTERP:
                self._check_range(segment.offset, segment.filesz, "PT_INTERP")
                text = self.data[segment.offset:segment.offset + segment.filesz]
                return text.split(b"\0", 1)[0].decode("utf-8", "replace")
        return None

    def dynamic_strings(self, tags):
        """{tag: [string, ...]} for the string-valued dynamic entries named in `tags`."""
        found = {tag: [] for tag in tags}
        for dynamic in (s for s in self.sections if s.type == SHT_DYNAMIC):
            if dynamic.link >= len(self.sections):
                continue
            strings = self.sections[dynamic.link]
            pair = self.layout.dynamic_entry
            for tag, value in self._table(dynamic.offset, pair.size, dynamic.size // pair.size,
                                          pair, "dynamic"):
                if tag == DT_NULL:
                    break
                if tag in found:
                    found[tag].append(self._string(strings.offset, strings.size, value))
        return found

    def symbol_values(self, wanted):
        """{name: value} for the names in `wanted` found in .symtab, then .dynsym.

        Rather than decoding every symbol (libjvm.so has tens of thousands),
        find each name in the string table first, then the symbol entries
        whose name index points at it: both are byte searches done in C.
        """
        found = {}
        tables = sorted((s for s in self.sections if s.type in (SHT_SYMTAB, SHT_DYNSYM)),
                        key=lambda s: s.type != SHT_SYMTAB)
        symbol = self.layout.symbol
        name_index = struct.Struct(symbol.format[0] + "I")  # st_name leads both layouts
        value_field = 4 if self.layout.wide else 1
        for table in tables:
            remaining = [name for name in wanted if name not in found]
            if not remaining or table.link >= len(self.sections) or table.entsize < symbol.size:
                continue
            strings = self.sections[table.link]
            self._check_range(strings.offset, strings.size, "symbol string table")
            self._check_range(table.offset, table.size, "symbol table")
            entries = self.data[table.offset:table.offset + table.size]
            for name in remaining:
                value = self._symbol_value(name, strings, entries, table.entsize, name_index,
                                           value_field)
                if value:
                    found[name] = value
        return found

    def _symbol_value(self, name, strings, entries, entry_size, name_index, value_field):
        needle = name.encode() + b"\0"
        start, end = strings.offset, strings.offset + strings.size
        position = self.data.find(needle, start, end)
        while position >= 0:                      # every place the string table holds the name
            packed_index = name_index.pack(position - start)
            entry = entries.find(packed_index)
            while entry >= 0:                     # every symbol entry naming that place
                if entry % entry_size == 0:
                    value = self.layout.symbol.unpack_from(entries, entry)[value_field]
                    if value:
                        return value
                entry = entries.find(packed_index, entry + 1)
            position = self.data.find(needle, position + 1, end)
        return 0
