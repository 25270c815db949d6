"""The discovery layer: which SDT sites exist, and what a spec selects.

elf (the file), notes (.note.stapsdt -> site records), operands (argument
strings -> typed operands), targets (paths, library names, processes and
commands -> ELF files), specs (probe specs -> sites), providers (the
documented names of well-known providers' arguments).  Reads files and /proc
through the kernel layer; arms nothing.
"""
