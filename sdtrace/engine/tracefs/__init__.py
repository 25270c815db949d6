"""The tracefs executor: each site a uprobe event defined in tracefs, its
arguments fetched by the kernel's fetch-arg language (engine/fetchargs.py),
its hits perf samples decoded by generated parsers (engine/events.py)."""
