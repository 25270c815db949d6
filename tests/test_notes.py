"""Discovery against real binaries, checked against an oracle built from readelf.

The oracle reads `readelf -n` (the notes) and `readelf -lW` / `readelf -SW`
(segments and sections) and computes file offsets itself, so a mistake in
sdtrace's ELF reader cannot also be a mistake in the expected values.
"""
import json
import os
import re
import subprocess

import pytest
from helpers import (POSTGRES_BIN, REAL_SDT_BINARIES, one_line_error, readelf, readelf_segments,
                     sdtrace)

from sdtrace.discovery import notes, operands

NOTE = re.compile(
    r"Provider: (?P<provider>\S+)\s+Name: (?P<name>\S+)\s+"
    r"Location: (?P<site>0x[0-9a-f]+), Base: (?P<base>0x[0-9a-f]+), "
    r"Semaphore: (?P<semaphore>0x[0-9a-f]+)\s+Arguments:(?P<args>[^\n]*)")


def oracle(path):
    """[(provider, name, site offset, semaphore offset or None, args)] from readelf."""
    segments = [(segment.offset, segment.vaddr, segment.filesz, "W" in segment.flags)
                for segment in readelf_segments(path) if segment.type == "LOAD"]
    base_match = re.search(r"\.stapsdt\.base\s+PROGBITS\s+([0-9a-f]+)", readelf("-S", path))
    base_section = int(base_match.group(1), 16) if base_match else None

    def file_offset(address, writable=False):
        for offset, vaddr, filesz, is_writable in segments:
            if vaddr <= address < vaddr + filesz and (is_writable or not writable):
                return address - vaddr + offset
        return None

    expected = []
    for match in NOTE.finditer(readelf("-n", path)):
        site, base = int(match["site"], 16), int(match["base"], 16)
        if base_section is not None and base:
            site += base_section - base
        semaphore = int(match["semaphore"], 16)
        expected.append((match["provider"], match["name"], file_offset(site),
                         file_offset(semaphore, writable=True) if semaphore else None,
                         match["args"].strip()))
    return expected


@pytest.mark.parametrize("path", REAL_SDT_BINARIES, ids=os.path.basename)
def test_real_binaries_agree_with_readelf(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed on this machine")
    expected = oracle(path)
    assert expected, f"readelf found no SDT notes in {path}"
    probes = notes.read_probes(path)
    assert [(p.provider, p.name, p.offset, p.semaphore, p.args) for p in probes] == expected
    for probe in probes:
        unparsed = [op.text for op in probe.operands if op.kind == operands.UNPARSED]
        assert not unparsed, f"{probe.qualified_name}: {unparsed}"
        assert len(probe.operands) == probe.args.count("@")


def test_postgres_sites_all_have_semaphores():
    """postgres 15: 71 sites, each guarded by a semaphore; some semaphores guard several sites."""
    postgres = f"{POSTGRES_BIN}/postgres"
    if not os.path.exists(postgres):
        pytest.skip("postgres 15 is not installed")
    probes = notes.read_probes(postgres)
    assert len(probes) == 71 and all(p.semaphore is not None for p in probes)
    by_semaphore = {}
    for probe in probes:
        by_semaphore.setdefault(probe.semaphore, set()).add(probe.qualified_name)
    assert len(by_semaphore) < len(probes)  # several sites of one probe share its semaphore
    assert all(len(names) == 1 for names in by_semaphore.values())  # one probe per semaphore


def test_fixture_semaphores_shared_and_per_site(fixtures):
    probes = notes.read_probes(fixtures.path("persite"))
    per_site = [p for p in probes if p.name == "hit"]
    shared = [p for p in probes if p.name == "shared"]
    assert len(per_site) == 2 and len({p.semaphore for p in per_site}) == 2
    assert len(shared) == 2 and len({p.semaphore for p in shared}) == 1
    assert all(p.semaphore is not None for p in per_site + shared)


def test_fixture_library_semaphore_in_writable_segment(fixtures):
    library = fixtures.path("libsdtsem.so")
    [tick] = [p for p in notes.read_probes(library) if p.name == "tick"]
    assert tick.semaphore == oracle(library)[0][3] != None  # noqa: E711


def test_twelve_arguments(fixtures, opt):
    [twelve] = [p for p in notes.read_probes(fixtures.path("values", opt)) if p.name == "twelve"]
    assert len(twelve.operands) == 12
    assert all(op.kind != operands.UNPARSED for op in twelve.operands)


def test_file_without_notes(fixtures):
    assert notes.read_probes(fixtures.path("nosdt")) == []


@pytest.mark.parametrize("path", REAL_SDT_BINARIES, ids=os.path.basename)
def test_rip_operands_resolve_to_symbol_addresses(path):
    """Every resolved sym+off(%rip) operand equals pyelftools' symbol value + off."""
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed on this machine")
    from elftools.elf.elffile import ELFFile

    rip = [op for probe in notes.read_probes(path) for op in probe.operands
           if op.kind == operands.RIP and op.symbol]
    if not rip:
        return
    with open(path, "rb") as elf_file:
        elf = ELFFile(elf_file)
        values = {}
        for table in (elf.get_section_by_name(".dynsym"), elf.get_section_by_name(".symtab")):
            for symbol in (table.iter_symbols() if table else ()):
                if symbol["st_value"]:
                    values.setdefault(symbol.name, symbol["st_value"])
    for operand in rip:
        if operand.symbol in values:
            assert operand.address == values[operand.symbol] + operand.offset, operand.text
        else:
            assert operand.address is None and operand.error, operand.text


# odd:code is an ordinary marker; odd:data's hand-written note puts its site on
# a data word, in a PT_LOAD segment without PF_X: no breakpoint there would
# ever be reached.
NOT_EXECUTABLE_SITE = r"""
#include <sys/sdt.h>
int data_word = 1;
__asm__(".pushsection .note.stapsdt,\"?\",\"note\"\n"
        ".balign 4\n.4byte 992f-991f, 994f-993f, 3\n991: .asciz \"stapsdt\"\n992: .balign 4\n"
        "993: .8byte data_word, 0, 0\n.asciz \"odd\"\n.asciz \"data\"\n.asciz \"-4@%edi\"\n"
        "994: .balign 4\n.popsection\n");
int main(void) { STAP_PROBE(odd, code); return data_word - 1; }
"""


@pytest.fixture(scope="module")
def not_executable(tmp_path_factory):
    directory = tmp_path_factory.mktemp("odd")
    (directory / "odd.c").write_text(NOT_EXECUTABLE_SITE)
    subprocess.run(["gcc", "-o", str(directory / "odd"), str(directory / "odd.c")], check=True)
    return str(directory / "odd")


def test_a_site_outside_executable_segments_is_flagged(not_executable):
    sites = {site.name: site for site in notes.read_probes(not_executable)}
    assert sites["code"].site_error is None
    assert "not executable" in sites["data"].site_error
    [segment] = [s for s in readelf_segments(not_executable) if s.type == "LOAD"
                 and s.offset <= sites["data"].offset < s.offset + s.filesz]
    assert "E" not in segment.flags            # readelf agrees: no PF_X there


def test_list_warns_of_a_site_that_cannot_be_armed(not_executable):
    result = sdtrace("list", "--json", not_executable)
    assert result.returncode == 0, result.stderr
    records = {record["name"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert records["code"]["site_error"] is None and "not executable" in records["data"]["site_error"]
    [warning] = result.stderr.splitlines()
    assert warning.startswith("sdtrace: warning: ") and not_executable in warning
    assert "odd:data" in warning and "not executable" in warning


@pytest.mark.kernel
def test_trace_refuses_a_site_that_cannot_be_armed(not_executable):
    one_line_error(sdtrace("trace", f"{not_executable}:odd:*"),
                   not_executable, "odd:data", "not executable")
