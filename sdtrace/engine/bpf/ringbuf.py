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
LENGTH = KEY = struct.Struct("<I")


class RingBuffer:
    """The consumer side of one ring buffer map (`ring`: a kernel.bpf.Map) whose
    records tell their kind by a u32 at `key_offset` (walk() picks their parser by it)."""

    def __init__(self, ring, key_offset):
        self.key_offset = key_offset
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

    def walk(self, parsers, append, limit=None):
        """Feeds the submitted records not yet read, in ring order, to their parsers
        (`parsers` maps the u32 at `key_offset` in a record to the parser of its
        kind: parse(data, position, append)), then frees their space; stops after
        about `limit` bytes if given.  Returns how many records were parsed."""
        producer, data, mask = self._producer, self._data, self._mask
        unpack_length, unpack_key = LENGTH.unpack_from, KEY.unpack_from
        key_offset = BPF_RINGBUF_HDR_SZ + self.key_offset
        consumer = POSITION.unpack_from(self._consumer, 0)[0]
        end = POSITION.unpack_from(producer, 0)[0]
        if limit is not None:
            end = min(end, consumer + limit)
        parsed = 0
        try:
            while consumer < end:
                start = data + (consumer & mask)
                length = unpack_length(producer, start)[0]
                if length & BPF_RINGBUF_BUSY_BIT:
                    break
                if not length & BPF_RINGBUF_DISCARD_BIT:
                    parsers[unpack_key(producer, start + key_offset)[0]](
                        producer, start + BPF_RINGBUF_HDR_SZ, append)
                    parsed += 1
                consumer += ((length & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT))
                             + BPF_RINGBUF_HDR_SZ + 7) & ~7
        finally:
            POSITION.pack_into(self._consumer, 0, consumer)
        return parsed

    @property
    def pending(self):
        """Whether submitted records wait to be read."""
        return (POSITION.unpack_from(self._consumer, 0)[0]
                < POSITION.unpack_from(self._producer, 0)[0])

    def wait(self, timeout):
        """Sleeps until the ring has data or `timeout` seconds pass; whether it has data."""
        return bool(self._poll.poll(timeout))

    def close(self):
        """Unmaps the ring (the map's fd belongs to its owner); idempotent."""
        if not self._poll.closed:
            self._poll.close()
            self._consumer.close()
            self._producer.close()
