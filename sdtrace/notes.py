"""SDT notes -> probe records.  (INTERFACE PINNED; implementation in progress.)"""
from dataclasses import dataclass
from typing import Optional, Tuple

from .operands import Operand


@dataclass(frozen=True)
class Probe:
    file: str                      # absolute path as opened
    provider: str
    name: str
    machine: str                   # "x86_64", "aarch64", ... (operands.parse_arguments' machine)
    address: int                   # site virtual address, prelink-corrected
    offset: int                    # site file offset (what uprobes take)
    semaphore_address: int         # link-time address of the semaphore, 0 if none
    semaphore: Optional[int]       # semaphore file offset (ref_ctr_offset), None if none/unusable
    semaphore_error: Optional[str] # why a declared semaphore is unusable, else None
    args: str                      # raw argument string from the note
    operands: Tuple[Operand, ...]  # one per argument; RIP operands resolved (see resolved_offset)


def read_probes(path: str) -> "list[Probe]":
    """Every SDT probe site in the ELF file at `path`; SdtraceError on bad input."""
    raise NotImplementedError
