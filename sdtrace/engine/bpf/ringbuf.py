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

Reading copies the submitted records out of the ring first (walk()), so that
their space goes back to the producers at once, and parses the copy after.
sdtrace's programs reserve records of one size, so the ring is an array: the
length words of a run of records are every SPAN-th u32, compared with the
expected length at C speed (a memoryview's stride), and the walk steps from
record to record without reading a header.  Only when a record is still
BUSY is the run scanned word by word, to stop before it.

Waiting: the map's fd is pollable (EPOLLIN when data is available).  A
producer submits with adaptive wake-ups: it wakes a sleeping consumer only
when the consumer has caught up with it, so a reader that drains the ring
completely before sleeping never misses a wake-up.
"""
import mmap
import select
import struct
from collections import deque

from ...errors import SdtraceError
from ...kernel.perf import BACKLOG_LIMIT

BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_HDR_SZ = 8
POSITION = struct.Struct("<Q")
LENGTH = KEY = struct.Struct("<I")


class RingBuffer:
    """The consumer side of one ring buffer map (`ring`: a kernel.bpf.Map) whose
    records are all `record_size` bytes and tell their kind by a u32 at `key_offset`
    (walk() picks their parser by it)."""

    def __init__(self, ring, key_offset, record_size):
        page = mmap.PAGESIZE
        self.size = ring.max_entries
        if self.size % page or self.size & (self.size - 1):
            raise SdtraceError(f"ring buffer {ring.name}: {self.size} bytes is not a "
                               f"power-of-two number of pages")
        self.key_offset = key_offset
        self.record_size = record_size
        self.span = (record_size + BPF_RINGBUF_HDR_SZ + 7) & ~7    # header + record
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
        self._submitted = LENGTH.pack(record_size)   # the length word of a readable record
        self._backlog = deque()             # (bytes copied from the ring, next record)
        self.backlog_bytes = 0
        self._poll = select.epoll()
        self._poll.register(ring.fd, select.EPOLLIN)

    def walk(self, parsers, append, limit=None):
        """Feeds the records submitted and not yet read, in ring order, to their parsers
        (`parsers` maps the u32 at `key_offset` in a record to the parser of its kind:
        parse(data, position, append)); about `limit` bytes of them if given.

        The ring's records are first copied into a backlog (a memcpy), which gives
        their space back to the producers at once; the backlog is then walked, the
        slow part, so that a burst piles up in ordinary memory, not against a full
        ring, as perf.RingSet does."""
        self._take()
        unpack_key = KEY.unpack_from
        key_offset, span = BPF_RINGBUF_HDR_SZ + self.key_offset, self.span
        backlog, walked = self._backlog, 0
        while backlog and (limit is None or walked < limit):
            data, start = backlog[0]
            end = len(data)
            if limit is not None:
                end = min(end, start + -(-(limit - walked) // span) * span)
            for position in range(start, end, span):
                parsers[unpack_key(data, position + key_offset)[0]](
                    data, position + BPF_RINGBUF_HDR_SZ, append)
            walked += end - start
            if end < len(data):
                backlog[0] = (data, end)
            else:
                backlog.popleft()
        self.backlog_bytes -= walked

    def _take(self):
        """Moves the submitted records to the backlog (up to the first one still being
        written), unless it holds BACKLOG_LIMIT bytes; frees their space in the ring."""
        if self.backlog_bytes >= BACKLOG_LIMIT:
            return
        begin = POSITION.unpack_from(self._consumer, 0)[0]
        available = POSITION.unpack_from(self._producer, 0)[0] - begin
        if not available:
            return
        start = self._data + (begin & self._mask)      # the data is mapped twice: no wrap
        data = self._producer[start:start + available]
        span = self.span
        words = memoryview(data).cast("I")[::span // LENGTH.size]
        if words.tobytes() != self._submitted * len(words):
            ready = next(index for index, word in enumerate(words)
                         if word != self.record_size)
            if not words[ready] & BPF_RINGBUF_BUSY_BIT:
                raise SdtraceError(f"ring buffer: a record of {words[ready]:#x} bytes, not "
                                   f"{self.record_size} (or discarded), at {begin}")
            data = data[:ready * span]
            if not data:
                return
        self._backlog.append((data, 0))
        self.backlog_bytes += len(data)
        POSITION.pack_into(self._consumer, 0, begin + len(data))

    @property
    def pending(self):
        """Whether submitted records wait to be read, in the backlog or the ring."""
        return bool(self._backlog) or (POSITION.unpack_from(self._consumer, 0)[0]
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
