"""Record sizes as Kafka counts them (pure): what a batch of one record weighs, what fits a limit."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from qtasks.connectors.kafka.options import KEY_ROOM

log = logging.getLogger("qtasks.kafka")


# -- record sizes (pure) -----------------------------------------------------------------

#: A v2 record batch's header: base offset, length, leader epoch, magic, crc, attributes,
#: last offset delta, two timestamps, producer id and epoch, base sequence, record count.
BATCH_HEADER = 61
#: A record's fixed part at its largest: length varint (5), attributes (1), timestamp delta
#: varint (10), offset delta varint (5). The same upper bound aiokafka's estimate uses.
RECORD_OVERHEAD = 21


def varint_size(n: int) -> int:
    """Bytes of Kafka's zig-zag varint for a length ``n`` >= 0."""
    value = n << 1
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def batch_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None) -> int:
    """An upper bound of the batch one record makes (no compression).

    The broker compares the whole batch with ``max.message.bytes`` (the
    ``message.max.bytes`` of a topic), so this is what ``send`` checks.
    """
    size = BATCH_HEADER + RECORD_OVERHEAD + 1  # + the header count varint (0 headers)
    for part in (key, value):
        size += 1 if part is None else varint_size(len(part)) + len(part)
    if headers:
        size += varint_size(len(headers)) - 1 + headers_size(headers)
    return size


def headers_size(headers: Sequence[tuple[str, bytes]]) -> int:
    """Bytes of a record's headers (without their count): each name and value with its length."""
    size = 0
    for name, value in headers:
        encoded = len(name.encode())
        size += varint_size(encoded) + encoded + varint_size(len(value)) + len(value)
    return size


#: ``batch_size(key, value)`` is at most ``len(key) + len(value) + BATCH_SLACK`` (each
#: length varint takes at most 5 bytes): a record this far under a limit needs no exact size.
BATCH_SLACK = BATCH_HEADER + RECORD_OVERHEAD + 1 + 2 * 5


@functools.lru_cache(maxsize=64)  # pure, and asked for every run of a task
def value_limit(batch_limit: int, key_room: int = KEY_ROOM) -> int:
    """The largest value whose batch, with a key of ``key_room`` bytes, fits ``batch_limit``."""
    budget = batch_limit - BATCH_HEADER - RECORD_OVERHEAD - 1 - varint_size(key_room) - key_room
    value = max(0, budget - 5)
    while value + 1 + varint_size(value + 1) <= budget:
        value += 1
    return value if value + varint_size(value) <= budget else 0
