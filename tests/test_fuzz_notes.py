"""Fuzzing the note reader: any bytes give probes or one clean ElfError.

Two sources of input: arbitrary bytes, and a real fixture ELF file with bytes
overwritten where it hurts most (headers, program/section tables, the notes).
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdtrace.discovery import notes
from sdtrace.discovery.elf import ElfError, ElfFile
from sdtrace.errors import SdtraceError

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def read(tmp_path, blob):
    path = tmp_path / "fuzzed.elf"
    path.write_bytes(blob)
    try:
        probes = notes.read_probes(str(path))
    except SdtraceError as error:
        message = str(error)
        assert message and "\n" not in message and str(path) in message
        return None
    for probe in probes:
        assert isinstance(probe.provider, str) and isinstance(probe.offset, int)
    return probes


@FUZZ
@given(blob=st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path, blob):
    read(tmp_path, blob)


@FUZZ
@given(blob=st.binary(min_size=48, max_size=400))
def test_arbitrary_bytes_behind_an_elf_identification(tmp_path, blob):
    for ident in (b"\x7fELF\x02\x01\x01", b"\x7fELF\x01\x02\x01"):
        read(tmp_path, ident + blob)


@pytest.fixture(scope="module")
def sample(fixtures):
    """A 64-bit little-endian fixture and its sensitive byte ranges."""
    path = fixtures.path("persite")
    with open(path, "rb") as elf_file:
        original = elf_file.read()
    phoff, shoff = struct.unpack_from("<QQ", original, 0x20)
    with ElfFile(path) as elf:
        section = elf.section(".note.stapsdt")
        hot = [(0, 64), (section.offset, section.offset + section.size),
               (phoff, phoff + 56 * len(elf.segments)), (shoff, shoff + 64 * len(elf.sections))]
    return original, hot


@FUZZ
@given(data=st.data())
def test_mutated_real_file(tmp_path, sample, data):
    original, hot = sample
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        start, end = data.draw(st.sampled_from(hot))
        position = data.draw(st.integers(start, max(start, min(end, len(blob)) - 1)))
        patch = data.draw(st.binary(min_size=1, max_size=8))
        blob[position:position + len(patch)] = patch
    read(tmp_path, bytes(blob))


@FUZZ
@given(cut=st.integers(0, 4096))
def test_truncated_real_file(tmp_path, sample, cut):
    original, _hot = sample
    read(tmp_path, original[:len(original) - cut] if cut < len(original) else b"")


def test_non_elf_is_one_line_error(tmp_path):
    path = tmp_path / "text"
    path.write_text("hello world, this is not an ELF file at all" * 3)
    with pytest.raises(ElfError, match="not an ELF file"):
        notes.read_probes(str(path))
