"""The BPF executor (in progress): each file's sites compiled into one BPF program.

asm (an eBPF assembler with labels), codegen (a site's operands -> the
program's instructions, and the record layout its decoder shares), ringbuf
(the BPF ring buffer, consumed through mmap), scope (a process tree kept by
the kernel at fork and exit, for the programs to check), executor (maps,
programs and one uprobe_multi link per file, records out).
"""
