"""The eBPF assembler and the code generator, root-free.

Expected encodings are written out byte by byte from the instruction set
specification (Documentation/bpf/standardization/instruction-set.rst): one
8-byte slot is opcode, registers (dst low nibble, src high nibble), s16
offset and s32 immediate, little-endian.
"""
import json
import os
import struct

import pytest
from helpers import LIBJVM
from helpers import SYSTEM_PYTHON as PYTHON

from sdtrace.discovery import notes
from sdtrace.discovery import operands as ops
from sdtrace.engine.bpf import codegen
from sdtrace.engine.bpf.records import RecordParsers
from sdtrace.engine.events import RECORDS, ArmedSite, Event, Truncated
from sdtrace.present.output import LineEmitter
from sdtrace.engine.bpf.asm import (R0, R1, R2, R3, R6, R7, R8, R9, R10, SLOT, Assembler,
                                    Instruction)
from sdtrace.errors import SdtraceError


def encoded(emit):
    code = Assembler()
    emit(code)
    return code.assemble().hex(" ", 8)


@pytest.mark.parametrize("emit, expected", [
    # ALU64 | MOV | K = 0x07 | 0xb0 | 0x00
    (lambda c: c.mov(R0, 0), "b700000000000000"),
    # ALU64 | MOV | X: dst 6, src 1 -> registers byte 0x16
    (lambda c: c.mov(R6, R1), "bf16000000000000"),
    # ALU64 | ADD | K with a negative immediate, two's complement
    (lambda c: c.alu64("add", R1, -8), "07010000f8ffffff"),
    # ALU64 | ADD | X
    (lambda c: c.alu64("add", R9, R1), "0f19000000000000"),
    # ALU64 | LSH | K, RSH | K, AND | K
    (lambda c: c.alu64("lsh", R9, 3), "6709000003000000"),
    (lambda c: c.alu64("rsh", R9, 8), "7709000008000000"),
    (lambda c: c.alu64("and", R9, 0xffff), "57090000ffff0000"),
    # ALU | MOV | X (32-bit: zero-extends) and ALU | OR | K with bit 31
    (lambda c: c.alu32("mov", R9, R9), "bc99000000000000"),
    (lambda c: c.alu32("or", R1, -(1 << 31)), "4401000000000080"),
    # LDX | MEM | DW: r9 = *(u64 *)(r6 + 128)
    (lambda c: c.load(8, R9, R6, 128), "7969800000000000"),
    # LDX | MEM | B with a negative offset from the frame pointer
    (lambda c: c.load(1, R1, R10, -8), "71a1f8ff00000000"),
    # LDX | MEM | W and H
    (lambda c: c.load(4, R1, R8, 40), "6181280000000000"),
    (lambda c: c.load(2, R1, R8, 2), "6981020000000000"),
    # STX | MEM | DW: *(u64 *)(r8 + 8) = r0
    (lambda c: c.store(8, R8, 8, R0), "7b08080000000000"),
    # ST | MEM | W: *(u32 *)(r10 - 4) = 0; ST | MEM | DW with an immediate
    (lambda c: c.store(4, R10, -4, 0), "620afcff00000000"),
    (lambda c: c.store(8, R8, 48, -1), "7a083000ffffffff"),
    # STX | ATOMIC | DW, imm = ADD
    (lambda c: c.atomic_add(8, R0, 0, R1), "db10000000000000"),
    # LD | IMM | DW: two slots, the high half in the second's immediate
    (lambda c: c.load_imm64(R1, 0x1122334455667788),
     "1801000088776655 0000000044332211"),
    (lambda c: c.load_imm64(R9, -2), "18090000feffffff 00000000ffffffff"),
    # the same with src = BPF_PSEUDO_MAP_FD
    (lambda c: c.load_map(R1, 5), "1811000005000000 0000000000000000"),
    # JMP | CALL with the helper's number, JMP | EXIT
    (lambda c: c.call("ringbuf_reserve"), "8500000083000000"),
    (lambda c: c.call("get_attach_cookie"), "85000000ae000000"),
    (lambda c: c.exit(), "9500000000000000"),
])
def test_encodings_follow_the_instruction_set(emit, expected):
    assert encoded(emit) == expected


def test_jumps_resolve_forward_and_backward_counting_wide_loads_as_two():
    code = Assembler()
    code.label("top")                       # slot 0
    code.jump("jeq", R0, 0, "end")          # slot 0 -> 4: offset 3
    code.load_imm64(R1, 1)                  # slots 1-2
    code.jump("jne", R1, R2, "top")         # slot 3 -> 0: offset -4
    code.label("end")
    code.goto("top")                        # slot 4 -> 0: offset -5
    code.jump("jsgt", R0, 0, "after")       # slot 5 -> 6: offset 0
    code.label("after")
    code.exit()
    assert code.assemble().hex(" ", 8) == (
        "1500030000000000 1801000001000000 0000000000000000 5d21fcff00000000 "
        "0500fbff00000000 6500000000000000 9500000000000000")
    assert len(code) == 7


@pytest.mark.parametrize("emit, message", [
    (lambda c: c.goto("nowhere"), "undefined label 'nowhere'"),
    (lambda c: (c.label("x"), c.label("x")), "label 'x' defined twice"),
    (lambda c: c.mov(R0, 1 << 31), "immediate 2147483648 does not fit"),
    (lambda c: c.load(8, R0, R1, 1 << 15), "offset 32768 does not fit"),
    (lambda c: c.load_imm64(R0, 1 << 64), "does not fit in 64 bits"),
    (lambda c: c.mov(0, R1), "dst must be one of R0..R10"),
    (lambda c: c.call("no_such_helper"), "unknown BPF helper 'no_such_helper'"),
    (lambda c: c.atomic_add(2, R0, 0, R1), "4 or 8 bytes"),
    (lambda c: c.jump("ja", R0, 0, "x"), "not a conditional jump"),
])
def test_mistakes_are_refused_when_assembling(emit, message):
    with pytest.raises(ValueError, match=message):
        code = Assembler()
        emit(code)
        code.assemble()


def test_a_jump_out_of_range_is_refused():
    code = Assembler()
    code.goto("far")
    for _ in range(1 << 15):
        code.mov(R0, 0)
    code.label("far")
    code.exit()
    with pytest.raises(ValueError, match="jump to 'far' 32768 does not fit"):
        code.assemble()


# --- the code generator ---------------------------------------------------------

def slots(program):
    return [Instruction(code, registers & 0xf, registers >> 4, offset, imm)
            for code, registers, offset, imm in SLOT.iter_unpack(program)]


def contains(program, sequence):
    """Whether `sequence` (Instructions) appears contiguously in `program`'s slots."""
    found = slots(program)
    return any(found[start:start + len(sequence)] == sequence
               for start in range(len(found) - len(sequence) + 1))


def assembled(emit):
    code = Assembler()
    emit(code)
    return code.instructions()


def site_named(path, name):
    [site] = [site for site in notes.read_probes(path) if site.name == name]
    return site


def program_of(site, types=()):
    plans = codegen.plan_site(site, types)
    program, layouts = codegen.generate({0: (site, plans)}, ring_fd=3, lost_fd=4)
    return program, layouts[0]


REGS = codegen.REGISTERS["x86_64"]


def test_a_sib_operand_is_computed_in_the_program(fixtures):
    """8@8(%rbx,%rcx,8): index << 3, + base, + 8, then 8 bytes read from there."""
    site = site_named(fixtures.path("addressing"), "sib")
    program, layout = program_of(site)

    def expected(code):
        code.load(8, R9, R6, REGS["rcx"])
        code.alu64("lsh", R9, 3)
        code.load(8, R1, R6, REGS["rbx"])
        code.alu64("add", R9, R1)
        code.alu64("add", R9, 8)
        code.store(8, R8, layout.argument(0), 0)
        code.mov(R1, R8)
        code.alu64("add", R1, layout.argument(0))
        code.mov(R2, 8)
        code.mov(R3, R9)
        code.call("probe_read_user")
    assert contains(program, assembled(expected))
    assert site.operands[3].base is None       # (,%rdx,8): no base register is read

    def without_base(code):
        code.load(8, R9, R6, REGS["rdx"])
        code.alu64("lsh", R9, 3)
        code.store(8, R8, layout.argument(3), 0)
    assert contains(program, assembled(without_base))


def test_a_high_byte_register_is_shifted_and_masked(fixtures):
    site = site_named(fixtures.path("addressing"), "high")
    program, layout = program_of(site)

    def expected(code):
        code.load(8, R9, R6, REGS["rax"])
        code.alu64("rsh", R9, 8)
        code.alu64("and", R9, 0xff)
        code.store(8, R8, layout.argument(0), R9)
    assert contains(program, assembled(expected))


def test_a_rip_operand_adds_the_symbol_to_the_run_time_ip(fixtures):
    site = site_named(fixtures.path("values", "O2"), "rip")
    assert site.operands[0].kind == ops.RIP
    program, _layout = program_of(site)

    def expected(code):
        code.load(8, R9, R6, REGS["rip"])
        code.alu64("add", R9, site.operands[0].address - site.address)
    assert contains(program, assembled(expected))


def test_the_program_dispatches_on_the_cookie_and_counts_losses(fixtures):
    sites = notes.read_probes(fixtures.path("values"))
    group = {site_id: (site, codegen.plan_site(site)) for site_id, site in enumerate(sites)}
    program, layouts = codegen.generate(group, ring_fd=3, lost_fd=4)
    found = slots(program)

    def prologue(code):
        code.mov(R6, R1)
        code.call("get_attach_cookie")
        code.mov(R7, R0)
    assert found[:3] == assembled(prologue)
    compared = [slot.imm for slot in found[3:3 + len(sites)]]
    assert compared == list(range(len(sites)))
    assert set(layouts) == set(range(len(sites)))

    def lost(code):
        code.call("map_lookup_elem")
        code.jump("jeq", R0, 0, "out")
        code.mov(R1, 1)
        code.atomic_add(8, R0, 0, R1)
        code.label("out")
        code.mov(R0, 0)
        code.exit()
    assert found[-6:] == assembled(lost)


def test_every_record_reserves_one_size(fixtures):
    """Records of one size make the ring an array (ringbuf.py): each block reserves the
    largest layout's size, or the size asked, never less than it holds."""
    sites = notes.read_probes(fixtures.path("values"))
    group = {site_id: (site, codegen.plan_site(site)) for site_id, site in enumerate(sites)}
    sizes = {layout.size for layout in codegen.generate(group, ring_fd=3, lost_fd=4)[1].values()}
    assert len(sizes) > 1                    # the fixture's sites differ in size

    def reserved(program):                   # r2 = size right before each ringbuf_reserve
        found = slots(program)
        return {found[index - 2].imm for index, slot in enumerate(found)
                if slot.code == 0x85 and slot.imm == 131}
    assert reserved(codegen.generate(group, ring_fd=3, lost_fd=4)[0]) == {max(sizes)}
    assert reserved(codegen.generate(group, ring_fd=3, lost_fd=4,
                                     record_size=512)[0]) == {512}
    with pytest.raises(ValueError, match="cannot hold"):
        codegen.generate(group, ring_fd=3, lost_fd=4, record_size=max(sizes) - 8)


@pytest.mark.parametrize("tree_fd, tracer_pid", [(5, None), (None, 4321), (5, 4321)])
def test_a_program_returns_first_for_the_tracer_and_for_processes_outside_the_tree(
        fixtures, tree_fd, tracer_pid):
    site = site_named(fixtures.path("values"), "nosem")
    group = {0: (site, codegen.plan_site(site))}
    plain, _layouts = codegen.generate(group, ring_fd=3, lost_fd=4)
    scoped, _layouts = codegen.generate(group, ring_fd=3, lost_fd=4, tree_fd=tree_fd,
                                        tracer_pid=tracer_pid)

    def current_tgid(code):
        code.mov(R6, R1)
        code.call("get_current_pid_tgid")
        code.alu64("rsh", R0, 32)

    def lookup_in_tree(code):
        code.store(4, R10, -4, R0)
        code.load_map(R1, tree_fd)
        code.mov(R2, R10)
        code.alu64("add", R2, -4)
        code.call("map_lookup_elem")
    found = slots(scoped)
    assert found[:3] == assembled(current_tgid)
    returns, position = [], 3          # (slot of a jump to "out", the r0 it returns for)
    if tracer_pid is not None:
        returns.append((position, tracer_pid))
        position += 1
    if tree_fd is not None:
        assert found[position:position + 6] == assembled(lookup_in_tree)
        returns.append((position + 6, 0))
        position += 7
    for at, value in returns:
        jump = found[at]
        assert (jump.code, jump.dst, jump.imm) == (0x15, 0, value)   # if r0 == value
        assert at + 1 + jump.offset == len(found) - 2                # goto "out": return 0
    assert found[position:] == assembled(lambda code: code.mov(R1, R6)) + slots(plain)[1:]


def test_sites_with_equal_plans_share_a_block(fixtures):
    site = site_named(fixtures.path("values"), "nosem")
    plans = codegen.plan_site(site)
    one, _layouts = codegen.generate({0: (site, plans)}, ring_fd=3, lost_fd=4)
    two, layouts = codegen.generate({0: (site, plans), 1: (site, plans)}, ring_fd=3, lost_fd=4)
    assert len(two) == len(one) + 8                   # one more comparison, no second block
    assert layouts[0] is layouts[1]


def test_unreadable_operands_are_planned_missing_and_typed_ones_refused(fixtures):
    site = site_named(fixtures.path("values", "O2"), "float")
    vector = site._replace(operands=(ops.parse_operand("8f@%xmm0", "x86_64"),))
    [plan] = codegen.plan_site(vector)
    assert plan.kind is None and "xmm0" in plan.unavailable
    with pytest.raises(SdtraceError, match=r"argument 0 \('8f@%xmm0'\) cannot be read as u64"):
        codegen.plan_site(vector, ("u64",))
    aarch64 = site._replace(machine="aarch64")
    assert codegen.plan_site(aarch64)[0].unavailable == \
        "the BPF executor cannot read aarch64 operands"


NEEDS_JVM = pytest.mark.skipif(not os.path.exists(LIBJVM),
                               reason="OpenJDK 17's libjvm.so is not installed")


@NEEDS_JVM
def test_a_known_providers_pointer_and_length_are_a_counted_string():
    """HotSpot's class__loaded(class_name_ptr, class_name_len, ...): the pointer is read as
    a string of the length's bytes, after every argument; an explicit type keeps it a number."""
    site = site_named(LIBJVM, "class__loaded")
    pointer, length, *_rest = codegen.plan_site(site)
    assert (pointer.string, pointer.length) == (True, 1)
    assert (length.string, length.length) == (False, None)
    assert codegen.plan_site(site, ("u64",))[0].string is False
    program, layout = program_of(site)
    assert layout.strings == {0: layout.argument(4)}

    def counted(code):
        code.load(8, R9, R8, layout.argument(0))
        code.load(8, R2, R8, layout.argument(1))
    found = slots(program)
    assert contains(program, assembled(counted))
    limit = [slot for slot in found if slot.code == 0xb5]          # jle r2, imm
    # once when the length is read, then before the quick and the faulting copy
    assert [(slot.dst, slot.imm) for slot in limit] == [(2, codegen.DEFAULT_STRING_LENGTH)] * 3


def test_only_a_sleepable_program_copies_again_faulting(fixtures):
    """bpf_copy_from_user (helper 148) is called only where the quick read failed, and only
    by a sleepable program: memory operands, strings (their first page) and counted strings."""
    site = site_named(fixtures.path("values"), "strings")
    plans = codegen.plan_site(site, ("str", "str"))
    calls = {}
    for sleepable in (False, True):
        program, _layouts = codegen.generate({0: (site, plans)}, ring_fd=3, lost_fd=4,
                                             sleepable=sleepable)
        calls[sleepable] = [slot.imm for slot in slots(program) if slot.code == 0x85]
    assert 148 not in calls[False]
    assert calls[True].count(148) == calls[False].count(114) == 2     # one per string
    assert calls[True].count(114) == 4                                # each tried twice


# --- the record layout ------------------------------------------------------------

def parsed(site, layout, data, emitter=RECORDS):
    """The item records.py's generated parser makes of one record."""
    armed = ArmedSite(site.provider, site.name, site.file, "site7", layout.plans,
                      frozenset(layout.strings))
    items = []
    RecordParsers({7: (armed, layout)}, emitter)[7](bytes(data), 0, items.append)
    [item] = items
    return item


def test_records_decode_per_the_layout(fixtures):
    """A record packed by hand at the layout's offsets decodes to typed values."""
    site = site_named(fixtures.path("values"), "ints")
    strings = site._replace(operands=site.operands[:2] + (
        ops.parse_operand("8@%rax", "x86_64"), ops.parse_operand("8@%rdx", "x86_64")))
    plans = codegen.plan_site(strings, (None, "s16", "str", "str"))
    layout = codegen.RecordLayout(plans, string_length=8)
    assert layout.arguments == codegen.HEADER_STRUCT.size == 48
    assert layout.strings == {2: 48 + 4 * 8, 3: 48 + 4 * 8 + 16}
    assert layout.size == 48 + 4 * 8 + 16 + 16
    data = bytearray(layout.size)
    codegen.HEADER_STRUCT.pack_into(data, 0, 123, 11, 10, 2, 7, b"values", 0b1000, 0b0100)
    struct.pack_into("<QQQ", data, layout.argument(0), 0xfb, 0x8000, 9)
    data[layout.strings[2]:layout.strings[2] + 9] = b"12345678\0"
    ts, pid, tid, cpu, comm, armed, args = parsed(strings, layout, data)
    assert (ts, pid, tid, cpu, comm, armed.probe) == (123, 10, 11, 2, "values", "values:ints")
    assert args == [-5, -32768, "12345678", None]
    assert type(args[2]) is Truncated
    line = json.loads(parsed(strings, layout, data, LineEmitter(json_lines=True))[2])
    assert (line["args"], line["truncated"]) == ([-5, -32768, "12345678", None], [2])


@NEEDS_JVM
def test_a_counted_string_decodes_its_bytes_and_keeps_its_length():
    site = site_named(LIBJVM, "class__loaded")
    layout = codegen.RecordLayout(codegen.plan_site(site), string_length=8)
    data = bytearray(layout.size)
    codegen.HEADER_STRUCT.pack_into(data, 0, 1, 2, 2, 0, 0, b"java", 0, 0b1)
    struct.pack_into("<QQQQ", data, layout.argument(0), 8, 16, 7, 1)
    data[layout.strings[0]:layout.strings[0] + 9] = b"java/lan\0"
    event = Event.from_record(parsed(site, layout, data))
    assert (event.args, event.truncated) == (["java/lan", 16, 7, 1], [0])


def test_floats_decode_from_their_bits(fixtures):
    site = site_named(fixtures.path("values", "O2"), "float")
    layout = codegen.RecordLayout(codegen.plan_site(site))
    data = bytearray(layout.size)
    struct.pack_into("<fxxxxd", data, layout.argument(0), 1.5, -2.25)
    assert parsed(site, layout, data)[6] == [1.5, -2.25]


def test_a_count_plan_becomes_a_tally_of_the_sites(fixtures):
    """Keys resolve against the selected sites as the user-space executor resolves them
    (a documented name becomes its index); a histogram's value too, unless it is no
    argument (the user-space executor then says so); a latency's START and END sites by
    their roles, unless it is keyed by what only the START knows."""
    from sdtrace.present import aggregate

    [hit] = notes.read_probes(fixtures.path("flood"))
    plan = aggregate.Count(aggregate.parse_keys("probe,pid,tid,comm,arg1"))
    tally = aggregate.tally_for(plan, max_keys=99)([hit])
    assert (tally.keys, tally.max_keys) == (("site", "pid", "tid", "comm", 1), 99)
    histogram = aggregate.tally_for(aggregate.Histogram(
        aggregate.parse_key("arg0"), (), aggregate.Linear(0, 100, 10)))([hit])
    assert (histogram.keys, histogram.value, histogram.linear) == ((), 0, (0, 100, 10))
    assert aggregate.tally_for(aggregate.Histogram(aggregate.parse_key("pid")))([hit]) is None
    from sdtrace.discovery.specs import parse_spec

    spans = aggregate.tally_for(aggregate.Latency(
        parse_spec("flood:hit"), parse_spec("flood:nothing")))
    with pytest.raises(SdtraceError, match="no armed site matches 'flood:nothing'"):
        spans([hit])
    matched = aggregate.Latency(parse_spec("flood:hit"), parse_spec("flood:hit*"),
                                aggregate.parse_keys("arg0"), aggregate.parse_keys("arg0,tid"))
    with pytest.raises(SdtraceError, match="matches both"):
        aggregate.tally_for(matched)([hit])
    by_argument = aggregate.Latency(parse_spec("a:b"), parse_spec("a:c"), (),
                                    aggregate.parse_keys("arg0"))
    assert aggregate.tally_for(by_argument) is None      # a START's own key needs records
    with pytest.raises(SdtraceError, match="flood:hit has only 2 arguments"):
        aggregate.tally_for(aggregate.Count(aggregate.parse_keys("arg5")))([hit])
    if os.path.exists(PYTHON):
        [entry] = [site for site in notes.read_probes(PYTHON) if site.name == "function__entry"]
        named = aggregate.tally_for(aggregate.Count(aggregate.parse_keys("funcname")))([entry])
        assert named.keys == (1,)


def test_a_tally_takes_fields_and_argument_indexes():
    from sdtrace.engine.bpf.tally import Tally

    assert Tally(("site", 0)).arguments == [0]
    for bad in ("probe", -1, 1.5):
        with pytest.raises(ValueError, match="not a key of a hit"):
            Tally((bad,))
