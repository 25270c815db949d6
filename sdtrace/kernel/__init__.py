"""The kernel layer: Linux interfaces with no knowledge of SDT.

libc (syscalls ctypes reaches), procfs (who a process is and what it maps),
procmem (one process's memory), procwatch (fork/exec/exit and file-open
events), tracefs (uprobe definitions), perf (perf_event_open and its rings),
bpf (the bpf() system call), features (what this kernel can do), log (the
library's loggers).  Every other layer may import it; it imports none of them.
"""
