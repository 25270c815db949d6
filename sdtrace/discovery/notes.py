"""SDT notes -> site records: where each marker is, in the file and in memory.

``sys/sdt.h`` leaves, for every marker site, a note in ``.note.stapsdt``
(owner "stapsdt", type 3) whose descriptor holds three addresses -- the site,
the link-time address of ``.stapsdt.base`` and the semaphore (0 if none) --
then three strings: provider, name and the arguments.  A probe
(provider:name) may have several sites; each note is one site.

Addresses are link-time virtual addresses.  A uprobe and a /proc/PID/mem write
both need *file offsets*, which come from the PT_LOAD segment containing the
address.  If the file was prelinked, the site moved with ``.stapsdt.base`` and
is corrected by ``section address - note's base``.  A site is armable only
when that segment is executable (PF_X): a breakpoint anywhere else would
never be reached, so such a site is kept on the record with ``site_error``
saying why, and refused when armed.  A semaphore is usable only when it lies
in the file-backed part of a writable PT_LOAD segment: that is the page the
kernel's ref_ctr (and our /proc/PID/mem writer) will update.

The ELF identification facts that later layers need travel on every record:
the byte order (a semaphore is a 16-bit counter in the file's byte order)
and the word size (the size of a pointer, and of an operand the note wrote
without a size prefix).

Operands that name a symbol relative to %rip are resolved here against the
file's symbol tables to the link-time address of symbol+offset (which may
lie in .bss: the fetch layer addresses it relative to the site, as the
kernel does); compiler-local labels (``.LC0``) are not in any table and stay
unavailable.
"""
from collections import namedtuple

from . import operands as ops
from ..errors import SdtraceError
from .elf import PF_W, PF_X, ElfError, ElfFile

NT_STAPSDT = 3
STAPSDT_OWNER = b"stapsdt"


class Site(namedtuple("Site", "file provider name machine byteorder word_size address offset "
                             "site_error semaphore_address semaphore semaphore_error args "
                             "operands")):
    """One SDT site: a marker of probe `provider:name` at one place in one file.

    A probe (provider:name) may have several sites; sdtrace arms each site.

    file               absolute path as opened (the kernel resolves it too)
    provider, name
    machine            "x86_64", "aarch64", ... (operands.parse_arguments' machine)
    byteorder          "little" or "big": the file's (ELF EI_DATA)
    word_size          4 or 8: the file's address size (ELF EI_CLASS)
    address            site virtual address, prelink-corrected
    offset             site file offset (what uprobes take)
    site_error         why the site cannot be armed (not in an executable segment), else None
    semaphore_address  link-time address of the semaphore, 0 if none
    semaphore          semaphore file offset (the kernel's ref_ctr_offset), None if none/unusable
    semaphore_error    why a declared semaphore is unusable, else None
    args               raw argument string from the note
    operands           one Operand per argument; RIP operands carry their resolved address
    """
    __slots__ = ()

    @property
    def qualified_name(self):
        return f"{self.provider}:{self.name}"

    def check_armable(self):
        """Raises SdtraceError naming the file, probe and cause if this site cannot be armed."""
        if self.site_error:
            raise SdtraceError(f"{self.file}: {self.qualified_name}: cannot arm site "
                               f"0x{self.offset:x}: {self.site_error}")
        if self.semaphore_error:
            raise SdtraceError(f"{self.file}: {self.qualified_name}: unusable semaphore: "
                               f"{self.semaphore_error}")


def read_probes(path):
    """Every SDT site in the ELF file at `path`, as Site records in note order.

    The name is the public API's (it reads the probes of a file); what it
    returns is one record per site.  ElfError on bad input."""
    with ElfFile(path) as elf:
        notes_section = elf.section(".note.stapsdt")
        if notes_section is None:
            return []
        base_section = elf.section(".stapsdt.base")
        address_layout = elf.layout.address
        word = address_layout.size
        records = []
        for note in elf.notes(notes_section):
            if note.owner != STAPSDT_OWNER or note.type != NT_STAPSDT:
                continue
            desc = note.desc
            if len(desc) < 3 * word + 3:
                raise ElfError(path, f"truncated stapsdt note ({len(desc)} bytes)")
            site = address_layout.unpack_from(desc, 0)[0]
            note_base = address_layout.unpack_from(desc, word)[0]
            semaphore_address = address_layout.unpack_from(desc, 2 * word)[0]
            strings = bytes(desc[3 * word:]).split(b"\0")
            if len(strings) < 3:
                raise ElfError(path, "stapsdt note without provider, name and arguments")
            provider, name, args = (s.decode("utf-8", "replace") for s in strings[:3])
            if base_section is not None and note_base:
                site = (site + base_section.addr - note_base) & ((1 << (8 * word)) - 1)
            records.append((provider, name, site, semaphore_address, args))
        return _sites(elf, path, records)


def _sites(elf, path, records):
    places = {}   # site address -> (file offset, site_error)
    for _provider, _name, address, _sem, _args in records:
        if address not in places:
            places[address] = _site_offset(elf, path, address)
    parsed = [ops.parse_arguments(args, elf.machine, elf.word_size) for *_rest, args in records]
    symbols = _rip_symbols(elf, parsed)
    sites = []
    for (provider, name, address, semaphore_address, args), operands in zip(records, parsed):
        offset, site_error = places[address]
        semaphore, semaphore_error = _semaphore_offset(elf, semaphore_address)
        if symbols is not None:
            operands = tuple(_resolve_rip(op, symbols) for op in operands)
        sites.append(Site(path, provider, name, elf.machine, elf.byteorder, elf.word_size,
                          address, offset, site_error, semaphore_address, semaphore,
                          semaphore_error, args, operands))
    return sites


def _site_offset(elf, path, address):
    """(file offset, site_error) of the site at `address`."""
    segment = elf.load_segment(address)
    if segment is None:
        raise ElfError(path, f"SDT site 0x{address:x} lies outside every loaded segment")
    error = None
    if not segment.flags & PF_X:
        error = f"site 0x{address:x} lies in a segment that is not executable"
    return address - segment.vaddr + segment.offset, error


def _semaphore_offset(elf, address):
    if not address:
        return None, None
    segment = elf.load_segment(address)
    if segment is None:
        return None, f"semaphore 0x{address:x} is not in the file-backed part of any loaded segment"
    if not segment.flags & PF_W:
        return None, f"semaphore 0x{address:x} lies in a read-only segment"
    return address - segment.vaddr + segment.offset, None


def _rip_symbols(elf, parsed):
    wanted = {op.symbol for operands in parsed for op in operands
              if op.kind == ops.RIP and op.symbol}
    return elf.symbol_values(wanted) if wanted else None


def _resolve_rip(operand, symbols):
    if operand.kind != ops.RIP or not operand.symbol:
        return operand
    if "@" in operand.symbol:
        return operand._replace(error=f"{operand.symbol} names a GOT slot, not the variable")
    value = symbols.get(operand.symbol)
    if value is None:
        return operand._replace(error=f"symbol {operand.symbol} is not in the symbol tables")
    return operand._replace(address=value + operand.offset)
