"""The C fixture programs are what the other tests rely on.

Checked against readelf and /proc, never against sdtrace: the notes hold the
operand kinds and semaphore layouts the tracer tests need, the libraries map
the way the semaphore tests assume, and every command of the protocol
(tests/fixtures/command_loop.h) answers as documented.  Semaphores are set
here by writing the process's memory directly, as a tracer's kernel side would.
"""
import json
import os
import re

import pytest
from helpers import (COUNTER, PROGRAMS, Target, address_of, file_offset, maps, read_mem, readelf,
                     readelf_notes, readelf_segments, set_counter)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# "off(%reg)" with a base other than %rip; the offset may be empty ("(%rax)")
BASE_OFFSET_OPERAND = re.compile(r"^-?\d+f?@-?\d*\(%(?!rip)\w+\)$")
REGISTER_OPERAND = re.compile(r"^-?\d+f?@%\w+$")


def notes_named(path, name):
    return [note for note in readelf_notes(path) if note.name == name]


def semaphore_address(pid, path, note):
    """Where `note`'s semaphore lives in process `pid` (always in a writable mapping)."""
    return address_of(pid, path, file_offset(path, note.semaphore), perms="rw-p")


def set_semaphore(pid, path, note, value):
    set_counter(pid, path, file_offset(path, note.semaphore), value)


def file_mappings(pid, path):
    return [mapping for mapping in maps(pid) if mapping.path == path]


def test_every_program_speaks_the_protocol(fixtures, opt):
    for name in PROGRAMS:
        if name.endswith(".so") or name == "spawner":   # spawner: one shape per run
            continue
        args = [fixtures.path("libsdtsem.so", opt)] if name == "semuser" else []
        if name == "ldpath":   # its libraries are found through LD_LIBRARY_PATH only
            args = [f"LD_LIBRARY_PATH={os.path.dirname(fixtures.path(name, opt))}",
                    fixtures.path(name, opt)]
        program = "/usr/bin/env" if name == "ldpath" else fixtures.path(name, opt)
        target = Target(program, *args).start()
        try:
            assert os.readlink(f"/proc/{target.pid}/exe") == fixtures.path(name, opt)
            with pytest.raises(AssertionError, match="unknown command: bogus 1"):
                target.send("bogus 1")
            assert target.send("exit") == []
        finally:
            assert target.stop() == 0
        with Target(program, *args) as target:
            pass
        assert target.process.returncode == 0  # end of input is a clean exit


def test_values_lists_the_truth_of_every_probe(fixtures, opt):
    path = fixtures.path("values", opt)
    with Target(path) as target:
        truth = [json.loads(line) for line in target.send("values")]
    notes = {f"{note.provider}:{note.name}": note for note in readelf_notes(path)}
    assert [record["probe"] for record in truth] == list(notes)  # firing order is note order
    for record in truth:
        assert len(record["args"]) == len(notes[record["probe"]].args), record
    assert len(notes["values:twelve"].args) == 12
    [twelve] = [record["args"] for record in truth if record["probe"] == "values:twelve"]
    assert len(set(twelve)) == 12
    assert notes["values:nosem"].semaphore == 0
    assert all(note.semaphore for probe, note in notes.items() if probe != "values:nosem")


def test_values_truth_covers_the_extremes(fixtures):
    with Target(fixtures.path("values")) as target:
        truth = {record["probe"]: record["args"]
                 for record in map(json.loads, target.send("values"))}
    assert truth["values:signed"] == [-128, -32768, -2**31, -2**63]
    assert truth["values:unsigned"] == [255, 65535, 2**32 - 1, 2**64 - 1]
    assert truth["values:imm"][0] == 129
    assert truth["values:strings"] == ["hello world", ""]
    assert truth["values:float"] == [1.5, -2.25]


def test_values_immediates_are_in_the_notes(fixtures, opt):
    [imm] = notes_named(fixtures.path("values", opt), "imm")
    assert imm.args[:3] == ("1@$-127", "-4@$-1", "2@$-1")
    assert all("@$" in spec for spec in imm.args)


def test_values_operand_kinds_at_O2(fixtures):
    notes = {note.name: note for note in readelf_notes(fixtures.path("values", "O2"))}
    assert all(BASE_OFFSET_OPERAND.match(spec) for spec in notes["struct"].args)
    assert any(not spec.split("@")[1].startswith("(") for spec in notes["struct"].args)
    assert all(spec.endswith("(%rip)") for spec in notes["rip"].args)
    assert all(REGISTER_OPERAND.match(spec) for spec in notes["signed"].args)
    assert "-1@%al" in notes["signed"].args  # an 8-bit sub-register
    assert [spec.split("@")[0] for spec in notes["float"].args] == ["4f", "8f"]


@pytest.mark.kernel   # writes the program's semaphores through /proc/PID/mem
def test_values_guarded_follows_its_semaphore(fixtures, opt):
    path = fixtures.path("values", opt)
    [guarded] = notes_named(path, "guarded")
    with Target(path) as target:
        assert target.send("fire 2") == ["guarded 0", "guarded 0"]
        set_semaphore(target.pid, path, guarded, 1)
        assert target.send("fire 1") == ["guarded 1"]


@pytest.mark.kernel   # writes the program's semaphores through /proc/PID/mem
def test_persite_semaphores_per_site_and_shared(fixtures, opt):
    path = fixtures.path("persite", opt)
    hits, shared = notes_named(path, "hit"), notes_named(path, "shared")
    assert len(hits) == 2 and len({note.semaphore for note in hits}) == 2
    assert len(shared) == 2 and len({note.semaphore for note in shared}) == 1
    assert 0 not in {note.semaphore for note in hits + shared}
    [site1] = [note for note in hits if note.args[0] == "-4@$1"]
    with Target(path) as target:
        assert target.send("fire 2") == ["site 1 hit 0 shared 0", "site 2 hit 0 shared 0"]
        set_semaphore(target.pid, path, site1, 1)
        assert target.send("sem") == ["sem hit1=1 hit2=0 shared=0"]
        assert target.send("fire 2") == ["site 1 hit 2 shared 0", "site 2 hit 0 shared 0"]
        set_semaphore(target.pid, path, shared[0], 3)
        assert target.send("sem") == ["sem hit1=1 hit2=0 shared=3"]
        assert target.send("fire 1") == ["site 1 hit 1 shared 1", "site 2 hit 0 shared 1"]


def test_library_is_mapped_only_after_load_with_relro_split(fixtures, opt):
    library = fixtures.path("libsdtsem.so", opt)
    [tick] = readelf_notes(library)
    relro = [segment for segment in readelf_segments(library) if segment.type == "GNU_RELRO"]
    assert relro, "libsdtsem.so has no GNU_RELRO segment"
    relro_end = relro[0].vaddr + relro[0].memsz
    with Target(fixtures.path("semuser", opt), library) as target:
        assert file_mappings(target.pid, library) == []
        assert target.send("sem") == ["sem none"]
        target.send("load")
        mappings = file_mappings(target.pid, library)
        bias = next(m.start for m in mappings if m.offset == 0)  # first PT_LOAD is at vaddr 0
        semaphore = semaphore_address(target.pid, library, tick)
        [writable] = [m for m in mappings if m.start <= semaphore < m.end]
        assert writable.perms == "rw-p"
        # the loader made the RELRO part of the writable PT_LOAD read-only: its
        # pages are a separate r--p mapping that ends where the rw-p one starts
        assert writable.start == bias + relro_end // PAGE_SIZE * PAGE_SIZE
        assert any(m.perms == "r--p" and m.end == writable.start for m in mappings)
        assert len(mappings) >= 4
        assert read_mem(target.pid, semaphore, 2) == COUNTER.pack(0)


@pytest.mark.kernel   # writes the program's semaphores through /proc/PID/mem
def test_library_load_unload_fork(fixtures):
    library = fixtures.path("libsdtsem.so")
    [tick] = readelf_notes(library)
    with Target(fixtures.path("semuser"), library) as target:
        with pytest.raises(AssertionError, match="not loaded"):
            target.send("fire 1")
        target.send("load")
        assert target.send("fire 3") == ["enabled 0"]
        set_semaphore(target.pid, library, tick, 2)
        assert target.send("sem") == ["sem 2"]
        assert target.send("fire 3") == ["enabled 1"]

        [child_line] = target.send("fork")
        child = int(child_line.split()[1])
        assert child != target.pid and os.path.exists(f"/proc/{child}")
        assert target.send("sem") == ["sem 2"]  # the child inherited the memory
        set_semaphore(child, library, tick, 0)
        assert target.send("fire 1") == ["enabled 0"]
        target.send("exit")  # the child leaves; the parent reads again
        assert target.send("sem") == ["sem 2"]

        target.send("unload")
        assert file_mappings(target.pid, library) == []
        target.send("load")
        assert target.send("sem") == ["sem 0"]  # a fresh mapping of the file


def test_flood_counts_what_it_fired(fixtures, opt):
    path = fixtures.path("flood", opt)
    [hit] = readelf_notes(path)
    assert (hit.provider, hit.name, len(hit.args)) == ("flood", "hit", 2)
    with Target(path) as target:
        reply = target.send("fire 1000")
        assert reply == ["fired 0"] and int(reply.done) > 0
        set_semaphore(target.pid, path, hit, 1)
        assert target.send("fire 1000") == ["fired 1000"]


def test_nosdt_has_no_notes(fixtures, opt):
    path = fixtures.path("nosdt", opt)
    assert "stapsdt" not in readelf("-n", path)
    assert readelf_notes(path) == []
    with Target(path) as target:
        assert target.send("fire 5") == []
