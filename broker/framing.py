"""MQTT 3.1.1 packet framing for the lean clients (broker/fastlink.py, broker/fastpub.py).

The one encoder and decoder of the remaining length (the variable-length integer of the
fixed header), and the few packets the lean clients build themselves. The general client
(aiomqtt, broker/link.py) frames its own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

MAX_REMAINING_LENGTH = 268_435_455  # four length bytes of 7 bits: the most MQTT can frame
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a frame bigger than this is a broken stream
BAD_LENGTH = -2  # decode_length: more than 4 bytes, a broken stream
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def encode_length(n: int) -> bytes:
    """``n`` as an MQTT remaining length: 7 bits a byte, least significant first, the top
    bit set on every byte but the last. ValueError outside 0..MAX_REMAINING_LENGTH."""
    if n < 128:  # one and two bytes first: every setpoint and telemetry frame
        if n < 0:
            raise ValueError(f"a remaining length is 0..{MAX_REMAINING_LENGTH}, not {n}")
        return bytes((n,))
    if n < 16_384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"a remaining length is 0..{MAX_REMAINING_LENGTH}, not {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_length(data: bytes | bytearray, i: int, n: int) -> tuple[int, int]:
    """An MQTT remaining length starting at ``data[i]``, with ``n`` bytes in hand:
    (length, index after it); length -1 if not all of it is here yet, BAD_LENGTH if it
    runs past 4 bytes."""
    length = shift = 0
    while i < n:
        byte = data[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length, i
        shift += 7
        if shift > 21:
            return BAD_LENGTH, i
    return -1, i


def utf8(text: str) -> bytes:
    """An MQTT UTF-8 string: two bytes of length, then the bytes."""
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def frame(first: int, body: bytes) -> bytes:
    """A packet: fixed header byte, remaining length, body."""
    return bytes((first,)) + encode_length(len(body)) + body


def connect_packet(
    client_id: str, keepalive: int, username: str | None, password: str | None
) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session (neither lean client has anything to keep)."""
    flags = 0x02
    payload = utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
        if password is not None:
            flags |= 0x40
            payload += utf8(password)
    return frame(0x10, utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def subscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    """SUBSCRIBE to ``filters`` at QoS 0."""
    body = struct.pack("!H", packet_id) + b"".join(utf8(f) + b"\x00" for f in filters)
    return frame(0x82, body)
