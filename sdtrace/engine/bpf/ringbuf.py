"""A BPF ring buffer, consumed from user space through mmap.

A ``BPF_MAP_TYPE_RINGBUF`` map (5.8, 457f44363a88) is one ring shared by
every CPU.  Its fd maps as three parts, page-aligned:

    offset 0           the consumer page: consumer_pos (u64), ours to write
    offset PAGE        the producer page: producer_pos (u64), the kernel's
    offset 2 * PAGE    the data, `size` bytes, mapped twice in a row

We map the consumer page read-write and the producer page with the data
read-only (the kernel refuses anything else).  Positions only grow; a
position's place in the data is ``position & (size - 1)``.  Because the
data is mapped twice, a record that wraps past the end is still contiguous
in the mapping, and is sliced in one piece.

Every record starts with an 8-byte header: a u32 length whose top bits are
BUSY (reserved, not yet submitted: stop there, the producer will finish it)
and DISCARD (skip it), then a u32 the kernel uses to find the page.  The
record occupies its length plus the header, rounded up to 8 bytes.  Having
read up to a position, the consumer stores it in consumer_pos, which gives
the space back to the producers.

The ABI wants acquire loads of producer_pos and of each header, and a
release store of consumer_pos; Python has no barriers, and on x86-64 (TSO)
plain loads and stores are ordered that way already.

Waiting: the map's fd is pollable (EPOLLIN when data is available).  A
producer submits with adaptive wake-ups: it wakes a sleeping consumer only
when the consumer has caught up with it, so a reader that drains the ring
completely before sleeping never misses a wake-up.
"""
import mmap
import select
import struct

from ...errors import SdtraceError

BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
POSITION = struct.Struct("<Q")
LENGTH = struct.Struct("<I")


class RingBuffer:
    """The consumer side of one ring buffer map (`ring`: a kernel.bpf.Map)."""

    def __init__(self, ring):
        page = mmap.PAGESIZE
        self.size = ring.max_entries
        if self.size % page or self.size & (self.size - 1):
            raise SdtraceError(f"ring buffer {ring.name}: {self.size} bytes is not a "
                               f"power-of-two number of pages")
        try:
            self._consumer = mmap.mmap(ring.fd, page, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
            self._producer = mmap.mmap(ring.fd, page + 2 * self.size, mmap.MAP_SHARED,
                                       mmap.PROT_READ, offset=page)
        except OSError as error:
            raise SdtraceError(f"ring buffer {ring.name}: cannot mmap it: "
                               f"{error.strerror}") from None
        self._data = page
        self._mask = self.size - 1
        self._poll = select.epoll()
        self._poll.register(ring.fd, select.EPOLLIN)

    def take(self):
        """Every submitted record not yet read, as bytes, in ring order; frees their space."""
        producer, data, mask = self._producer, self._data, self._mask
        consumer = POSITION.unpack_from(self._consumer, 0)[0]
        end = POSITION.unpack_from(producer, 0)[0]
        records = []
        while consumer < end:
            start = data + (consumer & mask)
            length = LENGTH.unpack_from(producer, start)[0]
            if length & BPF_RINGBUF_BUSY_BIT:
                break
            size = length & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
            if not length & BPF_RINGBUF_DISCARD_BIT:
                records.append(producer[start + BPF_RINGBUF_HDR_SZ:
                                        start + BPF_RINGBUF_HDR_SZ + size])
            consumer += (size + BPF_RINGBUF_HDR_SZ + 7) & ~7
        POSITION.pack_into(self._consumer, 0, consumer)
        return records

    def wait(self, timeout):
        """Sleeps until the ring has data or `timeout` seconds pass; whether it has data."""
        return bool(self._poll.poll(timeout))

    def close(self):
        """Unmaps the ring (the map's fd belongs to its owner); idempotent."""
        if not self._poll.closed:
            self._poll.close()
            self._consumer.close()
            self._producer.close()
