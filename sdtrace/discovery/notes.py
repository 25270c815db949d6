"""SDT notes -> probe records: where each marker is, in the file and in memory.

``sys/sdt.h`` leaves, for every marker site, a note in ``.note.stapsdt``
(owner "stapsdt", type 3) whose descriptor holds three addresses -- the site,
the link-time address of ``.stapsdt.base`` and the semaphore (0 if none) --
then three strings: provider, name and the argument specs.

Addresses are link-time virtual addresses.  A uprobe and a /proc/PID/mem write
both need *file offsets*, which come from the PT_LOAD segment containing the
address.  If the file was prelinked, the site moved with ``.stapsdt.base`` and
is corrected by ``section address - note's base``.  A semaphore is usable only
when it lies in the file-backed part of a writable PT_LOAD segment: that is
the page the kernel's ref_ctr (and our /proc/PID/mem writer) will update.

Operands that name a symbol relative to %rip are resolved here against the
file's symbol tables to the link-time address of symbol+offset (which may
lie in .bss: the fetch layer addresses it relative to the site, as the
kernel does); compiler-local labels (``.LC0``) are not in any table and stay
unavailable.
"""
from collections import namedtuple

from . import operands as ops
from .elf import PF_W, ElfError, ElfFile

NT_STAPSDT = 3
STAPSDT_OWNER = b"stapsdt"


class Site(namedtuple("Site", "file provider name machine address offset semaphore_address "
                             "semaphore semaphore_error args operands")):
    """One SDT site: a marker of probe `provider:name` at one place in one file.

    A probe (provider:name) may have several sites; sdtrace arms each site.

    file               absolute path as opened
    provider, name
    machine            "x86_64", "aarch64", ... (operands.parse_arguments' machine)
    address            site virtual address, prelink-corrected
    offset             site file offset (what uprobes take)
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


def read_probes(path):
    """Every SDT probe site in the ELF file at `path`; ElfError on bad input."""
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
        return _probes(elf, path, records)


def _probes(elf, path, records):
    site_offsets = {}
    for _provider, _name, site, _sem, _args in records:
        if site not in site_offsets:
            segment = elf.load_segment(site)
            if segment is None:
                raise ElfError(path, f"probe site 0x{site:x} lies outside every loaded segment")
            site_offsets[site] = site - segment.vaddr + segment.offset
    parsed = [ops.parse_arguments(args, elf.machine) for *_rest, args in records]
    symbols = _rip_symbols(elf, parsed)
    probes = []
    for (provider, name, site, semaphore_address, args), operands in zip(records, parsed):
        semaphore, semaphore_error = _semaphore_offset(elf, semaphore_address)
        if symbols is not None:
            operands = tuple(_resolve_rip(op, symbols) for op in operands)
        probes.append(Site(path, provider, name, elf.machine, site, site_offsets[site],
                            semaphore_address, semaphore, semaphore_error, args, operands))
    return probes


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
