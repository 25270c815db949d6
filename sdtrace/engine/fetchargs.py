"""Typed operands -> uprobe fetch arguments, and back to argument values.

A uprobe event can copy values out of the traced thread at the moment of the
hit: registers (``%di``), memory relative to a register (``-8(%bp)``),
memory at a file offset of the probed file (``@+0x1234``), and strings behind
any of those (``+0(%si):string``).  Each fetch carries a type (``s32``,
``u64``, ``string``, or a bitfield such as ``b8@8/64`` for ``%ah``).

This module plans, per probe argument, one of:

* a fetch expression for tracefs, whose field in the sample is the value
  (with a post-conversion for floats and signed bitfields);
* a constant (an immediate operand needs no fetch at all);
* unavailable, with the reason: operands the kernel cannot address
  (base+index*scale, vector registers, unresolved symbols, unparsed text).
  These are reported at attach time and decode to None -- never to a guess.

A spec's ``(TYPE,...)`` list overrides the note's types: ``str`` dereferences
the argument as a NUL-terminated string, ``s8``..``u64`` re-read it at
another size or signedness.
"""
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from ..discovery import operands as ops
from ..discovery import providers
from ..errors import SdtraceError

# Canonical register names (operands.py) -> the kernel's pt_regs names, per machine.
_X86_64_REGISTERS = {name: name[1:] for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi",
                                                 "rbp", "rsp", "rip")}
_X86_64_REGISTERS.update({f"r{n}": f"r{n}" for n in range(8, 16)})
KERNEL_REGISTERS = {
    "x86_64": _X86_64_REGISTERS,
    "i386": {name: name[1:] for name in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp",
                                         "esp", "eip")},
    "aarch64": {**{f"x{n}": f"x{n}" for n in range(31)}, "sp": "sp"},
}

_FLOAT_LAYOUTS = {4: (struct.Struct("<I"), struct.Struct("<f")),
                  8: (struct.Struct("<Q"), struct.Struct("<d"))}


@dataclass(frozen=True)
class ArgumentPlan:
    """How one argument's value is obtained."""
    fetch: Optional[str] = None                 # tracefs fetch expression with its type
    convert: Optional[Callable] = None          # applied to the fetched field's value
    constant: Optional[object] = None           # the value, for immediates
    unavailable: Optional[str] = None           # why the value cannot be had

    @property
    def fetched(self):
        return self.fetch is not None


def _integer_type(size, signed):
    return f"{'s' if signed else 'u'}{size * 8}"


def _float_converter(size):
    as_integer, as_float = _FLOAT_LAYOUTS[size]
    return lambda value: as_float.unpack(as_integer.pack(value))[0]


def _signed_byte(value):
    return value - 0x100 if value & 0x80 else value


def _location(operand, probe, registers):
    """The fetch expression of the operand's value (without a type), or raise why not."""
    def register(name):
        if name not in registers:
            raise ValueError(f"register {name} cannot be fetched by uprobes")
        return "%" + registers[name]

    if operand.kind == ops.REGISTER:
        return register(operand.register)
    if operand.kind == ops.MEMORY:
        return f"{operand.offset:+d}({register(operand.base)})"
    if operand.kind == ops.RIP:
        if operand.address is None:
            raise ValueError(operand.error or "a rip-relative operand without a symbol")
        # The kernel maps @+N to (site's runtime address - site's file offset) + N.
        fetch_offset = operand.address - probe.address + probe.offset
        if fetch_offset < 0:
            raise ValueError(f"{operand.symbol} lies before the mapping of the probe site")
        return f"@+{fetch_offset:#x}"
    if operand.kind == ops.SIB:
        raise ValueError("the kernel cannot fetch base+index*scale addresses")
    if operand.kind == ops.VECTOR:
        raise ValueError(f"vector register {operand.register} cannot be fetched by uprobes")
    raise ValueError(operand.error or f"unsupported operand kind {operand.kind}")


def plan_argument(operand, probe, wanted_type=None):
    """The ArgumentPlan of one operand of `probe`; `wanted_type` is the spec's override or None."""
    registers = KERNEL_REGISTERS.get(probe.machine)
    if registers is None:
        return ArgumentPlan(unavailable=f"cannot fetch {probe.machine} operands on this kernel")
    if operand.kind == ops.IMMEDIATE and wanted_type != "str":
        return ArgumentPlan(constant=operand.value)
    try:
        location = _location(operand, probe, registers)
    except ValueError as reason:
        return ArgumentPlan(unavailable=str(reason))
    if wanted_type == "str":
        return ArgumentPlan(fetch=f"+0({location}):string")
    if wanted_type is not None:
        return ArgumentPlan(fetch=f"{location}:{wanted_type}")
    if operand.is_float:
        if operand.size not in _FLOAT_LAYOUTS:
            return ArgumentPlan(unavailable=f"{operand.size}-byte floats are not supported")
        return ArgumentPlan(fetch=f"{location}:u{operand.size * 8}",
                            convert=_float_converter(operand.size))
    if operand.bit_offset:
        return ArgumentPlan(fetch=f"{location}:b8@{operand.bit_offset}/64",
                            convert=_signed_byte if operand.signed else None)
    return ArgumentPlan(fetch=f"{location}:{_integer_type(operand.size, operand.signed)}")


def argument_types(probe, explicit_types=(), planner=None):
    """The per-argument types to read `probe` (a notes.Site) with.

    A spec's explicit types win; where it gives none (or an empty entry), a
    documented string argument is read as ``str`` if its operand is
    pointer-sized and the executor (`planner`, as in plan_probe) can read
    through it.
    """
    planner = planner or plan_argument
    arguments = providers.lookup(probe.provider, probe.name, len(probe.operands))
    if arguments is None or len(explicit_types) > len(probe.operands):
        return explicit_types
    pointer_size = probe.word_size     # bytes in a pointer, from the file's ELF class
    types = []
    for index, (operand, documented) in enumerate(zip(probe.operands, arguments.types)):
        wanted = explicit_types[index] if index < len(explicit_types) else None
        if (wanted is None and documented == providers.STRING and operand.size == pointer_size
                and not operand.is_float
                and planner(operand, probe, providers.STRING).unavailable is None):
            wanted = providers.STRING
        types.append(wanted)
    return tuple(types)


def plan_probe(probe, types=(), planner=plan_argument):
    """ArgumentPlans for every argument of `probe`, with the spec's `types` applied.

    An explicit type on an argument that cannot be fetched is an error naming
    the probe, the argument and the cause; without one it is merely unavailable.
    `planner` is this executor's plan_argument or another's (the BPF executor's),
    whose plans also say why not in `unavailable`.
    """
    if len(types) > len(probe.operands):
        raise SdtraceError(f"{probe.qualified_name}: {len(types)} types given but the probe has "
                           f"{len(probe.operands)} arguments")
    plans = []
    for index, operand in enumerate(probe.operands):
        wanted = types[index] if index < len(types) else None
        plan = planner(operand, probe, wanted)
        if plan.unavailable and wanted:
            raise SdtraceError(f"{probe.file}: {probe.qualified_name}: argument {index} "
                               f"({operand.text!r}) cannot be read as {wanted}: {plan.unavailable}")
        plans.append(plan)
    return plans


def fetch_arguments(plans):
    """The tracefs fetch arguments ``argN=EXPR`` for the plans that fetch."""
    return [f"arg{index}={plan.fetch}" for index, plan in enumerate(plans) if plan.fetched]
