"""Discovery on real foreign-architecture ELF files: 32/64-bit, little/big-endian.

Listing must work on a file of any architecture sdtrace knows, whatever the
machine it runs on.  The session builds small programs for other machines
into tests/fixtures/build/foreign/, once (a digest of the sources and of the
recipe below decides, under a lock, as helpers.py does for the C fixtures):

  i386-O0, i386-O2  ELF32 LE  gcc -m32 with sys/sdt.h (operands picked by gcc)
  s390x, s390       ELF64 BE, ELF32 BE  s390x-linux-gnu binutils (-m64, -m31)
  ppc64, ppc        ELF64 BE, ELF32 BE  powerpc64-linux-gnu binutils (-a64, -a32)
  aarch64           ELF64 LE  aarch64-linux-gnu binutils

The cross binutils have no C compiler, so the assembly fixtures write the
note sys/sdt.h would emit with the macros of fixtures/foreign/stapsdt.inc, and
their arguments in the target's own operand syntax.

Each file is checked against readelf, which decodes every one of these
formats independently of sdtrace: its class, byte order and machine
(readelf -h); every note's provider, name, site file offset, semaphore file
offset and arguments (readelf -n, with offsets from the PT_LOAD segments of
readelf -lW).  Every operand must decode, the assembled ones to exactly the
location their source wrote, and `sdtrace list --json` must say the same.

.ci/run installs the cross binutils as required packages: without them these
tests fail with the set-up hint.  gcc-multilib is optional: without it the
i386 tests skip, saying so.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple

import pytest
from helpers import BUILD_DIR, FIXTURES_DIR, SET_UP_HINT, readelf, readelf_notes, readelf_segments

from sdtrace.discovery import notes
from sdtrace.discovery.operands import IMMEDIATE, MEMORY, REGISTER, SIB, UNPARSED

SOURCE_DIR = os.path.join(FIXTURES_DIR, "foreign")
FOREIGN_BUILD_DIR = os.path.join(BUILD_DIR, "foreign")

# output -> (source, binutils target triple, assembler flags, linker flags, address size)
ASSEMBLED = {
    "s390x": ("s390.s", "s390x-linux-gnu", ("-m64",), (), 8),
    "s390": ("s390.s", "s390x-linux-gnu", ("-m31",), ("-m", "elf_s390"), 4),
    "ppc64": ("ppc.s", "powerpc64-linux-gnu", ("-a64",), (), 8),
    "ppc": ("ppc.s", "powerpc64-linux-gnu", ("-a32",), ("-m", "elf32ppc"), 4),
    "aarch64": ("aarch64.s", "aarch64-linux-gnu", (), (), 8),
}
# output -> gcc -m32 optimisation level; the source is i386.c
COMPILED = {"i386-O0": "-O0", "i386-O2": "-O2"}
I386_CFLAGS = ("-m32", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
I386_PACKAGE = "gcc-multilib"   # optional in .ci/run

# output -> what readelf -h says of it (class, byte order) and sdtrace's machine name
# (operands.py's grammar: 32-bit s390 and PowerPC share their 64-bit siblings')
ELF_KINDS = {
    "i386-O0": ("ELF32", "little endian", "i386"),
    "i386-O2": ("ELF32", "little endian", "i386"),
    "s390x": ("ELF64", "big endian", "s390x"),
    "s390": ("ELF32", "big endian", "s390x"),
    "ppc64": ("ELF64", "big endian", "ppc64"),
    "ppc": ("ELF32", "big endian", "ppc64"),
    "aarch64": ("ELF64", "little endian", "aarch64"),
}
READELF_MACHINES = {"Intel 80386": "i386", "IBM S/390": "s390x", "PowerPC64": "ppc64",
                    "PowerPC": "ppc64", "AArch64": "aarch64"}

# source -> probe name -> ((argument spec, the Operand fields it must decode to), ...)
ASSEMBLED_OPERANDS = {
    "s390.s": {
        "fire": (("8@%r2", {"kind": REGISTER, "register": "r2"}),
                 ("-4@160(%r15)", {"kind": MEMORY, "base": "r15", "offset": 160}),
                 ("4@-1", {"kind": IMMEDIATE, "value": 0xffffffff}),
                 ("8@8(%r3,%r11)", {"kind": SIB, "base": "r11", "index": "r3", "scale": 1,
                                    "offset": 8})),
        "plain": (("-8@%r3", {"kind": REGISTER, "register": "r3"}),
                  ("%r4", {"kind": REGISTER, "register": "r4"})),
    },
    "ppc.s": {
        "fire": (("8@3", {"kind": REGISTER, "register": "r3"}),
                 ("-4@-8(31)", {"kind": MEMORY, "base": "r31", "offset": -8}),
                 ("4@i5", {"kind": IMMEDIATE, "value": 5}),
                 ("8@9,10", {"kind": SIB, "base": "r9", "index": "r10", "scale": 1,
                             "offset": 0})),
        "plain": (("-8@%r4", {"kind": REGISTER, "register": "r4"}),
                  ("%r5", {"kind": REGISTER, "register": "r5"})),
    },
    "aarch64.s": {
        "fire": (("8@x0", {"kind": REGISTER, "register": "x0"}),
                 ("-4@[sp, 16]", {"kind": MEMORY, "base": "sp", "offset": 16}),
                 ("-8@[x29, -16]", {"kind": MEMORY, "base": "x29", "offset": -16}),
                 ("4@w1", {"kind": REGISTER, "register": "x1"}),
                 ("8@[x1, x2, lsl 3]", {"kind": SIB, "base": "x1", "index": "x2", "scale": 8,
                                        "offset": 0}),
                 ("-4@-5", {"kind": IMMEDIATE, "value": -5})),
        "plain": (("-8@x3", {"kind": REGISTER, "register": "x3"}),),
    },
}


# --- building the foreign files ---------------------------------------------

Unavailable = namedtuple("Unavailable", "reason optional")


def foreign_digest():
    """What the files are built from: every source in SOURCE_DIR, and the recipe."""
    digest = hashlib.sha256(repr((ASSEMBLED, COMPILED, I386_CFLAGS)).encode())
    for name in sorted(os.listdir(SOURCE_DIR)):
        with open(os.path.join(SOURCE_DIR, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()


def run_tool(argv, output):
    """Runs one build step; fails the test with its messages if it fails."""
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        pytest.fail(f"building foreign fixture {output} failed: {' '.join(argv)}\n{result.stdout}",
                    pytrace=False)


def missing_binutils(triple):
    for tool in ("as", "ld"):
        if shutil.which(f"{triple}-{tool}") is None:
            return Unavailable(f"{triple}-{tool} is not installed (package binutils-{triple})",
                               optional=False)
    return None


def assemble(output, scratch):
    source, triple, assembler_flags, linker_flags, address_size = ASSEMBLED[output]
    missing = missing_binutils(triple)
    if missing:
        return missing
    object_file = os.path.join(scratch, output + ".o")
    run_tool([f"{triple}-as", *assembler_flags, "--defsym", f"STAPSDT_WORD={address_size}",
              "-I", SOURCE_DIR, "-o", object_file, os.path.join(SOURCE_DIR, source)], output)
    run_tool([f"{triple}-ld", *linker_flags, "-o", os.path.join(scratch, output), object_file],
             output)
    return None


def gcc_m32_works(scratch):
    """Whether gcc -m32 links a program at all (it needs gcc-multilib's 32-bit libraries)."""
    if shutil.which("gcc") is None:
        return False
    probe = subprocess.run(["gcc", "-m32", "-x", "c", "-o", os.path.join(scratch, "m32"), "-"],
                           input="int main(void) { return 0; }\n", capture_output=True, text=True)
    return probe.returncode == 0


def compile_i386(output, scratch):
    if not gcc_m32_works(scratch):
        return Unavailable(f"gcc -m32 cannot build programs (package {I386_PACKAGE} is not "
                           f"installed); the ELF32 little-endian i386 fixtures are not built",
                           optional=True)
    # sys/sdt.h lives in the host's multiarch include directory, which gcc -m32
    # does not search; the header is the same for every architecture.
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True,
                               check=True).stdout.strip()
    run_tool(["gcc", COMPILED[output], *I386_CFLAGS, "-idirafter", f"/usr/include/{multiarch}",
              "-o", os.path.join(scratch, output), os.path.join(SOURCE_DIR, "i386.c")], output)
    return None


def build_foreign():
    """{output: path, or Unavailable} for every file of ELF_KINDS; safe to race."""
    os.makedirs(FOREIGN_BUILD_DIR, exist_ok=True)
    digest = foreign_digest()
    built = {}
    with open(os.path.join(FOREIGN_BUILD_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for output in ELF_KINDS:
            path = os.path.join(FOREIGN_BUILD_DIR, output)
            stamp = path + ".digest"
            try:
                with open(stamp) as stamp_file:
                    current = stamp_file.read() == digest and os.path.exists(path)
            except FileNotFoundError:
                current = False
            if current:
                built[output] = path
                continue
            with tempfile.TemporaryDirectory(dir=FOREIGN_BUILD_DIR) as scratch:
                build = assemble if output in ASSEMBLED else compile_i386
                unavailable = build(output, scratch)
                if unavailable:
                    built[output] = unavailable
                    continue
                os.replace(os.path.join(scratch, output), path)
            with open(stamp, "w") as stamp_file:
                stamp_file.write(digest)
            built[output] = path
    return built


@pytest.fixture(scope="session")
def foreign_files():
    return build_foreign()


@pytest.fixture(params=list(ELF_KINDS))
def foreign(request, foreign_files):
    """(output name, path) of one foreign file; skips or fails if it cannot be built."""
    built = foreign_files[request.param]
    if isinstance(built, Unavailable):
        if built.optional:
            pytest.skip(built.reason)
        pytest.fail(f"cannot build foreign fixture {request.param}: {built.reason}; "
                    f"{SET_UP_HINT}", pytrace=False)
    return request.param, built


# --- the oracle: readelf ----------------------------------------------------

def readelf_header(path):
    """{"Class": "ELF32", "Data": "2's complement, big endian", "Machine": ...} of readelf -h."""
    fields = {}
    for line in readelf("-h", path).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


# What the oracle and sdtrace must agree on for each probe site; args with single spaces.
ProbeFacts = namedtuple("ProbeFacts", "provider name offset semaphore args")


def readelf_probes(path):
    """[ProbeFacts] from readelf: semaphore is a file offset in a writable PT_LOAD, or None."""
    loads = [segment for segment in readelf_segments(path) if segment.type == "LOAD"]

    def file_offset(address, writable=False):
        for segment in loads:
            if (segment.vaddr <= address < segment.vaddr + segment.filesz
                    and ("W" in segment.flags or not writable)):
                return address - segment.vaddr + segment.offset
        raise AssertionError(f"{path}: readelf puts {address:#x} in no "
                             f"{'writable ' if writable else ''}PT_LOAD file image")

    return [ProbeFacts(note.provider, note.name, file_offset(note.location),
                       file_offset(note.semaphore, writable=True) if note.semaphore else None,
                       " ".join(note.args))
            for note in readelf_notes(path)]


def probe_facts(probes):
    return [ProbeFacts(p.provider, p.name, p.offset, p.semaphore, " ".join(p.args.split()))
            for p in probes]


# --- the tests ----------------------------------------------------------------

def test_files_are_the_claimed_elf_kinds(foreign):
    """Guards the coverage matrix: each file really is the class, byte order and machine named."""
    output, path = foreign
    elf_class, byte_order, machine = ELF_KINDS[output]
    header = readelf_header(path)
    assert header["Class"] == elf_class
    assert header["Data"].endswith(byte_order)
    assert READELF_MACHINES[header["Machine"]] == machine


def test_notes_agree_with_readelf(foreign):
    output, path = foreign
    expected = readelf_probes(path)
    assert [(facts.provider, facts.name) for facts in expected] == [("foreign", "fire"),
                                                                    ("foreign", "plain")]
    assert expected[0].semaphore is not None, "foreign:fire's note names no semaphore"
    probes = notes.read_probes(path)
    assert probe_facts(probes) == expected
    assert {probe.machine for probe in probes} == {ELF_KINDS[output][2]}
    assert all(probe.semaphore_error is None for probe in probes)


def test_every_operand_decodes(foreign):
    output, path = foreign
    for probe in notes.read_probes(path):
        unparsed = [(op.text, op.error) for op in probe.operands if op.kind == UNPARSED]
        assert not unparsed, f"{output} {probe.qualified_name}: {unparsed}"
        if output not in ASSEMBLED:
            assert len(probe.operands) == probe.args.count("@")
            continue
        expected = ASSEMBLED_OPERANDS[ASSEMBLED[output][0]][probe.name]
        assert [op.text for op in probe.operands] == [spec for spec, _fields in expected]
        for operand, (spec, fields) in zip(probe.operands, expected):
            decoded = {field: getattr(operand, field) for field in fields}
            assert decoded == fields, f"{output} {spec}"


def test_sites_carry_the_elf_class_and_byte_order(foreign):
    """Byte order and word size come from the ELF header, whatever the machine's grammar."""
    output, path = foreign
    elf_class, byte_order, _machine = ELF_KINDS[output]
    for site in notes.read_probes(path):
        assert (site.word_size, site.byteorder) == (
            4 if elf_class == "ELF32" else 8, byte_order.split()[0])


@pytest.mark.parametrize("output", ["s390", "s390x", "ppc", "ppc64"])
def test_an_operand_without_size_is_a_word_of_the_file(foreign_files, output):
    """ "%r5" in a note (old notes had no size prefix) is 4 bytes in a 32-bit s390
    or PowerPC file, although that file shares the 64-bit sibling's grammar."""
    path = foreign_files[output]
    assert not isinstance(path, Unavailable), f"{path.reason}; {SET_UP_HINT}"
    [plain] = [site for site in notes.read_probes(path) if site.name == "plain"]
    bare = plain.operands[1]
    assert "@" not in bare.text
    assert (bare.size, bare.signed) == (ASSEMBLED[output][4], False)


def test_list_json_agrees_with_readelf(foreign):
    output, path = foreign
    listing = subprocess.run([sys.executable, "-m", "sdtrace", "list", "--json", path],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "warning" not in listing.stderr, listing.stderr
    records = [json.loads(line) for line in listing.stdout.splitlines()]
    assert {record["file"] for record in records} == {path}
    listed = [ProbeFacts(r["provider"], r["name"], r["offset"], r["semaphore"], r["args"])
              for r in records]
    assert listed == readelf_probes(path)
    assert all(operand["kind"] != UNPARSED for r in records for operand in r["operands"])
