"""SDT argument specs -> Operand: a table of every form, the specs of real
binaries (read independently with readelf), specs gcc emits for a fixture
compiled here, and hypothesis fuzzing (garbage never raises; generated valid
specs round-trip field for field)."""
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdtrace.discovery.operands import (IMMEDIATE, MEMORY, REGISTER, RIP, SIB, UNPARSED, VECTOR,
                                        Operand, describe, parse_arguments, parse_operand)

MACHINES = ("x86_64", "i386", "aarch64", "arm", "ppc64", "s390x", "riscv64")
KINDS = {REGISTER, MEMORY, SIB, RIP, IMMEDIATE, VECTOR, UNPARSED}
from helpers import REAL_SDT_BINARIES as REAL_BINARIES
from helpers import readelf_notes


def op(spec, size, signed, kind, is_float=False, **fields):
    return Operand(spec, size, signed, is_float, kind, **fields)


PARSED = [
    # x86_64 immediates, wrapped to the spec's size and signedness
    ("x86_64", op("4@$5", 4, False, IMMEDIATE, value=5)),
    ("x86_64", op("4@$0x10", 4, False, IMMEDIATE, value=16)),
    ("x86_64", op("1@$-127", 1, False, IMMEDIATE, value=129)),
    ("x86_64", op("-1@$-127", 1, True, IMMEDIATE, value=-127)),
    ("x86_64", op("-4@$4294967295", 4, True, IMMEDIATE, value=-1)),
    ("x86_64", op("8@$-1", 8, False, IMMEDIATE, value=18446744073709551615)),
    ("x86_64", op("-2@$0xffff", 2, True, IMMEDIATE, value=-1)),
    ("x86_64", op("1@$300", 1, False, IMMEDIATE, value=44)),
    # x86_64 registers at every width
    ("x86_64", op("8@%rax", 8, False, REGISTER, register="rax")),
    ("x86_64", op("-4@%eax", 4, True, REGISTER, register="rax")),
    ("x86_64", op("2@%ax", 2, False, REGISTER, register="rax")),
    ("x86_64", op("1@%al", 1, False, REGISTER, register="rax")),
    ("x86_64", op("1@%ah", 1, False, REGISTER, register="rax", bit_offset=8)),
    ("x86_64", op("-1@%bh", 1, True, REGISTER, register="rbx", bit_offset=8)),
    ("x86_64", op("1@%ch", 1, False, REGISTER, register="rcx", bit_offset=8)),
    ("x86_64", op("1@%dh", 1, False, REGISTER, register="rdx", bit_offset=8)),
    ("x86_64", op("2@%bx", 2, False, REGISTER, register="rbx")),
    ("x86_64", op("4@%ecx", 4, False, REGISTER, register="rcx")),
    ("x86_64", op("1@%dl", 1, False, REGISTER, register="rdx")),
    ("x86_64", op("8@%rsi", 8, False, REGISTER, register="rsi")),
    ("x86_64", op("-4@%esi", 4, True, REGISTER, register="rsi")),
    ("x86_64", op("2@%si", 2, False, REGISTER, register="rsi")),
    ("x86_64", op("1@%sil", 1, False, REGISTER, register="rsi")),
    ("x86_64", op("-4@%edi", 4, True, REGISTER, register="rdi")),
    ("x86_64", op("2@%di", 2, False, REGISTER, register="rdi")),
    ("x86_64", op("-1@%dil", 1, True, REGISTER, register="rdi")),
    ("x86_64", op("8@%rbp", 8, False, REGISTER, register="rbp")),
    ("x86_64", op("4@%ebp", 4, False, REGISTER, register="rbp")),
    ("x86_64", op("2@%bp", 2, False, REGISTER, register="rbp")),
    ("x86_64", op("1@%bpl", 1, False, REGISTER, register="rbp")),
    ("x86_64", op("8@%rsp", 8, False, REGISTER, register="rsp")),
    ("x86_64", op("4@%esp", 4, False, REGISTER, register="rsp")),
    ("x86_64", op("2@%sp", 2, False, REGISTER, register="rsp")),
    ("x86_64", op("1@%spl", 1, False, REGISTER, register="rsp")),
    ("x86_64", op("8@%r8", 8, False, REGISTER, register="r8")),
    ("x86_64", op("-4@%r9d", 4, True, REGISTER, register="r9")),
    ("x86_64", op("2@%r12w", 2, False, REGISTER, register="r12")),
    ("x86_64", op("1@%r15b", 1, False, REGISTER, register="r15")),
    # x86_64 memory
    ("x86_64", op("8@-0x18(%rbp)", 8, False, MEMORY, base="rbp", offset=-24)),
    ("x86_64", op("-4@-20(%rbp)", 4, True, MEMORY, base="rbp", offset=-20)),
    ("x86_64", op("8@(%rsp)", 8, False, MEMORY, base="rsp")),
    ("x86_64", op("8@0x10(%r12)", 8, False, MEMORY, base="r12", offset=16)),
    ("x86_64", op("8@0xffffffffffffffe8(%rbp)", 8, False, MEMORY, base="rbp", offset=-24)),
    ("x86_64", op("8@8(%rax,%rbx,4)", 8, False, SIB, base="rax", index="rbx", scale=4, offset=8)),
    ("x86_64", op("-1@-96(%rbp,%rax,8)", 1, True, SIB, base="rbp", index="rax", scale=8, offset=-96)),
    ("x86_64", op("8@(%rsi,%rdx)", 8, False, SIB, base="rsi", index="rdx", scale=1)),
    ("x86_64", op("8@(,%rax,8)", 8, False, SIB, base=None, index="rax", scale=8)),
    ("x86_64", op("4@(%r8,%r9,2)", 4, False, SIB, base="r8", index="r9", scale=2)),
    # x86_64 rip-relative
    ("x86_64", op("-4@counter(%rip)", 4, True, RIP, symbol="counter")),
    ("x86_64", op("-4@counter+4(%rip)", 4, True, RIP, symbol="counter", offset=4)),
    ("x86_64", op("8@counter-8(%rip)", 8, False, RIP, symbol="counter", offset=-8)),
    ("x86_64", op("8@8+CheckpointStats(%rip)", 8, False, RIP, symbol="CheckpointStats", offset=8)),
    ("x86_64", op("8@.LC0(%rip)", 8, False, RIP, symbol=".LC0")),
    ("x86_64", op("4@foo.1234(%rip)", 4, False, RIP, symbol="foo.1234")),
    ("x86_64", op("8@_ZN3fooE+0x10(%rip)", 8, False, RIP, symbol="_ZN3fooE", offset=16)),
    ("x86_64", op("8@foo$bar@GOTPCREL(%rip)", 8, False, RIP, symbol="foo$bar@GOTPCREL")),
    ("x86_64", op("8@16(%rip)", 8, False, RIP, symbol=None, offset=16)),
    # x86_64 vector registers, and the old bare form (word size, unsigned)
    ("x86_64", op("8f@%xmm0", 8, False, VECTOR, is_float=True, register="xmm0")),
    ("x86_64", op("-4f@%xmm15", 4, True, VECTOR, is_float=True, register="xmm15")),
    ("x86_64", op("8@%ymm3", 8, False, VECTOR, register="ymm3")),
    ("x86_64", op("8f@%rax", 8, False, REGISTER, is_float=True, register="rax")),
    ("x86_64", op("%edi", 8, False, REGISTER, register="rdi")),
    ("x86_64", op("-8(%rbp)", 8, False, MEMORY, base="rbp", offset=-8)),
    # i386: canonical names are the 32-bit ones
    ("i386", op("-4@%eax", 4, True, REGISTER, register="eax")),
    ("i386", op("2@%dx", 2, False, REGISTER, register="edx")),
    ("i386", op("1@%ah", 1, False, REGISTER, register="eax", bit_offset=8)),
    ("i386", op("1@%bl", 1, False, REGISTER, register="ebx")),
    ("i386", op("4@%esi", 4, False, REGISTER, register="esi")),
    ("i386", op("4@8(%ebp)", 4, False, MEMORY, base="ebp", offset=8)),
    ("i386", op("4@4(%eax,%ecx,4)", 4, False, SIB, base="eax", index="ecx", scale=4, offset=4)),
    ("i386", op("-4@$-1", 4, True, IMMEDIATE, value=-1)),
    ("i386", op("%ecx", 4, False, REGISTER, register="ecx")),
    # aarch64
    ("aarch64", op("-8@x0", 8, True, REGISTER, register="x0")),
    ("aarch64", op("8@x30", 8, False, REGISTER, register="x30")),
    ("aarch64", op("-4@w3", 4, True, REGISTER, register="x3")),
    ("aarch64", op("8@sp", 8, False, REGISTER, register="sp")),
    ("aarch64", op("4@wsp", 4, False, REGISTER, register="sp")),
    ("aarch64", op("8@[sp]", 8, False, MEMORY, base="sp")),
    ("aarch64", op("-8@[x29, -16]", 8, True, MEMORY, base="x29", offset=-16)),
    ("aarch64", op("-8@[x29,#-16]", 8, True, MEMORY, base="x29", offset=-16)),
    ("aarch64", op("-4@[sp, 96]", 4, True, MEMORY, base="sp", offset=96)),
    ("aarch64", op("8@[sp, 8]", 8, False, MEMORY, base="sp", offset=8)),
    ("aarch64", op("8@[x0, x1]", 8, False, SIB, base="x0", index="x1", scale=1)),
    ("aarch64", op("8@[x0, x1, lsl #3]", 8, False, SIB, base="x0", index="x1", scale=8)),
    ("aarch64", op("4@#5", 4, False, IMMEDIATE, value=5)),
    ("aarch64", op("4@5", 4, False, IMMEDIATE, value=5)),
    ("aarch64", op("-4@-5", 4, True, IMMEDIATE, value=-5)),
    ("aarch64", op("8@xzr", 8, False, IMMEDIATE, value=0)),
    ("aarch64", op("8f@d0", 8, False, VECTOR, is_float=True, register="d0")),
    ("aarch64", op("4f@s1", 4, False, VECTOR, is_float=True, register="s1")),
    ("aarch64", op("8@v31", 8, False, VECTOR, register="v31")),
    # arm (32-bit): canonical names are the kernel's
    ("arm", op("4@r0", 4, False, REGISTER, register="r0")),
    ("arm", op("-4@r10", 4, True, REGISTER, register="r10")),
    ("arm", op("4@fp", 4, False, REGISTER, register="fp")),
    ("arm", op("4@r11", 4, False, REGISTER, register="fp")),
    ("arm", op("4@ip", 4, False, REGISTER, register="ip")),
    ("arm", op("4@sp", 4, False, REGISTER, register="sp")),
    ("arm", op("4@lr", 4, False, REGISTER, register="lr")),
    ("arm", op("4@[r0, #4]", 4, False, MEMORY, base="r0", offset=4)),
    ("arm", op("-4@[fp, #-8]", 4, True, MEMORY, base="fp", offset=-8)),
    ("arm", op("4@[sp]", 4, False, MEMORY, base="sp")),
    ("arm", op("4@#5", 4, False, IMMEDIATE, value=5)),
    ("arm", op("8f@d0", 8, False, VECTOR, is_float=True, register="d0")),
    # ppc64: a bare number is a register, iN an immediate
    ("ppc64", op("8@3", 8, False, REGISTER, register="r3")),
    ("ppc64", op("-4@%r3", 4, True, REGISTER, register="r3")),
    ("ppc64", op("8@r31", 8, False, REGISTER, register="r31")),
    ("ppc64", op("8@-16(31)", 8, False, MEMORY, base="r31", offset=-16)),
    ("ppc64", op("-8@16(%r1)", 8, True, MEMORY, base="r1", offset=16)),
    ("ppc64", op("8@8(r1)", 8, False, MEMORY, base="r1", offset=8)),
    ("ppc64", op("4@i5", 4, False, IMMEDIATE, value=5)),
    ("ppc64", op("-4@i-5", 4, True, IMMEDIATE, value=-5)),
    ("ppc64", op("8@9,10", 8, False, SIB, base="r9", index="r10", scale=1)),
    ("ppc64", op("8@0,10", 8, False, SIB, base=None, index="r10", scale=1)),
    ("ppc64", op("8f@f1", 8, False, VECTOR, is_float=True, register="f1")),
    # s390x
    ("s390x", op("-8@%r2", 8, True, REGISTER, register="r2")),
    ("s390x", op("8@%r15", 8, False, REGISTER, register="r15")),
    ("s390x", op("8@160(%r15)", 8, False, MEMORY, base="r15", offset=160)),
    ("s390x", op("-2@-28(%r15)", 2, True, MEMORY, base="r15", offset=-28)),
    ("s390x", op("8@8(%r1,%r2)", 8, False, SIB, base="r2", index="r1", scale=1, offset=8)),
    ("s390x", op("8@8(%r0,%r2)", 8, False, MEMORY, base="r2", offset=8)),
    ("s390x", op("4@71", 4, False, IMMEDIATE, value=71)),
    ("s390x", op("-4@-1", 4, True, IMMEDIATE, value=-1)),
    ("s390x", op("8f@%f0", 8, False, VECTOR, is_float=True, register="f0")),
    # riscv64
    ("riscv64", op("-8@a0", 8, True, REGISTER, register="a0")),
    ("riscv64", op("8@ra", 8, False, REGISTER, register="ra")),
    ("riscv64", op("8@fp", 8, False, REGISTER, register="s0")),
    ("riscv64", op("8@x10", 8, False, REGISTER, register="a0")),
    ("riscv64", op("8@s11", 8, False, REGISTER, register="s11")),
    ("riscv64", op("8@8(sp)", 8, False, MEMORY, base="sp", offset=8)),
    ("riscv64", op("-8@-88(s0)", 8, True, MEMORY, base="s0", offset=-88)),
    ("riscv64", op("4@5", 4, False, IMMEDIATE, value=5)),
    ("riscv64", op("8@zero", 8, False, IMMEDIATE, value=0)),
    ("riscv64", op("8f@fa0", 8, False, VECTOR, is_float=True, register="fa0")),
]


@pytest.mark.parametrize("machine, expected", PARSED, ids=[f"{m}:{o.text}" for m, o in PARSED])
def test_parses_every_form(machine, expected):
    assert parse_operand(expected.text, machine) == expected


UNPARSEABLE = [
    # machine, spec, size kept (0 if unknown), error
    ("x86_64", "8@%st", 8, "unknown register %st"),
    ("x86_64", "8@%st(1)", 8, "unknown register"),
    ("x86_64", "8@~!?", 8, "unrecognized operand"),
    ("x86_64", "8@%fs:0x28", 8, "segment override not supported"),
    ("x86_64", "8@counter(,%rax,8)", 8, "symbol address without %rip base not supported"),
    ("x86_64", "8@counter", 8, "absolute address not supported"),
    ("x86_64", "8@0x601040", 8, "absolute address not supported"),
    ("x86_64", "8@(%eax)", 8, "bad address register %eax"),
    ("x86_64", "8@(%rax,%rsp)", 8, "%rsp cannot be an index register"),
    ("x86_64", "8@(%rax,%rbx,3)", 8, "bad scale 3"),
    ("x86_64", "8@(%rax,%rbx,4,5)", 8, "too many address parts"),
    ("x86_64", "8@%rip", 8, "unknown register %rip"),
    ("x86_64", "8@$sym", 8, "bad immediate"),
    ("x86_64", "8@$0x10000000000000000", 8, "immediate out of 64-bit range"),
    ("x86_64", "8@0x10000000000000000(%rax)", 8, "offset out of 64-bit range"),
    ("x86_64", "3@%rax", 0, "bad size 3"),
    ("x86_64", "16f@%st", 0, "bad size 16"),
    ("x86_64", "8@", 8, "missing operand"),
    ("x86_64", "8@" + "(" * 300, 8, "argument longer than 256 characters"),
    ("i386", "1@%sil", 1, "unknown register %sil"),
    ("i386", "8@%rax", 8, "unknown register %rax"),
    ("i386", "4@x(%rip)", 4, "symbol address without %rip base not supported"),
    ("aarch64", "8@x31", 8, "unknown register x31"),
    ("aarch64", "8@[w0]", 8, "bad address register w0"),
    ("aarch64", "8@[x0, 8]!", 8, "writeback or post-index address not supported"),
    ("aarch64", "8@[x0, w1, sxtw]", 8, "bad address register w1"),
    ("arm", "4@[r0, -r1]", 4, "bad address register"),
    ("ppc64", "8@32", 8, "unknown register 32"),
    ("ppc64", "8@8(0)", 8, "absolute address not supported"),
    ("s390x", "8@%r16", 8, "unknown register %r16"),
    ("s390x", "8@8(%r0)", 8, "absolute address not supported"),
    ("riscv64", "8@8(zero)", 8, "absolute address not supported"),
    ("riscv64", "8@q0", 8, "unknown register q0"),
    ("sparc", "8@%o0", 8, "unsupported architecture sparc"),
    ("", "-4@x", 4, "unsupported architecture ''"),
]


@pytest.mark.parametrize("machine, spec, size, error", UNPARSEABLE,
                         ids=[f"{m}:{s[:24]}" for m, s, _, _ in UNPARSEABLE])
def test_refuses_what_it_cannot_locate(machine, spec, size, error):
    parsed = parse_operand(spec, machine)
    assert (parsed.kind, parsed.size, parsed.error) == (UNPARSED, size, error)
    assert describe(parsed) == f"? unparsed({error})"


def test_keeps_sign_and_float_flags_of_unparsed_specs():
    assert parse_operand("-4f@%st", "x86_64") == op("-4f@%st", 4, True, UNPARSED, is_float=True,
                                                    error="unknown register %st")


def test_splits_outside_brackets_only():
    text = "  -8@[x29, -16]\t8@x0 -4@[sp,  #8]  8@#3 "
    assert [o.text for o in parse_arguments(text, "aarch64")] == [
        "-8@[x29, -16]", "8@x0", "-4@[sp,  #8]", "8@#3"]
    assert parse_arguments("", "x86_64") == ()
    assert parse_arguments(" \t\n", "x86_64") == ()


def test_every_machine_refuses_garbage_for_every_spec():
    assert [o.error for o in parse_arguments("8@%rax x", "vax")] == [
        "unsupported architecture vax", "unsupported architecture vax"]


@pytest.mark.parametrize("expected, description", [
    (op("-4@%edi", 4, True, REGISTER, register="rdi"), "s32 reg rdi"),
    (op("1@%ah", 1, False, REGISTER, register="rax", bit_offset=8), "u8 reg rax>>8"),
    (op("8@-8(%rbp)", 8, False, MEMORY, base="rbp", offset=-8), "u64 mem -8(rbp)"),
    (op("8@(%rsp)", 8, False, MEMORY, base="rsp"), "u64 mem (rsp)"),
    (op("8@8(%rax,%rbx,4)", 8, False, SIB, base="rax", index="rbx", scale=4, offset=8),
     "u64 sib 8(rax,rbx,4)"),
    (op("8@(,%rbx,8)", 8, False, SIB, index="rbx", scale=8), "u64 sib (,rbx,8)"),
    (op("-4@counter+4(%rip)", 4, True, RIP, symbol="counter", offset=4), "s32 rip counter+4"),
    (op("-4@counter(%rip)", 4, True, RIP, symbol="counter"), "s32 rip counter"),
    (op("8@16(%rip)", 8, False, RIP, offset=16), "u64 rip +16"),
    (op("1@$-127", 1, False, IMMEDIATE, value=129), "u8 imm 129"),
    (op("8f@%xmm0", 8, False, VECTOR, is_float=True, register="xmm0"), "f64 xmm0"),
])
def test_describes_briefly(expected, description):
    assert parse_operand(expected.text, "x86_64") == expected
    assert describe(expected) == description


# ------------------------------------------------------------ real specs --

def readelf_argument_strings(path):
    """Every note's argument string, as `readelf -n` prints it."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    return [" ".join(note.args) for note in readelf_notes(path)]


@pytest.mark.parametrize("path", REAL_BINARIES, ids=os.path.basename)
def test_parses_every_spec_of_real_binaries(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    argument_strings = readelf_argument_strings(path)
    assert argument_strings, f"{path} has no SDT notes"
    for text in argument_strings:
        parsed = parse_arguments(text, "x86_64")
        assert [o.text for o in parsed] == text.split()
        assert [o for o in parsed if o.kind == UNPARSED] == []


FIXTURE_SOURCE = r"""
#include <sys/sdt.h>
long counter[16];
struct pair { int a; long b; } pair;
double ratio;
int main(int argc, char **argv) {
    volatile long i = argc;
    DTRACE_PROBE3(fixture, constants, (signed char)-1, 300, -5L);
    DTRACE_PROBE2(fixture, globals, counter[3], pair.b);
    DTRACE_PROBE2(fixture, floats, ratio, (float)argc);
    DTRACE_PROBE2(fixture, indexed, counter[i], argv[argc]);
    DTRACE_PROBE3(fixture, narrow, (char)argc, (short)argc, (unsigned char)(argc >> 8));
    return 0;
}
"""


@pytest.mark.parametrize("optimisation", ["-O0", "-O2"])
def test_parses_what_gcc_emits(tmp_path, optimisation):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    source, binary = tmp_path / "fixture.c", tmp_path / "fixture"
    source.write_text(FIXTURE_SOURCE)
    subprocess.run(["gcc", optimisation, "-o", str(binary), str(source)], check=True)
    parsed = [parse_arguments(text, "x86_64") for text in readelf_argument_strings(str(binary))]
    assert len(parsed) == 5
    assert [o for operands in parsed for o in operands if o.kind == UNPARSED] == []
    constants = parsed[0]
    assert [(o.kind, o.size, o.signed, o.value) for o in constants] == [
        (IMMEDIATE, 1, True, -1), (IMMEDIATE, 4, True, 300), (IMMEDIATE, 8, True, -5)]
    assert [o.is_float for o in parsed[2]] == [True, True]


# ---------------------------------------------------------------- fuzzing --

def check_never_raises(text, machine):
    parsed = parse_arguments(text, machine)
    assert isinstance(parsed, tuple)
    for operand in parsed:
        assert isinstance(operand, Operand) and operand.kind in KINDS
        assert operand.text and operand.text in text
        if operand.kind == UNPARSED:
            assert operand.error and "\n" not in operand.error
        else:
            assert operand.error is None and operand.size in (1, 2, 4, 8)
        assert "\n" not in describe(operand)
    if not set(text) & set("[]()"):
        assert [o.text for o in parsed] == text.split()


@settings(max_examples=500, deadline=None)
@given(st.text(), st.sampled_from(MACHINES + ("sparc",)))
def test_fuzz_arbitrary_text_never_raises(text, machine):
    check_never_raises(text, machine)


FRAGMENTS = ["-", "1", "2", "4", "8", "f", "@", "%", "$", "#", "i", "(", ")", "[", "]", ",", " ",
             "rax", "eax", "ah", "r8d", "rip", "xmm0", "x29", "w0", "sp", "lsl", "r", "31", "0x",
             "ff", "-16", "+", "counter", ".LC0", ":", "fs", "0", "9" * 25, "\t", "!", "zero"]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join), st.sampled_from(MACHINES))
def test_fuzz_spec_like_text_never_raises(text, machine):
    check_never_raises(text, machine)


@pytest.mark.parametrize("machine", MACHINES)
def test_huge_inputs_are_refused_not_chewed(machine):
    for text in ("8@" + "9" * 1_000_000, "8@" + "(" * 100_000, "[" * 50_000 + "x" * 50_000,
                 "8@$" + "1" * 200):
        check_never_raises(text, machine)


def as_stored(value, size, signed):
    """What a `size`-byte integer of that signedness holds after storing `value`."""
    return int.from_bytes((value % (1 << 64)).to_bytes(8, "little")[:size], "little", signed=signed)


@st.composite
def numbers(draw, low, high):
    """(text, value) for an integer written in decimal or hex."""
    value = draw(st.integers(low, high))
    if draw(st.booleans()):
        return str(value), value
    return f"{'-' if value < 0 else ''}0x{abs(value):x}", value


OFFSETS = numbers(-(1 << 63), (1 << 63) - 1)
IMMEDIATES = numbers(-(1 << 63), (1 << 64) - 1)

X86_64_ROWS = [("rax", "eax", "ax", "al", "ah"), ("rbx", "ebx", "bx", "bl", "bh"),
               ("rcx", "ecx", "cx", "cl", "ch"), ("rdx", "edx", "dx", "dl", "dh"),
               ("rsi", "esi", "si", "sil", None), ("rdi", "edi", "di", "dil", None),
               ("rbp", "ebp", "bp", "bpl", None), ("rsp", "esp", "sp", "spl", None)] + [
               (f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b", None) for n in range(8, 16)]
X86_64_REGISTERS = [(name, row[0], 8 if name == row[4] else 0)
                    for row in X86_64_ROWS for name in row if name]
I386_REGISTERS = [(name, row[1], 8 if name == row[4] else 0)
                  for row in X86_64_ROWS[:8] for name in row[1:]
                  if name and name not in ("sil", "dil", "bpl", "spl")]
SYMBOLS = st.from_regex(r"[A-Za-z_.][A-Za-z0-9_.$@]{0,20}", fullmatch=True)


@st.composite
def x86_locations(draw, machine):
    """(operand text, expected fields) for a valid AT&T operand."""
    registers = X86_64_REGISTERS if machine == "x86_64" else I386_REGISTERS
    address_registers = [r[0] for r in X86_64_ROWS] if machine == "x86_64" else [
        r[1] for r in X86_64_ROWS[:8]]
    shape = draw(st.sampled_from(["register", "memory", "sib", "immediate", "vector"]
                                 + (["rip"] if machine == "x86_64" else [])))
    if shape == "register":
        name, canonical, bit_offset = draw(st.sampled_from(registers))
        return f"%{name}", {"kind": REGISTER, "register": canonical, "bit_offset": bit_offset}
    if shape == "immediate":
        text, value = draw(IMMEDIATES)
        return f"${text}", {"kind": IMMEDIATE, "value": value}
    if shape == "vector":
        name = draw(st.sampled_from(["xmm", "ymm"])) + str(draw(st.integers(0, 15)))
        return f"%{name}", {"kind": VECTOR, "register": name}
    if shape == "rip":
        symbol = draw(st.none() | SYMBOLS)
        offset = draw(st.integers(-(1 << 31), (1 << 31) - 1))
        if symbol is None:
            displacement = str(offset)
        elif offset == 0:
            displacement = symbol
        elif offset > 0 and draw(st.booleans()):
            displacement = f"{offset}+{symbol}"
        else:
            displacement = f"{symbol}{offset:+d}"
        return f"{displacement}(%rip)", {"kind": RIP, "symbol": symbol, "offset": offset}
    displacement, offset = draw(OFFSETS)
    if offset == 0 and draw(st.booleans()):
        displacement = ""
    base = draw(st.sampled_from(address_registers))
    if shape == "memory":
        return f"{displacement}(%{base})", {"kind": MEMORY, "base": base, "offset": offset}
    base = draw(st.none() | st.just(base))
    index = draw(st.sampled_from([r for r in address_registers if r not in ("rsp", "esp")]))
    scale = draw(st.sampled_from([1, 2, 4, 8]))
    scale_text = "" if scale == 1 and draw(st.booleans()) else f",{scale}"
    return (f"{displacement}({'%' + base if base else ''},%{index}{scale_text})",
            {"kind": SIB, "base": base, "index": index, "scale": scale, "offset": offset})


@st.composite
def arm_locations(draw, machine):
    """(operand text, expected fields) for aarch64 or 32-bit arm."""
    comma = draw(st.sampled_from([",", ", "]))
    hash_ = draw(st.sampled_from(["", "#"]))
    if machine == "aarch64":
        number = draw(st.integers(0, 30))
        registers = [(f"x{number}", f"x{number}"), (f"w{number}", f"x{number}"),
                     ("sp", "sp"), ("wsp", "sp")]
        address_registers = [f"x{number}", "sp"]
        vector = draw(st.sampled_from("bhsdqv")) + str(draw(st.integers(0, 31)))
    else:
        number = draw(st.integers(0, 10))
        registers = [(f"r{number}", f"r{number}"), ("r11", "fp"), ("fp", "fp"), ("r12", "ip"),
                     ("ip", "ip"), ("r13", "sp"), ("sp", "sp"), ("lr", "lr"), ("pc", "pc")]
        address_registers = [f"r{number}", "fp", "ip", "sp", "lr"]
        vector = draw(st.sampled_from("sd")) + str(draw(st.integers(0, 31)))
    shape = draw(st.sampled_from(["register", "memory", "sib", "immediate", "vector"]))
    if shape == "register":
        name, canonical = draw(st.sampled_from(registers))
        return name, {"kind": REGISTER, "register": canonical}
    if shape == "immediate":
        text, value = draw(IMMEDIATES)
        return hash_ + text, {"kind": IMMEDIATE, "value": value}
    if shape == "vector":
        return vector, {"kind": VECTOR, "register": vector}
    base = draw(st.sampled_from(address_registers))
    if shape == "memory":
        text, offset = draw(OFFSETS)
        if offset == 0 and draw(st.booleans()):
            return f"[{base}]", {"kind": MEMORY, "base": base, "offset": 0}
        return f"[{base}{comma}{hash_}{text}]", {"kind": MEMORY, "base": base, "offset": offset}
    index = draw(st.sampled_from(address_registers))
    shift = draw(st.integers(0, 3))
    shift_text = "" if shift == 0 and draw(st.booleans()) else f"{comma}lsl #{shift}"
    return (f"[{base}{comma}{index}{shift_text}]",
            {"kind": SIB, "base": base, "index": index, "scale": 1 << shift})


@st.composite
def ppc64_locations(draw):
    def spelled(number):
        return draw(st.sampled_from([str(number), f"r{number}", f"%r{number}"]))
    shape = draw(st.sampled_from(["register", "memory", "sib", "immediate"]))
    number = draw(st.integers(1, 31))
    if shape == "register":
        return spelled(number), {"kind": REGISTER, "register": f"r{number}"}
    if shape == "immediate":
        text, value = draw(IMMEDIATES)
        return f"i{text}", {"kind": IMMEDIATE, "value": value}
    if shape == "memory":
        text, offset = draw(OFFSETS)
        return f"{text}({spelled(number)})", {"kind": MEMORY, "base": f"r{number}", "offset": offset}
    index = draw(st.integers(0, 31))
    return (f"{spelled(number)},{spelled(index)}",
            {"kind": SIB, "base": f"r{number}", "index": f"r{index}", "scale": 1})


@st.composite
def s390x_locations(draw):
    shape = draw(st.sampled_from(["register", "memory", "sib", "immediate"]))
    base, index = draw(st.integers(1, 15)), draw(st.integers(1, 15))
    if shape == "register":
        number = draw(st.integers(0, 15))
        return f"%r{number}", {"kind": REGISTER, "register": f"r{number}"}
    if shape == "immediate":
        text, value = draw(IMMEDIATES)
        return text, {"kind": IMMEDIATE, "value": value}
    text, offset = draw(OFFSETS)
    if shape == "memory":
        return f"{text}(%r{base})", {"kind": MEMORY, "base": f"r{base}", "offset": offset}
    return (f"{text}(%r{index},%r{base})",
            {"kind": SIB, "base": f"r{base}", "index": f"r{index}", "scale": 1, "offset": offset})


RISCV_ABI = ("zero ra sp gp tp t0 t1 t2 s0 s1 a0 a1 a2 a3 a4 a5 a6 a7 "
             "s2 s3 s4 s5 s6 s7 s8 s9 s10 s11 t3 t4 t5 t6").split()


@st.composite
def riscv64_locations(draw):
    number = draw(st.integers(1, 31))
    name, canonical = draw(st.sampled_from([(RISCV_ABI[number], RISCV_ABI[number]),
                                            (f"x{number}", RISCV_ABI[number]), ("fp", "s0")]))
    shape = draw(st.sampled_from(["register", "memory", "immediate"]))
    if shape == "register":
        return name, {"kind": REGISTER, "register": canonical}
    if shape == "immediate":
        text, value = draw(IMMEDIATES)
        return text, {"kind": IMMEDIATE, "value": value}
    text, offset = draw(OFFSETS)
    return f"{text}({name})", {"kind": MEMORY, "base": canonical, "offset": offset}


LOCATIONS = {
    "x86_64": x86_locations("x86_64"), "i386": x86_locations("i386"),
    "aarch64": arm_locations("aarch64"), "arm": arm_locations("arm"),
    "ppc64": ppc64_locations(), "s390x": s390x_locations(), "riscv64": riscv64_locations(),
}


@st.composite
def valid_specs(draw, machine):
    """(spec text, expected Operand) built from drawn size, sign and location."""
    size = draw(st.sampled_from([1, 2, 4, 8]))
    signed, is_float = draw(st.booleans()), draw(st.booleans())
    operand, fields = draw(LOCATIONS[machine])
    if fields["kind"] == IMMEDIATE:
        fields = dict(fields, value=as_stored(fields["value"], size, signed))
    spec = f"{'-' if signed else ''}{size}{'f' if is_float else ''}@{operand}"
    return spec, Operand(spec, size, signed, is_float, **fields)


@pytest.mark.parametrize("machine", MACHINES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_valid_specs_round_trip(machine, data):
    specs = data.draw(st.lists(valid_specs(machine), min_size=1, max_size=6))
    separators = data.draw(st.lists(st.sampled_from([" ", "  ", "\t"]),
                                    min_size=len(specs), max_size=len(specs)))
    text = "".join(separator + spec for separator, (spec, _) in zip(separators, specs))
    assert parse_arguments(text, machine) == tuple(expected for _, expected in specs)
