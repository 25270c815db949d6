"""The semaphore layer: SDT counters raised once per {semaphore, process} in user space.

counters (what a session holds and how it is taken back), manager (the
watcher that raises and lowers them), guardian (crash recovery and ledgers),
audit (a read-only look at every counter in memory).  In kernel mode the
kernel counts them (uprobes with ref_ctr_offset) and this layer stays idle.
"""
