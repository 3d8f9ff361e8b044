"""Redis Cluster hash slots: which slot a key is in, and names made to land in a chosen slot.

A key's slot is ``CRC16(tag) mod 16384`` (XMODEM CRC16), where the tag is the part of the key
between the first ``{`` and the next ``}`` when that part is not empty, else the whole key.
Herald puts a hash tag in every key (:mod:`herald.broker.redis`), so the keys one script touches
share a slot.

Two things need a name in a *given* slot:

* an operation accepted with an ``Idempotency-Key``: its record, its topic and the idempotency
  record (looked up by the key, so in the key's slot) must share a slot, so the operation's id is
  made to land there (:func:`operation_id_in_slot`);
* the shards of a request stream, spread evenly over the slot space (:func:`shard_tags`), so
  that with masters holding equal ranges of slots each master gets its share.

Both append three characters to a random prefix. CRC16 without a final XOR is linear: for a
prefix ``p`` and a 3-byte suffix ``s``, ``crc(p + s) = crc(b"\\0\\0\\0", crc(p)) ^ crc(s)``, so the
suffix that lands ``p + s`` in slot ``n`` is looked up in a table of suffixes by their own CRC.
Every one of the 16,384 slots has a suffix of three URL-safe characters (checked when the table
is built, which takes about 0.2 s once per process).
"""

from __future__ import annotations

import binascii
import secrets
from functools import cache

SLOTS = 16384
_MASK = SLOTS - 1
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # token_urlsafe's
_ZEROS = b"\0\0\0"


def key_slot(key: str | bytes) -> int:
    """The slot of ``key``, by Redis Cluster's rule (hash tag included)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return binascii.crc_hqx(raw, 0) & _MASK


@cache
def _suffixes() -> tuple[bytes, ...]:
    """For every value of a slot, a 3-character suffix whose own CRC16 has that value in its low 14 bits."""
    table: list[bytes | None] = [None] * SLOTS
    missing = SLOTS
    for a in _ALPHABET:
        for b in _ALPHABET:
            for c in _ALPHABET:
                suffix = bytes((a, b, c))
                value = binascii.crc_hqx(suffix, 0) & _MASK
                if table[value] is None:
                    table[value] = suffix
                    missing -= 1
                    if not missing:
                        return tuple(t for t in table if t is not None)
    raise AssertionError("some slot has no 3-character suffix")  # never: checked for this alphabet


def suffix_for(prefix: bytes, slot: int) -> str:
    """The 3 characters that make ``CRC16(prefix + them) mod 16384 == slot``."""
    state = binascii.crc_hqx(_ZEROS, binascii.crc_hqx(prefix, 0)) & _MASK
    return _suffixes()[state ^ slot].decode()


def operation_id_in_slot(slot: int, *, tag_prefix: str = "operations/") -> str:
    """A new operation id (``op_`` and 22 URL-safe characters, 114 of their bits random) whose tag lands in ``slot``.

    The tag is ``tag_prefix + id``: what :func:`herald.broker.redis._op_key` and the topic keys of
    ``operations/<id>`` put between braces.
    """
    head = "op_" + secrets.token_urlsafe(15)[:19]
    return head + suffix_for((tag_prefix + head).encode(), slot)


def shard_tags(name: str, shards: int) -> list[str]:
    """``shards`` hash tags for the shards of ``name`` (``<name>#<k>`` and 3 characters), evenly spread over the
    slots: shard ``k`` lands in the middle of the ``k``-th of ``shards`` equal ranges."""
    out = []
    for k in range(shards):
        head = f"{name}#{k}"
        out.append(head + suffix_for(head.encode(), int((k + 0.5) * SLOTS / shards)))
    return out


def warm() -> None:
    """Build the suffix table now (about 0.2 s), not in the middle of the first request that needs it."""
    _suffixes()
