"""The engine layer: a tracing session and the executor that runs its probes.

session (select, arm, stream, disarm), command (the traced command of -c),
events (the records and Event objects every executor produces), and the
tracefs executor's pieces: fetchargs (operands -> uprobe fetch arguments)
and its sample decoding; bpf, the in-kernel executor being built (generated
BPF programs, one uprobe_multi link per file, a BPF ring buffer).
"""
