"""eBPF instructions encoded in Python: a small assembler with labels.

An eBPF instruction is one 8-byte slot (Documentation/bpf/standardization/
instruction-set.rst in the kernel tree)::

    u8 opcode | u8 registers (dst in the low nibble, src in the high one) |
    s16 offset | s32 immediate                    (all little-endian here)

and the 64-bit immediate load takes two slots, the second carrying the
upper 32 bits of the value in its immediate.  The opcode's low 3 bits are
the instruction class.  For arithmetic (ALU: 32-bit, ALU64: 64-bit) and
jumps (JMP) the high 4 bits name the operation and bit 3 the source: an
immediate (K) or the src register (X).  For loads and stores the high 3
bits are the mode (MEM: base + offset; IMM: the wide immediate load;
ATOMIC: read-modify-write, the operation in the immediate) and bits 3-4
the access size.  The tables below are that encoding as data; the
assembler only looks things up in them.

Registers are R0 (return value) .. R10 (read-only frame pointer); a helper
call takes its arguments in R1..R5, returns in R0 and clobbers R1..R5.
An operand that is a ``Register`` selects the X form, a plain int an
immediate, so ``mov(R6, R1)`` copies a register and ``mov(R0, 0)`` loads 0.

Jumps name labels.  A label is bound to the position of the next
instruction (``label("lost")``); ``assemble()`` resolves every jump once
the whole program is known, so jumps go forward or backward alike, to
``target - (jump's slot + 1)``, counted in slots (a wide load counts two).
Helpers are called by name (``call("ringbuf_reserve")``), their numbers
being the kernel's ``enum bpf_func_id``.  ``load_map(R1, fd)`` is the wide
load whose src is BPF_PSEUDO_MAP_FD: the verifier replaces the fd by the
map's address.
"""
import struct
from collections import namedtuple


class Register(int):
    """An eBPF register number; as an operand it selects the register form (X)."""

    def __repr__(self):
        return f"R{int(self)}"


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = (Register(number) for number in range(11))

# instruction classes (opcode bits 0-2)
CLASSES = {"ld": 0x00, "ldx": 0x01, "st": 0x02, "stx": 0x03, "alu": 0x04, "jmp": 0x05,
           "alu64": 0x07}
# source (opcode bit 3) of arithmetic and jumps
SOURCE_IMMEDIATE, SOURCE_REGISTER = 0x00, 0x08
# arithmetic operations (opcode bits 4-7)
ALU_OPERATIONS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50,
                  "lsh": 0x60, "rsh": 0x70, "neg": 0x80, "mod": 0x90, "xor": 0xa0, "mov": 0xb0,
                  "arsh": 0xc0}
# jump operations (opcode bits 4-7); comparisons are of the full 64-bit registers
JUMP_OPERATIONS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40, "jne": 0x50,
                   "jsgt": 0x60, "jsge": 0x70, "call": 0x80, "exit": 0x90, "jlt": 0xa0,
                   "jle": 0xb0, "jslt": 0xc0, "jsle": 0xd0}
# load/store access sizes in bytes (opcode bits 3-4) and modes (bits 5-7)
SIZES = {4: 0x00, 2: 0x08, 1: 0x10, 8: 0x18}
MODE_IMMEDIATE, MODE_MEMORY, MODE_ATOMIC = 0x00, 0x60, 0xc0
ATOMIC_ADD = 0x00                # the immediate of an ATOMIC add without fetch
PSEUDO_MAP_FD = 1                # src of a wide load whose immediate is a map fd

# enum bpf_func_id: the helpers sdtrace's programs call
HELPERS = {"map_lookup_elem": 1, "map_update_elem": 2, "map_delete_elem": 3, "probe_read": 4,
           "ktime_get_ns": 5, "get_smp_processor_id": 8, "get_current_pid_tgid": 14,
           "get_current_comm": 16, "probe_read_user": 112, "probe_read_user_str": 114,
           "ringbuf_reserve": 131, "ringbuf_submit": 132, "ringbuf_discard": 133,
           "copy_from_user": 148, "get_attach_cookie": 174}

# One 8-byte slot; `offset` of a jump may be a label name until assembly.
Instruction = namedtuple("Instruction", "code dst src offset imm")
SLOT = struct.Struct("<BBhi")
S16 = (-(1 << 15), (1 << 15) - 1)
S32 = (-(1 << 31), (1 << 31) - 1)


def _check(value, bounds, what):
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{what} {value} does not fit in {bounds[0]}..{bounds[1]}")
    return value


def _register(value, what="register"):
    if not isinstance(value, Register) or not 0 <= value <= 10:
        raise ValueError(f"{what} must be one of R0..R10, not {value!r}")
    return int(value)


class Assembler:
    """Collects instructions and labels; assemble() resolves the jumps and encodes."""

    def __init__(self):
        self._slots = []        # Instruction, a jump's offset being its label until assembly
        self._labels = {}       # name -> slot index

    def __len__(self):
        return len(self._slots)

    def _emit(self, code, dst=0, src=0, offset=0, imm=0):
        if not isinstance(offset, str):
            _check(offset, S16, "offset")
        self._slots.append(Instruction(code, dst, src, offset, _check(imm, S32, "immediate")))

    def label(self, name):
        """Binds `name` to the next instruction's position."""
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._slots)

    # arithmetic -----------------------------------------------------------

    def _alu(self, width, operation, dst, src):
        code = CLASSES[width] | ALU_OPERATIONS[operation]
        if isinstance(src, Register):
            self._emit(code | SOURCE_REGISTER, _register(dst, "dst"), _register(src, "src"))
        else:
            self._emit(code | SOURCE_IMMEDIATE, _register(dst, "dst"), imm=src)

    def alu64(self, operation, dst, src):
        """dst = dst OPERATION src, on 64 bits; an immediate src is sign-extended."""
        self._alu("alu64", operation, dst, src)

    def alu32(self, operation, dst, src):
        """dst = (u32)(dst OPERATION src): the upper half of dst becomes zero."""
        self._alu("alu", operation, dst, src)

    def mov(self, dst, src):
        self.alu64("mov", dst, src)

    # memory ---------------------------------------------------------------

    def load(self, size, dst, base, offset):
        """dst = *(u`size*8` *)(base + offset), zero-extended."""
        self._emit(CLASSES["ldx"] | MODE_MEMORY | SIZES[size], _register(dst, "dst"),
                   _register(base, "base"), offset)

    def store(self, size, base, offset, src):
        """*(u`size*8` *)(base + offset) = src (a register, or an immediate)."""
        if isinstance(src, Register):
            self._emit(CLASSES["stx"] | MODE_MEMORY | SIZES[size], _register(base, "base"),
                       _register(src, "src"), offset)
        else:
            self._emit(CLASSES["st"] | MODE_MEMORY | SIZES[size], _register(base, "base"),
                       offset=offset, imm=src)

    def atomic_add(self, size, base, offset, src):
        """*(u`size*8` *)(base + offset) += src, atomically (size 4 or 8)."""
        if size not in (4, 8):
            raise ValueError(f"atomic operations are 4 or 8 bytes wide, not {size}")
        self._emit(CLASSES["stx"] | MODE_ATOMIC | SIZES[size], _register(base, "base"),
                   _register(src, "src"), offset, ATOMIC_ADD)

    def load_imm64(self, dst, value, src=0):
        """dst = value (any 64-bit value), in two slots."""
        if not -(1 << 63) <= value < (1 << 64):
            raise ValueError(f"immediate {value} does not fit in 64 bits")
        value &= (1 << 64) - 1
        low, high = value & 0xffffffff, value >> 32
        signed = [part - (1 << 32) if part >> 31 else part for part in (low, high)]
        self._emit(CLASSES["ld"] | MODE_IMMEDIATE | SIZES[8], _register(dst, "dst"), src,
                   imm=signed[0])
        self._emit(0, imm=signed[1])

    def load_map(self, dst, map_fd):
        """dst = the address of the map whose fd is `map_fd` (resolved by the verifier)."""
        self.load_imm64(dst, map_fd, src=PSEUDO_MAP_FD)

    # control --------------------------------------------------------------

    def jump(self, operation, dst, src, target):
        """if (dst OPERATION src) goto target (a label); 64-bit comparison."""
        code = CLASSES["jmp"] | JUMP_OPERATIONS[operation]
        if operation in ("ja", "call", "exit"):
            raise ValueError(f"{operation} is not a conditional jump")
        if isinstance(src, Register):
            self._emit(code | SOURCE_REGISTER, _register(dst, "dst"), _register(src, "src"),
                       target)
        else:
            self._emit(code | SOURCE_IMMEDIATE, _register(dst, "dst"), offset=target, imm=src)

    def goto(self, target):
        self._emit(CLASSES["jmp"] | JUMP_OPERATIONS["ja"], offset=target)

    def call(self, helper):
        """R0 = helper(R1, ..., R5); R1-R5 are clobbered."""
        if helper not in HELPERS:
            raise ValueError(f"unknown BPF helper {helper!r}")
        self._emit(CLASSES["jmp"] | JUMP_OPERATIONS["call"], imm=HELPERS[helper])

    def exit(self):
        """return R0"""
        self._emit(CLASSES["jmp"] | JUMP_OPERATIONS["exit"])

    # output ---------------------------------------------------------------

    def instructions(self):
        """Every slot, with the jumps' labels resolved to slot offsets."""
        resolved = []
        for index, slot in enumerate(self._slots):
            if isinstance(slot.offset, str):
                if slot.offset not in self._labels:
                    raise ValueError(f"jump to undefined label {slot.offset!r}")
                offset = self._labels[slot.offset] - (index + 1)
                slot = slot._replace(offset=_check(offset, S16, f"jump to {slot.offset!r}"))
            resolved.append(slot)
        return resolved

    def assemble(self):
        """The program's bytecode."""
        return b"".join(SLOT.pack(slot.code, slot.src << 4 | slot.dst, slot.offset, slot.imm)
                        for slot in self.instructions())
