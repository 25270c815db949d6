"""Sites' operands -> one BPF program per file, and the record layout it writes.

One uprobe_multi link arms one program on every site of a file, so the
program must know which site it runs for: the link gives each site a
cookie, its site id, which ``bpf_get_attach_cookie`` returns.  The program
compares the cookie with the site ids and jumps to the block of code
generated from that site's operands; sites whose plans are equal (the same
operands read the same way) share a block.  When the executor follows a
process tree (``scope``), the program first looks the current process's
tgid up in the tree's map and returns at once if it is not there; it
returns at once for the tracer's own process.  A block:

1. reserves the site's record on the BPF ring buffer
   (``bpf_ringbuf_reserve``, size known when generating, as the verifier
   wants); if the ring is full it increments the per-CPU lost counter
   atomically and returns, so written + lost = hits, exactly;
2. fills the header: ``bpf_ktime_get_ns`` (CLOCK_MONOTONIC),
   ``bpf_get_current_pid_tgid`` (tgid << 32 | tid, stored as one u64 over
   the tid and pid fields), ``bpf_get_smp_processor_id``, the cookie, and
   ``bpf_get_current_comm``;
3. computes each argument from the registers the uprobe saw (the program's
   context is the thread's ``struct pt_regs``; REGISTERS gives the offsets):

   register   the register, shifted right for %ah..%dh, masked to its size
   immediate  the constant
   memory     bpf_probe_read_user of `size` bytes at base + offset
   sib        the same at base + index * scale + offset, computed here (the
              tracefs executor cannot fetch these; this one can)
   rip        the same at ip - note's site address + symbol address: at a
              uprobe hit, pt_regs->ip is the site's run-time address (the
              kernel rewinds it past the breakpoint before the handlers run),
              so the difference is the file's load bias
   str        the value as a pointer: bpf_probe_read_user_str of at most
              `string_length` bytes into the record's string area;
              truncation is detected exactly, by reading the byte after the
              copied ones when the buffer came back full
   counted    a (pointer, length) pair of a known provider (providers.py:
              HotSpot's ``X_ptr, X_len``, unterminated): once every argument
              is computed, bpf_probe_read_user of exactly `length` bytes,
              at most `string_length` (a longer one is cut and marked), into
              the pointer's string area; the length stays an argument

   A value that cannot be read (a fault, a vector register, an unparsed
   operand) sets its bit in ``missing`` and decodes to None, never to a guess;
4. submits the record (``bpf_ringbuf_submit``).

Registers: R6 holds the context, R7 the cookie, R8 the record and R9 the
argument being computed; helpers preserve R6-R9.  The helpers come from
kernels 5.5 (``probe_read_user[_str]``, 6ae08ae3dea2), 5.8 (the ring buffer,
457f44363a88) and 5.15 (``get_attach_cookie``, 7adfc6c9b315); cookies of
uprobe_multi links from 6.6 (0b779b61f651).

The record is declared once, as data (HEADER, then one u64 per argument,
then the string areas), and ``RecordLayout`` serves both this generator
(the offsets it stores at) and the parsers of records.py (the offsets they
read).
"""
import struct
from collections import namedtuple

from ...discovery import operands as ops
from ...discovery import providers
from ...errors import SdtraceError
from ...kernel.bpf import BPF_ANY
from .. import fetchargs
from .asm import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, Assembler

DEFAULT_STRING_LENGTH = 64
MAX_ARGUMENTS = 32                 # one bit each in `missing` and `truncated`

# struct pt_regs on x86_64 (arch/x86/include/asm/ptrace.h): canonical name -> offset
_PT_REGS_X86_64 = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                   "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
REGISTERS = {"x86_64": {name: 8 * index for index, name in enumerate(_PT_REGS_X86_64)}}
INSTRUCTION_POINTER = {"x86_64": "rip"}

# The record every block writes, in order; each argument is a u64 after it.
HEADER = (("ts", "Q"),            # bpf_ktime_get_ns
          ("tid", "I"),           # bpf_get_current_pid_tgid, low half
          ("pid", "I"),           #   high half
          ("cpu", "I"),           # bpf_get_smp_processor_id
          ("site", "I"),          # the cookie: the site id
          ("comm", "16s"),        # bpf_get_current_comm
          ("missing", "I"),       # bit i: argument i has no value
          ("truncated", "I"))     # bit i: string argument i was cut at string_length
HEADER_STRUCT = struct.Struct("<" + "".join(code for _name, code in HEADER))


def _offsets(fields):
    offsets, position = {}, 0
    for name, code in fields:
        offsets[name] = position
        position += struct.calcsize("<" + code)
    return offsets


OFFSETS = _offsets(HEADER)        # field -> its offset in the record
HEADER_FIELDS = tuple(name for name, _code in HEADER)
ARGUMENT_SLOT = struct.Struct("<Q")

# How one argument is obtained:
#   kind      an operands kind (REGISTER, IMMEDIATE, MEMORY, SIB, RIP), or None if unavailable
#   size, signed, is_float   the value read (after a spec's type override)
#   string    read the value as a pointer to a string: NUL-terminated, or of the byte count
#             that argument `length` holds (a known provider's pointer/length pair)
#   register, bit_offset, base, index, scale, offset, value   the operand's location;
#             for RIP, offset is the symbol's address minus the site's (the load bias is
#             added at run time)
#   unavailable  why there is no value (kind None)
ArgumentPlan = namedtuple("ArgumentPlan", "kind size signed is_float string register bit_offset "
                                          "base index scale offset value unavailable length",
                          defaults=(None,) * 14)
COUNTED = ("_ptr", "_len")      # providers' names of a pointer and its string's byte count

_FETCHED = (ops.REGISTER, ops.IMMEDIATE, ops.MEMORY, ops.SIB, ops.RIP)
_INTEGER_TYPES = {f"{sign}{bits}": (bits // 8, sign == "s")
                  for sign in "su" for bits in (8, 16, 32, 64)}
FLOAT_SIZES = (4, 8)


def _unavailable(reason):
    return ArgumentPlan(kind=None, size=8, unavailable=reason)


def plan_argument(operand, site, wanted=None):
    """The ArgumentPlan of `operand` of `site`; `wanted` is a spec's type ("str", "s32"...)."""
    registers = REGISTERS.get(site.machine)
    if registers is None:
        return _unavailable(f"the BPF executor cannot read {site.machine} operands")
    if operand.kind not in _FETCHED:
        return _unavailable(operand.error or f"{operand.kind} register {operand.register} "
                                             f"cannot be read")
    if operand.kind == ops.RIP and operand.address is None:
        return _unavailable(operand.error or "a rip-relative operand without a symbol")
    used = [name for name in (operand.register, operand.base, operand.index) if name]
    for name in used:
        if name not in registers:
            return _unavailable(f"register {name} is not in pt_regs")
    size, signed, is_float = operand.size, operand.signed, operand.is_float
    if wanted in _INTEGER_TYPES:
        (size, signed), is_float = _INTEGER_TYPES[wanted], False
    if is_float and size not in FLOAT_SIZES:
        return _unavailable(f"{size}-byte floats are not supported")
    offset = operand.offset
    if operand.kind == ops.RIP:
        offset = operand.address - site.address
    return ArgumentPlan(kind=operand.kind, size=size, signed=signed, is_float=is_float,
                        string=wanted == "str", register=operand.register,
                        bit_offset=operand.bit_offset, base=operand.base, index=operand.index,
                        scale=operand.scale, offset=offset,
                        value=operand.value if operand.kind == ops.IMMEDIATE else None)


def plan_site(site, types=()):
    """The ArgumentPlans of every argument of `site`, with a spec's `types` applied.

    An explicit type on an argument that cannot be read is an error naming the
    file, the probe and the argument; without one the argument is only missing."""
    if len(site.operands) > MAX_ARGUMENTS:
        raise SdtraceError(f"{site.file}: {site.qualified_name}: {len(site.operands)} "
                           f"arguments, the BPF executor reads at most {MAX_ARGUMENTS}")
    plans = list(fetchargs.plan_probe(site, types, plan_argument))
    names = providers.argument_names(site.provider, site.name, len(site.operands)) or ()
    for index, (name, following) in enumerate(zip(names, names[1:])):
        pointer, length = plans[index], plans[index + 1]
        if (name.endswith(COUNTED[0]) and following == name[:-len(COUNTED[0])] + COUNTED[1]
                and not (index < len(types) and types[index])
                and pointer.kind is not None and pointer.size == site.word_size
                and length.kind is not None and not length.is_float):
            plans[index] = pointer._replace(string=True, length=index + 1)
    return tuple(plans)


class RecordLayout:
    """Where a site's record keeps each argument: HEADER, a u64 per argument, then
    `string_length` + 1 bytes (8-byte aligned) per string argument."""

    def __init__(self, plans, string_length=DEFAULT_STRING_LENGTH):
        self.plans, self.string_length = tuple(plans), string_length
        self.arguments = HEADER_STRUCT.size
        self.strings = {}
        position = self.arguments + ARGUMENT_SLOT.size * len(self.plans)
        for index, plan in enumerate(self.plans):
            if plan.string and plan.kind is not None:
                self.strings[index] = position
                position += (string_length + 1 + 7) & ~7
        self.size = position

    def argument(self, index):
        """Offset of argument `index`'s u64 (a string's: the copy's length with its NUL)."""
        return self.arguments + ARGUMENT_SLOT.size * index


class Block:
    """Emits the code of one record layout into an Assembler."""

    def __init__(self, code, layout, machine, maps, name, sleepable):
        self.code, self.layout, self.name = code, layout, name
        self.sleepable, self.copies, self.fills = sleepable, 0, 0
        self.prefix = name         # of the labels of the current fill()
        self.registers = REGISTERS[machine]
        self.ip = self.registers[INSTRUCTION_POINTER[machine]]
        self.ring_fd, self.lost_fd = maps

    def emit(self, record_size):
        """The record path: reserve a record on the ring, fill it, submit it."""
        code = self.code
        code.label(self.name)
        code.load_map(R1, self.ring_fd)
        code.mov(R2, record_size)
        code.mov(R3, 0)
        code.call("ringbuf_reserve")
        code.jump("jeq", R0, 0, "lost")
        code.mov(R8, R0)
        self.fill(HEADER_FIELDS, range(len(self.layout.plans)))
        code.mov(R1, R8)
        code.mov(R2, 0)
        code.call("ringbuf_submit")
        code.mov(R0, 0)
        code.exit()

    def fill(self, fields, arguments):
        """Writes the header `fields` (names of HEADER; missing, truncated always) and
        the `arguments` (indexes) into the record at R8; the rest is left alone."""
        code, layout = self.code, self.layout
        self.prefix, self.fills = f"{self.name}_fill{self.fills}", self.fills + 1
        if "ts" in fields:
            code.call("ktime_get_ns")
            code.store(8, R8, OFFSETS["ts"], R0)
        if {"pid", "tid"} & set(fields):
            code.call("get_current_pid_tgid")
            if "tid" in fields:
                code.store(8 if "pid" in fields else 4, R8, OFFSETS["tid"], R0)
            else:
                code.alu64("rsh", R0, 32)
                code.store(4, R8, OFFSETS["pid"], R0)
        if "cpu" in fields:
            code.call("get_smp_processor_id")
            code.store(4, R8, OFFSETS["cpu"], R0)
        if "site" in fields:
            code.store(4, R8, OFFSETS["site"], R7)
        if "comm" in fields:
            code.mov(R1, R8)
            code.alu64("add", R1, OFFSETS["comm"])
            code.mov(R2, 16)
            code.call("get_current_comm")
        unavailable = sum(1 << index for index, plan in enumerate(layout.plans)
                          if plan.kind is None)
        code.store(4, R8, OFFSETS["missing"], _signed32(unavailable))
        code.store(4, R8, OFFSETS["truncated"], 0)
        arguments = set(arguments)
        for index, plan in enumerate(layout.plans):     # a counted string's length too
            if plan.string and plan.length is not None and index in arguments:
                arguments.add(plan.length)
        for index, plan in enumerate(layout.plans):
            if plan.kind is not None and index in arguments:
                self.argument(index, plan)
        for index, plan in enumerate(layout.plans):
            if plan.string and plan.length is not None and index in arguments:
                self._counted(index, plan.length)

    def _add_constant(self, register, value):
        if -(1 << 31) <= value < (1 << 31):
            if value:
                self.code.alu64("add", register, value)
        else:
            self.code.load_imm64(R1, value)
            self.code.alu64("add", register, R1)

    def _address(self, plan):
        """R9 = the address of a memory operand."""
        code = self.code
        if plan.kind == ops.RIP:
            code.load(8, R9, R6, self.ip)
        elif plan.kind == ops.MEMORY:
            code.load(8, R9, R6, self.registers[plan.base])
        else:                                       # SIB
            code.load(8, R9, R6, self.registers[plan.index])
            if plan.scale > 1:
                code.alu64("lsh", R9, plan.scale.bit_length() - 1)
            if plan.base is not None:
                code.load(8, R1, R6, self.registers[plan.base])
                code.alu64("add", R9, R1)
        self._add_constant(R9, plan.offset)

    def _mark(self, field, index):
        """Sets bit `index` of the header's `field` (missing, truncated)."""
        code = self.code
        code.load(4, R1, R8, OFFSETS[field])
        code.alu32("or", R1, _signed32(1 << index))
        code.store(4, R8, OFFSETS[field], R1)

    def _read_user(self, index, size, label):
        """argument `index` = `size` bytes at R9; marks it missing and jumps to `label`
        if they cannot be read."""
        code, slot = self.code, self.layout.argument(index)
        code.store(8, R8, slot, 0)
        self._copy(slot, lambda: code.mov(R2, size))
        code.jump("jeq", R0, 0, f"{label}_read")
        self._mark("missing", index)
        code.goto(label)
        code.label(f"{label}_read")

    def _copy(self, destination, load_size):
        """R0 = 0 if the bytes at R9 (as many as `load_size()` puts in R2, a bounded
        count) are copied to `destination` in the record.  The quick read cannot
        fault a page in; where it fails a sleepable program copies again, faulting."""
        code = self.code
        for helper in ("probe_read_user", "copy_from_user") if self.sleepable else (
                "probe_read_user",):
            if helper == "copy_from_user":
                code.jump("jeq", R0, 0, f"{self.name}_copied{self.copies}")
            code.mov(R1, R8)
            code.alu64("add", R1, destination)
            load_size()
            code.mov(R3, R9)
            code.call(helper)
        if self.sleepable:
            code.label(f"{self.name}_copied{self.copies}")
            self.copies += 1

    def argument(self, index, plan):
        code, slot = self.code, self.layout.argument(index)
        done = f"{self.prefix}_argument{index}"
        if plan.kind in (ops.REGISTER, ops.IMMEDIATE):
            if plan.kind == ops.REGISTER:
                code.load(8, R9, R6, self.registers[plan.register])
                if plan.bit_offset:
                    code.alu64("rsh", R9, plan.bit_offset)
            else:
                code.load_imm64(R9, plan.value)
            if plan.size == 4:
                code.alu32("mov", R9, R9)
            elif plan.size < 8:
                code.alu64("and", R9, (1 << 8 * plan.size) - 1)
            code.store(8, R8, slot, R9)
        else:
            self._address(plan)
            self._read_user(index, plan.size, done)
            if plan.string:
                code.load(8, R9, R8, slot)
        if plan.string and plan.length is None:
            self._string(index, done)
        code.label(done)

    def _counted(self, index, length_index):
        """`length` bytes (argument `length_index`, at most string_length) at argument
        `index`'s pointer into its string area; the byte count copied in its slot."""
        code, limit = self.code, self.layout.string_length
        slot, area = self.layout.argument(index), self.layout.strings[index]
        done = f"{self.prefix}_counted{index}"
        code.load(4, R1, R8, OFFSETS["missing"])
        code.jump("jset", R1, _signed32(1 << index | 1 << length_index), done)
        code.load(8, R9, R8, slot)
        code.load(8, R2, R8, self.layout.argument(length_index))
        code.jump("jle", R2, limit, f"{done}_read")
        self._mark("truncated", index)
        code.mov(R2, limit)
        code.label(f"{done}_read")
        code.store(8, R8, slot, R2)

        bounds = iter(range(2))

        def count():            # reloaded, and bounded again for the verifier
            bounded = f"{done}_bounded{next(bounds)}"
            code.load(8, R2, R8, slot)
            code.jump("jle", R2, limit, bounded)
            code.mov(R2, limit)
            code.label(bounded)

        self._copy(area, count)
        code.jump("jeq", R0, 0, done)
        self._mark("missing", index)
        code.label(done)

    def _string(self, index, done):
        """The NUL-terminated string at R9 into the string area; its length with the NUL
        in the argument's slot."""
        code, length = self.code, self.layout.string_length
        slot, area = self.layout.argument(index), self.layout.strings[index]
        for attempt in ("quick", "faulting") if self.sleepable else ("quick",):
            if attempt == "faulting":       # fault the string's first page in, then again
                code.mov(R1, R10)
                code.alu64("add", R1, -8)
                code.mov(R2, 1)
                code.mov(R3, R9)
                code.call("copy_from_user")
            code.mov(R1, R8)
            code.alu64("add", R1, area)
            code.mov(R2, length + 1)
            code.mov(R3, R9)
            code.call("probe_read_user_str")
            code.store(8, R8, slot, R0)
            code.jump("jsgt", R0, 0, f"{done}_copied")
        self._mark("missing", index)
        code.goto(done)
        code.label(f"{done}_copied")
        code.jump("jne", R0, length + 1, done)
        # the buffer is full: truncated unless the byte after the copy is the NUL
        code.store(8, R10, -8, 0)
        code.mov(R1, R10)
        code.alu64("add", R1, -8)
        code.mov(R2, 1)
        code.mov(R3, R9)
        code.alu64("add", R3, length)
        code.call("probe_read_user")
        code.load(1, R1, R10, -8)
        code.jump("jeq", R1, 0, done)
        self._mark("truncated", index)


def _signed32(value):
    return value - (1 << 32) if value >> 31 else value


def generate(sites, ring_fd, lost_fd, string_length=DEFAULT_STRING_LENGTH, tree_fd=None,
             sleepable=True, record_size=None, emit=None, tracer_pid=None):
    """The program for `sites` ({site id: (site, plans)}, one machine), and the record
    layout of each site id.  A `sleepable` program (loaded with BPF_F_SLEEPABLE) reads
    again, faulting pages in, what the quick read could not.  Every record reserves
    `record_size` bytes (at least the largest layout's, the default): records of
    one size make the ring an array the reader scans at C speed (ringbuf.py).

    `ring_fd` is the ring buffer map, `lost_fd` a per-CPU array of one u64 counting the
    records the ring had no room for; `tree_fd`, if given, the hash map of the tgids to
    trace (scope.ProcessTree), every other process's hits ignored; the hits of process
    `tracer_pid` are ignored too (the tracer itself: one that runs the traced file,
    as sdtrace on Debian's python3.11 does, would otherwise record the lines that
    read its records, without end).  `emit(block,
    record_size)` writes a block's code instead of Block.emit (tally.py: count in a map,
    write no record); a block may jump to "out" to return."""
    machines = {site.machine for site, _plans in sites.values()}
    if len(machines) != 1 or not machines <= set(REGISTERS):
        raise SdtraceError(f"the BPF executor cannot generate code for {sorted(machines)}")
    [machine] = machines
    code = Assembler()
    code.mov(R6, R1)
    if tree_fd is not None or tracer_pid is not None:
        code.call("get_current_pid_tgid")
        code.alu64("rsh", R0, 32)
        if tracer_pid is not None:
            code.jump("jeq", R0, tracer_pid, "out")
        if tree_fd is not None:
            code.store(4, R10, -4, R0)
            map_call(code, "map_lookup_elem", tree_fd, -4)
            code.jump("jeq", R0, 0, "out")
        code.mov(R1, R6)
    code.call("get_attach_cookie")
    code.mov(R7, R0)
    blocks, layouts = {}, {}
    for site_id, (_site, plans) in sites.items():
        if plans not in blocks:
            blocks[plans] = Block(code, RecordLayout(plans, string_length), machine,
                                   (ring_fd, lost_fd), f"block{len(blocks)}", sleepable)
        layouts[site_id] = blocks[plans].layout
        code.jump("jeq", R7, site_id, blocks[plans].name)
    largest = max(block.layout.size for block in blocks.values())
    if record_size is None:
        record_size = largest
    elif record_size < largest:
        raise ValueError(f"records of {record_size} bytes cannot hold {largest}")
    code.mov(R0, 0)
    code.exit()
    for block in blocks.values():
        (emit or Block.emit)(block, record_size)
    if emit is None:
        code.label("lost")
        count_and_return(code, lost_fd)
    else:                       # no record, so nothing lost: the early exits' "out" alone
        code.label("out")
        code.mov(R0, 0)
        code.exit()
    return code.assemble(), layouts


def map_call(code, helper, map_fd, key_slot, value_slot=None):
    """R0 = helper(map, key[, value, BPF_ANY]), the key (and value) stored in the stack at
    R10 + `key_slot` (and R10 + `value_slot`)."""
    code.load_map(R1, map_fd)
    code.mov(R2, R10)
    code.alu64("add", R2, key_slot)
    if value_slot is not None:
        code.mov(R3, R10)
        code.alu64("add", R3, value_slot)
        code.mov(R4, BPF_ANY)
    code.call(helper)


def count_and_return(code, counter_fd):
    """Adds 1, atomically, to this CPU's u64 in `counter_fd` (a per-CPU array of one), then
    returns 0 at label "out", where the program's early exits jump."""
    code.store(4, R10, -4, 0)
    map_call(code, "map_lookup_elem", counter_fd, -4)
    code.jump("jeq", R0, 0, "out")
    code.mov(R1, 1)
    code.atomic_add(8, R0, 0, R1)
    code.label("out")
    code.mov(R0, 0)
    code.exit()
