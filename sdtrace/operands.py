"""Argument specs of SDT notes, parsed into typed operands.

A note's argument string holds one spec per argument, separated by spaces:
``[-]N[f]@OPERAND``.  N is the size in bytes (1, 2, 4, 8), ``-`` means signed
and ``f`` floating point.  OPERAND is whatever the compiler's ``asm`` operand
printed, in the target architecture's assembler syntax.  This module turns
each spec into an Operand that says exactly where the value lives at the probe
site: a register, memory at base+offset, memory at base+index*scale+offset, a
rip-relative symbol, or an immediate.  What cannot be parsed becomes an
Operand of kind UNPARSED carrying the reason, never a guessed location.
"""
# INTERFACE PINNED — implementation in progress by a helper.
from dataclasses import dataclass
from typing import Optional

REGISTER = "register"    # value is in `register` (bits `bit_offset`.. of it)
MEMORY = "memory"        # value at [base + offset]
SIB = "sib"              # value at [base + index*scale + offset]; base may be None
RIP = "rip"              # value at symbol + offset, relative to the instruction pointer
IMMEDIATE = "immediate"  # value is `value`
VECTOR = "vector"        # value is in a vector/FP register (e.g. %xmm0); backends may not fetch it
UNPARSED = "unparsed"    # `error` says why


@dataclass(frozen=True)
class Operand:
    text: str                       # the spec as written, e.g. "-4@%edi"
    size: int                       # 1, 2, 4 or 8 (bytes)
    signed: bool
    is_float: bool
    kind: str                       # one of the constants above
    register: Optional[str] = None  # canonical full-width name: x86 "rax".."r15","rip"; aarch64 "x0".."x30","sp"; ...
    bit_offset: int = 0             # 8 for %ah/%bh/%ch/%dh, else 0
    base: Optional[str] = None      # canonical register name, for MEMORY and SIB
    index: Optional[str] = None     # canonical register name, for SIB
    scale: int = 1                  # for SIB
    offset: int = 0                 # displacement for MEMORY/SIB/RIP
    value: Optional[int] = None     # IMMEDIATE, already wrapped to size/signedness (1@$-127 -> 129)
    symbol: Optional[str] = None    # RIP: the symbol name
    error: Optional[str] = None     # UNPARSED: why
