"""Perfetto's native trace format: the protobuf encoding of the few messages a timeline needs.

A Perfetto trace file (``.pftrace``) is one protobuf message, ``Trace``, whose
only field is ``repeated TracePacket packet = 1``.  Protobuf's wire format
lets a repeated field be written as a run of separate fields, so the file is
simply one ``packet`` field after another -- the tag byte 0x0a (field 1,
wire type 2), the packet's length as a varint, then the packet's bytes -- and
the trace is written packet by packet, never held in memory.

The wire format, as much of it as these messages use:

* a message is a sequence of fields in any order; each field is a *tag*, the
  varint ``field number << 3 | wire type``, followed by its value;
* wire type 0, VARINT: an integer in base 128, least significant group of 7
  bits first, the top bit of each byte set when more bytes follow.  uint32,
  uint64, bool and enums are written as they are; int32 and int64 in two's
  complement on 64 bits, so a negative number always takes ten bytes;
* wire type 1, I64: eight bytes little-endian (a double);
* wire type 2, LEN: a varint byte count, then the bytes: a string in UTF-8,
  or an embedded message;
* a repeated field is the same field written once per element; a field left
  out has its default.

``MESSAGES`` declares each message as data -- its fields' names, numbers and
kinds, as Perfetto's .proto files (protos/perfetto/trace/trace_packet.proto,
track_event/track_event.proto, track_descriptor.proto, process_descriptor.proto,
thread_descriptor.proto, debug_annotation.proto, clock_snapshot.proto) define
them -- and ``encode`` writes a message from a dict of its fields' values:
a nested message is a dict, a repeated field a list.  The tests read the
bytes back with the protobuf runtime and the definitions the ``perfetto``
package ships; the README says why sdtrace writes these few messages itself.
"""
import functools
import struct

VARINT, I64, LEN = 0, 1, 2         # wire types

# How a kind of field is written: (wire type, value -> bytes of the value).
# "uint" is uint32/uint64/enum, "int" int32/int64, "double" a float.
UINT, INT, BOOL, DOUBLE, STRING = "uint", "int", "bool", "double", "string"

# message -> {field: (number, kind or message name)}
MESSAGES = {
    "Trace": {"packet": (1, "TracePacket")},
    "TracePacket": {
        "clock_snapshot": (6, "ClockSnapshot"),
        "timestamp": (8, UINT),
        "trusted_packet_sequence_id": (10, UINT),
        "track_event": (11, "TrackEvent"),
        "sequence_flags": (13, UINT),
        "timestamp_clock_id": (58, UINT),
        "track_descriptor": (60, "TrackDescriptor"),
    },
    "ClockSnapshot": {"clocks": (1, "Clock"), "primary_trace_clock": (2, UINT)},
    "Clock": {"clock_id": (1, UINT), "timestamp": (2, UINT)},
    "TrackDescriptor": {
        "uuid": (1, UINT),
        "name": (2, STRING),
        "process": (3, "ProcessDescriptor"),
        "thread": (4, "ThreadDescriptor"),
        "parent_uuid": (5, UINT),
    },
    "ProcessDescriptor": {"pid": (1, INT), "process_name": (6, STRING)},
    "ThreadDescriptor": {"pid": (1, INT), "tid": (2, INT), "thread_name": (5, STRING)},
    "TrackEvent": {
        "debug_annotations": (4, "DebugAnnotation"),
        "type": (9, UINT),
        "track_uuid": (11, UINT),
        "categories": (22, STRING),
        "name": (23, STRING),
    },
    "DebugAnnotation": {
        "bool_value": (2, BOOL),
        "uint_value": (3, UINT),
        "int_value": (4, INT),
        "double_value": (5, DOUBLE),
        "string_value": (6, STRING),
        "name": (10, STRING),
        "dict_entries": (11, "DebugAnnotation"),
    },
}

# Values of the enums and flags sdtrace writes
SEQ_INCREMENTAL_STATE_CLEARED = 1                          # TracePacket.SequenceFlags
BUILTIN_CLOCK_MONOTONIC, BUILTIN_CLOCK_BOOTTIME = 3, 6     # BuiltinClock
TYPE_SLICE_BEGIN, TYPE_SLICE_END, TYPE_INSTANT = 1, 2, 3   # TrackEvent.Type

UINT64_LIMIT = 1 << 64
INT64_MIN = -(1 << 63)
_DOUBLE = struct.Struct("<d")
STRINGS_REMEMBERED = 4096


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value):
    """The varint of an integer in [-2**63, 2**64): a negative one in two's complement."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if not INT64_MIN <= value < UINT64_LIMIT:
        raise ValueError(f"{value} does not fit a 64-bit varint")
    value %= UINT64_LIMIT
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(data):
    return varint(len(data)) + data


@functools.lru_cache(maxsize=STRINGS_REMEMBERED)
def _string(text):
    """A string field's value: names, probes and argument strings repeat, so each
    is encoded once while it stays among the STRINGS_REMEMBERED last used."""
    return _length_delimited(text.encode(errors="replace"))


_WRITERS = {
    UINT: (VARINT, varint),
    INT: (VARINT, varint),
    BOOL: (VARINT, lambda value: varint(int(value))),
    DOUBLE: (I64, _DOUBLE.pack),
    STRING: (LEN, _string),
}


def _compile(messages):
    """{message: {field: (tag bytes, value -> bytes)}} of the declared messages."""
    compiled = {name: {} for name in messages}
    for name, fields in messages.items():
        for field, (number, kind) in fields.items():
            if kind in messages:
                wire_type, write = LEN, (lambda nested, kind=kind:
                                         _length_delimited(encode(kind, nested)))
            else:
                wire_type, write = _WRITERS[kind]
            compiled[name][field] = (varint(number << 3 | wire_type), write)
    return compiled


_FIELDS = _compile(MESSAGES)


def encode(message, fields):
    """The bytes of `message` (a name in MESSAGES) with `fields`' values (None: left out)."""
    writers = _FIELDS[message]
    out = bytearray()
    for field, value in fields.items():
        if value is None:
            continue
        tag, write = writers[field]
        if value.__class__ is list:
            for element in value:
                out += tag
                out += write(element)
        else:
            out += tag
            out += write(value)
    return bytes(out)


def packet(fields):
    """One TracePacket as it stands in a trace file: the Trace's packet field."""
    return encode("Trace", {"packet": fields})
