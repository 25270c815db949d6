"""The arguments of SDT notes, parsed into typed operands.

A note's argument string holds one word per argument, separated by spaces:
``[-]N[f]@OPERAND``.  N is the size in bytes (1, 2, 4, 8), ``-`` means signed
and ``f`` floating point.  OPERAND is whatever the compiler's ``asm`` operand
printed, in the target architecture's assembler syntax.  This module turns
each argument into an Operand that says exactly where the value lives at the probe
site: a register, memory at base+offset, memory at base+index*scale+offset, a
rip-relative symbol, or an immediate.  What cannot be parsed becomes an
Operand of kind UNPARSED carrying the reason, never a guessed location.

Mechanism.  The argument string is split on whitespace outside brackets and
parentheses (aarch64 prints ``-8@[x29, -16]``).  Each argument loses its size
prefix (a bare operand from old notes gets the file's word size, unsigned:
4 bytes in a 32-bit PowerPC or s390 file although it shares the 64-bit
grammar; without a word size, the machine's default),
then its whitespace, and the rest goes to the machine's operand grammar:

  x86_64, i386  AT&T: ``$imm``, ``%reg`` (every width; %ah..%dh are bits 8-15),
                ``disp(%base)``, ``disp(%base,%index,scale)``, ``(,%index,scale)``,
                ``sym+disp(%rip)``, ``%xmmN``/``%ymmN``/``%zmmN``.
  aarch64       ``xN``/``wN``/``sp``, ``[base]``, ``[base, #disp]``,
                ``[base, index{, lsl #N}]``, ``#imm`` or ``imm``, ``bN``..``vN``.
  arm           ``rN`` and fp/ip/sp/lr/pc aliases, the same bracket forms,
                ``#imm``, ``sN``/``dN``/``qN``.
  ppc64         a bare number N or ``rN``/``%rN`` is register rN, ``disp(rN)``,
                ``rA,rB`` (indexed), ``iN`` is an immediate; r0 as a base reads 0.
  s390x         ``%rN``, ``disp(%rB)``, ``disp(%rX,%rB)``, plain-number
                immediates; r0 as base or index reads 0.
  riscv64       ABI names (``a0``, ``s0``/``fp``) or ``xN``, ``disp(reg)``,
                plain-number immediates.

Register names come out canonical (full width): x86_64 ``rax``..``r15``, i386
``eax``..``edi``, aarch64 ``x0``..``x30``/``sp``, arm ``r0``..``r10``/``fp``/``ip``/
``sp``/``lr``/``pc``, ppc64 ``r0``..``r31``, s390x ``r0``..``r15``, riscv64 ABI
names.  A zero register (xzr, riscv ``zero``) is the immediate 0.  Displacements
are normalised to signed 64-bit; immediates are wrapped to the argument's size and
signedness, as the probe's consumer would see them.  Symbols are kept as
written; resolving them is another layer's job.  A displacement that names a
symbol without a %rip base (non-PIE ``counter(,%rax,8)``) is absolute and has
no Operand kind, so it is UNPARSED.
"""
from __future__ import annotations

import functools
import re
from collections import namedtuple

REGISTER = "register"    # value is in `register` (bits `bit_offset`.. of it)
MEMORY = "memory"        # value at [base + offset]
SIB = "sib"              # value at [base + index*scale + offset]; base may be None
RIP = "rip"              # value at symbol + offset, relative to the instruction pointer
IMMEDIATE = "immediate"  # value is `value`
VECTOR = "vector"        # value is in a vector/FP register (e.g. %xmm0); backends may not fetch it
UNPARSED = "unparsed"    # `error` says why


# One typed operand.  A namedtuple, not a dataclass: discovery runs at every
# start-up and `dataclasses` costs more to import than parsing a whole file.
#   text        the argument as written, e.g. "-4@%edi"
#   size        1, 2, 4 or 8 (bytes)
#   signed, is_float
#   kind        one of the constants above
#   register    canonical full-width name: x86 "rax".."r15"; aarch64 "x0".."x30", "sp"; ...
#   bit_offset  8 for %ah/%bh/%ch/%dh, else 0
#   base, index canonical register names, for MEMORY and SIB (SIB base may be None)
#   scale       for SIB
#   offset      displacement for MEMORY/SIB/RIP
#   value       IMMEDIATE, already wrapped to size/signedness (1@$-127 -> 129)
#   symbol      RIP: the symbol name
#   error       UNPARSED (or unresolvable RIP): why
#   address     RIP: link-time address of symbol+offset, set by notes.py
Operand = namedtuple(
    "Operand", "text size signed is_float kind register bit_offset base index scale offset "
               "value symbol error address",
    defaults=(None, 0, None, None, 1, 0, None, None, None, None))


MAX_ARGUMENT_LENGTH = 256     # longer arguments are UNPARSED without being looked at
WORD_SIZES = {"x86_64": 8, "i386": 4, "aarch64": 8, "arm": 4, "ppc64": 8, "s390x": 8, "riscv64": 8}
VALID_SIZES = (1, 2, 4, 8)

# Regular expressions are kept as strings: `re` compiles and caches them on
# first use, so importing this module compiles nothing.
_SIZE_PREFIX = r"(-?)([0-9]{1,20})(f?)@"
_NUMBER = r"([-+]?)(?:0[xX]([0-9a-fA-F]+)|([0-9]+))"
_UNSIGNED = r"(?:0[xX][0-9a-fA-F]+|[0-9]+)"
_SYMBOL = r"[A-Za-z_.][A-Za-z0-9_.$@]*"
_X86_DISPLACEMENT = rf"(?:({_UNSIGNED})\+)?({_SYMBOL})([-+]{_UNSIGNED})?"
_PARENTHESISED = r"([^()]*)\(([^()]*)\)"       # disp(inside)
_BRACKETED = r"\[([^\[\]]*)\]"                  # [inside]
_PRINTABLE_NAME = r"%?[A-Za-z0-9]{1,16}"        # safe to echo in an error


class _Unparsed(Exception):
    """Raised inside the grammar; its argument becomes Operand.error."""


# ---------------------------------------------------------------- numbers --

def _number(text: str, what: str) -> int:
    """A decimal or 0x-hex integer with optional sign, as GNU as reads it."""
    match = re.fullmatch(_NUMBER, text)
    if match is None:
        raise _Unparsed(f"bad {what}")
    sign, hex_digits, decimal_digits = match.groups()
    magnitude = int(hex_digits, 16) if hex_digits is not None else int(decimal_digits, 10)
    return -magnitude if sign == "-" else magnitude


def _int64(value: int, what: str) -> int:
    """`value` as a signed 64-bit integer; anything outside 64 bits is refused."""
    if not -(1 << 63) <= value < (1 << 64):
        raise _Unparsed(f"{what} out of 64-bit range")
    return value - (1 << 64) if value >= (1 << 63) else value


def _displacement(text: str) -> int:
    """An address displacement, signed 64-bit (0 if empty)."""
    return _int64(_number(text, "offset"), "offset") if text else 0


def _immediate(text: str) -> dict:
    return {"kind": IMMEDIATE, "value": _int64(_number(text, "immediate"), "immediate")}


def _wrap(value: int, size: int, signed: bool) -> int:
    """`value` as a `size`-byte integer of the given signedness would hold it."""
    bits = size * 8
    value &= (1 << bits) - 1
    if signed and value >> (bits - 1):
        value -= 1 << bits
    return value


def _naming(reason: str, text: str) -> _Unparsed:
    """`reason` followed by the offending text, if that text is safe to echo."""
    return _Unparsed(f"{reason} {text}" if re.fullmatch(_PRINTABLE_NAME, text) else reason)


def _scale(text: str) -> int:
    if text not in ("1", "2", "4", "8"):
        raise _naming("bad scale", text)
    return int(text)


# ------------------------------------------------------------------- x86 --

@functools.lru_cache(maxsize=None)
def _x86_registers(machine: str) -> dict[str, tuple[str, int, bool]]:
    """Register name -> (canonical name, bit offset, usable as an address)."""
    sixty_four = machine == "x86_64"
    # 64-bit, 32-bit, 16-bit, low byte, high byte (bits 8-15)
    rows = [("rax", "eax", "ax", "al", "ah"), ("rbx", "ebx", "bx", "bl", "bh"),
            ("rcx", "ecx", "cx", "cl", "ch"), ("rdx", "edx", "dx", "dl", "dh"),
            ("rsi", "esi", "si", "sil", None), ("rdi", "edi", "di", "dil", None),
            ("rbp", "ebp", "bp", "bpl", None), ("rsp", "esp", "sp", "spl", None)]
    if sixty_four:
        rows += [(f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b", None) for n in range(8, 16)]
    registers = {}
    for full, word32, word16, low8, high8 in rows:
        canonical = full if sixty_four else word32
        if sixty_four:
            registers[full] = (canonical, 0, True)
        registers[word32] = (canonical, 0, not sixty_four)
        registers[word16] = (canonical, 0, False)
        if sixty_four or high8:             # sil, dil, bpl, spl need a REX prefix
            registers[low8] = (canonical, 0, False)
        if high8:
            registers[high8] = (canonical, 8, False)
    return registers


def _x86_address_register(text: str, registers: dict[str, tuple[str, int, bool]]) -> str:
    entry = registers.get(text[1:]) if text.startswith("%") else None
    if entry is None or not entry[2]:
        raise _naming("bad address register", text)
    return entry[0]


def _x86_symbolic_displacement(text: str) -> tuple[str | None, int]:
    """``-24``, ``sym``, ``sym+8``, ``sym-8``, ``8+sym`` -> (symbol, offset)."""
    if not text or re.fullmatch(_NUMBER, text):
        return None, _displacement(text)
    match = re.fullmatch(_X86_DISPLACEMENT, text)
    if match is None:
        raise _Unparsed("bad displacement")
    leading, symbol, trailing = match.groups()
    offset = _number(leading or "0", "offset") + _number(trailing or "0", "offset")
    return symbol, _int64(offset, "offset")


def _parse_x86(operand: str, machine: str) -> dict:
    registers = _x86_registers(machine)
    if operand.startswith("$"):
        return _immediate(operand[1:])
    if re.match(r"%[c-gs]s:", operand):
        raise _Unparsed("segment override not supported")
    if operand.startswith("%"):
        name = operand[1:]
        if re.fullmatch(r"[xyz]mm(?:[12]?[0-9]|3[01])", name):
            return {"kind": VECTOR, "register": name}
        if name not in registers:
            raise _naming("unknown register", operand)
        canonical, bit_offset, _ = registers[name]
        return {"kind": REGISTER, "register": canonical, "bit_offset": bit_offset}
    match = re.fullmatch(_PARENTHESISED, operand)
    if match is None:
        if re.fullmatch(_NUMBER, operand) or re.fullmatch(_X86_DISPLACEMENT, operand):
            raise _Unparsed("absolute address not supported")
        raise _Unparsed("unrecognized operand")
    symbol, offset = _x86_symbolic_displacement(match[1])
    parts = match[2].split(",")
    if parts == ["%rip"] and machine == "x86_64":
        return {"kind": RIP, "symbol": symbol, "offset": offset}
    if symbol is not None:
        raise _Unparsed("symbol address without %rip base not supported")
    if len(parts) == 1:
        return {"kind": MEMORY, "base": _x86_address_register(parts[0], registers), "offset": offset}
    if len(parts) > 3:
        raise _Unparsed("too many address parts")
    base = _x86_address_register(parts[0], registers) if parts[0] else None
    index = _x86_address_register(parts[1], registers)
    if index in ("rsp", "esp"):
        raise _Unparsed(f"%{index} cannot be an index register")
    scale = _scale(parts[2]) if len(parts) == 3 else 1
    return {"kind": SIB, "base": base, "index": index, "scale": scale, "offset": offset}


def _parse_x86_64(operand: str) -> dict:
    return _parse_x86(operand, "x86_64")


def _parse_i386(operand: str) -> dict:
    return _parse_x86(operand, "i386")


# ------------------------------------------------------ ARM bracket forms --

def _bracketed_address(inside: str, address_register) -> dict:
    """``base``, ``base,#disp``, ``base,index`` or ``base,index,lsl#N`` (aarch64/arm)."""
    parts = inside.split(",")
    base = address_register(parts[0])
    if len(parts) == 1:
        return {"kind": MEMORY, "base": base}
    second = parts[1].removeprefix("#")
    if re.fullmatch(_NUMBER, second):
        if len(parts) > 2:
            raise _Unparsed("unrecognized address")
        return {"kind": MEMORY, "base": base, "offset": _displacement(second)}
    index = address_register(second)
    if len(parts) == 2:
        return {"kind": SIB, "base": base, "index": index}
    shift = re.fullmatch(r"lsl#?([0-3])", parts[2])
    if len(parts) > 3 or shift is None:
        raise _Unparsed("extended or shifted index not supported")
    return {"kind": SIB, "base": base, "index": index, "scale": 1 << int(shift[1])}


def _bracket_operand(operand: str, general_register, address_register, vector: str) -> dict:
    """The operand shapes aarch64 and arm share; an immediate's ``#`` is optional."""
    memory = re.fullmatch(_BRACKETED, operand)
    if memory is not None:
        return _bracketed_address(memory[1], address_register)
    if "[" in operand:
        raise _Unparsed("writeback or post-index address not supported")
    if re.fullmatch("#?" + _NUMBER, operand):
        return _immediate(operand.removeprefix("#"))
    if re.fullmatch(vector, operand):
        return {"kind": VECTOR, "register": operand}
    register = general_register(operand)
    if register is None:
        raise _naming("unknown register", operand)
    return register


def _aarch64_address_register(name: str) -> str:
    match = re.fullmatch(r"x([0-9]{1,2})", name)
    if name != "sp" and (match is None or int(match[1]) > 30):
        raise _naming("bad address register", name)
    return "sp" if name == "sp" else f"x{int(match[1])}"


def _aarch64_register(name: str) -> dict | None:
    if name in ("xzr", "wzr"):
        return {"kind": IMMEDIATE, "value": 0}
    if name in ("sp", "wsp"):
        return {"kind": REGISTER, "register": "sp"}
    match = re.fullmatch(r"[xw]([0-9]{1,2})", name)
    if match is None or int(match[1]) > 30:
        return None
    return {"kind": REGISTER, "register": f"x{int(match[1])}"}


def _parse_aarch64(operand: str) -> dict:
    return _bracket_operand(operand, _aarch64_register, _aarch64_address_register,
                            r"[bhsdqv](?:[12]?[0-9]|3[01])")


# arm register name -> the kernel's name for it (r0..r10, fp, ip, sp, lr, pc)
_ARM_ALIASES = {"sb": "r9", "sl": "r10", "fp": "fp", "r11": "fp", "ip": "ip", "r12": "ip",
                "sp": "sp", "r13": "sp", "lr": "lr", "r14": "lr", "pc": "pc", "r15": "pc"}


def _arm_canonical(name: str) -> str | None:
    return name if re.fullmatch(r"r[0-9]|r10", name) else _ARM_ALIASES.get(name)


def _arm_address_register(name: str) -> str:
    canonical = _arm_canonical(name)
    if canonical is None:
        raise _naming("bad address register", name)
    return canonical


def _arm_register(name: str) -> dict | None:
    canonical = _arm_canonical(name)
    return None if canonical is None else {"kind": REGISTER, "register": canonical}


def _parse_arm(operand: str) -> dict:
    return _bracket_operand(operand, _arm_register, _arm_address_register,
                            r"[sd](?:[12]?[0-9]|3[01])|q(?:1[0-5]|[0-9])")


# ----------------------------------------- disp(reg) forms: ppc64, s390x, riscv64 --

def _ppc64_register(text: str) -> str:
    match = re.fullmatch(r"(?:%?r)?([0-9]{1,2})", text)
    if match is None or int(match[1]) > 31:
        raise _naming("unknown register", text)
    return f"r{int(match[1])}"


def _parse_ppc64(operand: str) -> dict:
    if operand.startswith("i"):
        return _immediate(operand[1:])
    if re.fullmatch(r"%?(?:f|v|vs)(?:[0-9]|[1-5][0-9]|6[0-3])", operand):
        return {"kind": VECTOR, "register": operand.removeprefix("%")}
    memory = re.fullmatch(_PARENTHESISED, operand)
    if memory is not None:
        base = _ppc64_register(memory[2])
        if base == "r0":                     # r0 as a D-form base reads as 0
            raise _Unparsed("absolute address not supported")
        return {"kind": MEMORY, "base": base, "offset": _displacement(memory[1])}
    if "," in operand:                       # X-form rA,rB; rA = r0 reads as 0
        base_text, _, index_text = operand.partition(",")
        base, index = _ppc64_register(base_text), _ppc64_register(index_text)
        return {"kind": SIB, "base": None if base == "r0" else base, "index": index}
    return {"kind": REGISTER, "register": _ppc64_register(operand)}


def _s390x_register(text: str) -> str:
    match = re.fullmatch(r"%r([0-9]{1,2})", text)
    if match is None or int(match[1]) > 15:
        raise _naming("unknown register", text)
    return f"r{int(match[1])}"


def _parse_s390x(operand: str) -> dict:
    if re.fullmatch(_NUMBER, operand):
        return _immediate(operand)
    if re.fullmatch(r"%[fv](?:[12]?[0-9]|3[01])", operand):
        return {"kind": VECTOR, "register": operand[1:]}
    memory = re.fullmatch(_PARENTHESISED, operand)
    if memory is None:
        return {"kind": REGISTER, "register": _s390x_register(operand)}
    offset = _displacement(memory[1])
    registers = memory[2].split(",")
    if len(registers) > 2:
        raise _Unparsed("too many address parts")
    # D(B) or D(X,B); r0 in either place reads as 0
    base = _s390x_register(registers[-1])
    index = _s390x_register(registers[0]) if len(registers) == 2 else "r0"
    base, index = (None if base == "r0" else base), (None if index == "r0" else index)
    if index is None and base is None:
        raise _Unparsed("absolute address not supported")
    if index is None:
        return {"kind": MEMORY, "base": base, "offset": offset}
    return {"kind": SIB, "base": base, "index": index, "offset": offset}


_RISCV_ABI_NAMES = ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1",
                    "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7",
                    "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
                    "t3", "t4", "t5", "t6")        # indexed by xN


def _riscv64_register(name: str) -> str:
    """Canonical ABI name of a riscv general register (``zero`` included)."""
    if name in _RISCV_ABI_NAMES:
        return name
    if name == "fp":
        return "s0"
    match = re.fullmatch(r"x([0-9]{1,2})", name)
    if match is None or int(match[1]) > 31:
        raise _naming("unknown register", name)
    return _RISCV_ABI_NAMES[int(match[1])]


def _parse_riscv64(operand: str) -> dict:
    if re.fullmatch(_NUMBER, operand):
        return _immediate(operand)
    if re.fullmatch(r"(?:f[tsa]?|v)(?:[12]?[0-9]|3[01])", operand):
        return {"kind": VECTOR, "register": operand}
    memory = re.fullmatch(_PARENTHESISED, operand)
    if memory is not None:
        base = _riscv64_register(memory[2])
        if base == "zero":
            raise _Unparsed("absolute address not supported")
        return {"kind": MEMORY, "base": base, "offset": _displacement(memory[1])}
    register = _riscv64_register(operand)
    if register == "zero":
        return {"kind": IMMEDIATE, "value": 0}
    return {"kind": REGISTER, "register": register}


_OPERAND_GRAMMARS = {"x86_64": _parse_x86_64, "i386": _parse_i386, "aarch64": _parse_aarch64,
                     "arm": _parse_arm, "ppc64": _parse_ppc64, "s390x": _parse_s390x,
                     "riscv64": _parse_riscv64}


# ----------------------------------------------------------------- public --

def _split_arguments(text: str) -> list[str]:
    """Split on whitespace that is not inside brackets or parentheses."""
    words, current, depth = [], [], 0
    for char in text:
        if char.isspace() and depth == 0:
            if current:
                words.append("".join(current))
                current = []
            continue
        if char in "([":
            depth += 1
        elif char in ")]" and depth:
            depth -= 1
        current.append(char)
    if current:
        words.append("".join(current))
    return words


def _architecture_name(machine) -> str:
    if isinstance(machine, str) and re.fullmatch(r"[\w.-]{1,32}", machine):
        return machine
    return repr(machine)[:40]


@functools.lru_cache(maxsize=4096)   # real files repeat a few hundred distinct arguments
def parse_operand(text: str, machine: str, word_size: int | None = None) -> Operand:
    """Parse one ``[-]N[f]@OPERAND`` argument for `machine`; never raises.

    `word_size` (the ELF class's address size) sizes an operand without a
    size prefix; WORD_SIZES[machine] when None."""
    prefix = re.match(_SIZE_PREFIX, text[:32])
    if prefix is not None:
        signed, size, is_float = prefix[1] == "-", int(prefix[2]), prefix[3] == "f"
        operand = text[prefix.end():]
    else:
        signed, size, is_float = False, word_size or WORD_SIZES.get(machine, 0), False
        operand = text

    def unparsed(reason: str, size: int = size) -> Operand:
        return Operand(text, size, signed, is_float, UNPARSED, error=reason)

    grammar = _OPERAND_GRAMMARS.get(machine)
    if grammar is None:
        return unparsed(f"unsupported architecture {_architecture_name(machine)}",
                        size if size in VALID_SIZES else 0)
    if size not in VALID_SIZES:
        return unparsed(f"bad size {size}", 0)
    if len(text) > MAX_ARGUMENT_LENGTH:
        return unparsed(f"argument longer than {MAX_ARGUMENT_LENGTH} characters")
    operand = "".join(operand.split())
    if not operand:
        return unparsed("missing operand")
    try:
        location = grammar(operand)
    except _Unparsed as failure:
        return unparsed(str(failure))
    if location["kind"] == IMMEDIATE:
        location["value"] = _wrap(location["value"], size, signed)
    return Operand(text, size, signed, is_float, **location)


@functools.lru_cache(maxsize=4096)   # a file's notes repeat their argument strings
def parse_arguments(text: str, machine: str, word_size: int | None = None) -> tuple[Operand, ...]:
    """Every argument of a note's argument string, in order; never raises."""
    return tuple(parse_operand(word, machine, word_size) for word in _split_arguments(text))


def _offset_text(offset: int) -> str:
    return str(offset) if offset else ""


def describe(op: Operand) -> str:
    """Short human form for tables: ``s32 reg rdi``, ``u64 mem -8(rbp)``, ..."""
    if op.kind == UNPARSED:
        return f"? unparsed({op.error})"
    value_type = f"{'f' if op.is_float else 's' if op.signed else 'u'}{op.size * 8}"
    if op.kind == REGISTER:
        shift = f">>{op.bit_offset}" if op.bit_offset else ""
        return f"{value_type} reg {op.register}{shift}"
    if op.kind == MEMORY:
        return f"{value_type} mem {_offset_text(op.offset)}({op.base})"
    if op.kind == SIB:
        return f"{value_type} sib {_offset_text(op.offset)}({op.base or ''},{op.index},{op.scale})"
    if op.kind == RIP:
        if op.symbol is None:
            return f"{value_type} rip {op.offset:+d}"
        return f"{value_type} rip {op.symbol}{f'{op.offset:+d}' if op.offset else ''}"
    if op.kind == IMMEDIATE:
        return f"{value_type} imm {op.value}"
    return f"{value_type} {op.register}"
