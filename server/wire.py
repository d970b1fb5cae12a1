"""The frames the HTTP front end and the inference process exchange over one stream socket.

A frame is ``<length u32><kind u8><payload>``, little-endian, ``length`` counting the payload.
Numbers are packed with :mod:`struct` and images travel as raw uint8 pixels: nothing is pickled,
so a confused or hostile peer can at worst send a frame that fails to parse.

Front end -> inference process: ``SUBMIT`` (one decoded image with its arrival and budget),
``CANCEL`` (the client left), ``ANSWERED`` (what the client got, for the metrics and the post-
inference overhead the scheduler learns), ``COUNT`` (an outcome decided in the front end: a shed or
an invalid request), ``QUERY`` (status, subnets, metrics), ``DRAIN``.

Inference process -> front end: ``RESULT`` / ``REJECTED`` (exactly one per ``SUBMIT``), ``REPLY``
(one per ``QUERY``), ``STATE`` (JSON: verified, ready, failed) and ``LOAD`` (queue depth, the
Retry-After a full queue would give, and the fastest subnet's predicted time, after every batch),
which is what the front end sheds by before it reads or decodes anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("<IB")
MAX_FRAME_BYTES = 64 * 2**20  # a frame claiming more is a protocol error, not an allocation

# front end -> inference process
SUBMIT, CANCEL, ANSWERED, COUNT, QUERY, DRAIN = 1, 2, 3, 4, 5, 6
# inference process -> front end
RESULT, REJECTED, REPLY, STATE, LOAD = 10, 11, 12, 13, 14

# what a QUERY asks for
STATUS, SUBNETS, METRICS = 1, 2, 3


class ProtocolError(ValueError):
    """A frame that does not parse: the peer is not speaking this protocol (or is broken)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


class FrameReader:
    """Reassembles frames from a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every frame now complete, as (kind, payload), in order."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            length, kind = HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
            end = offset + HEADER.size + length
            if end > len(buffer):
                break
            frames.append((kind, bytes(buffer[offset + HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return frames


def _unpack(layout: struct.Struct, payload: bytes, what: str) -> tuple[Any, ...]:
    if len(payload) < layout.size:
        raise ProtocolError(f"{what} frame of {len(payload)} bytes is shorter than its {layout.size}-byte header")
    return layout.unpack_from(payload)


@dataclass(frozen=True)
class Submit:
    request: int
    arrival: float  # CLOCK_MONOTONIC seconds, the same clock in both processes
    budget: float  # seconds
    shape: tuple[int, int, int]  # C, H, W
    pixels: bytes  # uint8, C*H*W

    LAYOUT = struct.Struct("<QddHHH")

    def encode(self) -> bytes:
        return frame(SUBMIT, self.LAYOUT.pack(self.request, self.arrival, self.budget, *self.shape) + self.pixels)

    @classmethod
    def decode(cls, payload: bytes) -> Submit:
        request, arrival, budget, c, h, w = _unpack(cls.LAYOUT, payload, "SUBMIT")
        pixels = payload[cls.LAYOUT.size :]
        if len(pixels) != c * h * w:
            raise ProtocolError(f"SUBMIT of shape {c}x{h}x{w} carries {len(pixels)} bytes")
        return cls(request, arrival, budget, (c, h, w), pixels)


@dataclass(frozen=True)
class Answered:
    subnet: int
    met: bool
    total: float  # seconds, arrival to response
    queued: float
    post_overhead: float  # seconds from the result being ready to the response being built

    LAYOUT = struct.Struct("<HBddd")

    def encode(self) -> bytes:
        return frame(ANSWERED, self.LAYOUT.pack(self.subnet, self.met, self.total, self.queued, self.post_overhead))

    @classmethod
    def decode(cls, payload: bytes) -> Answered:
        subnet, met, total, queued, post = _unpack(cls.LAYOUT, payload, "ANSWERED")
        return cls(subnet, bool(met), total, queued, post)


@dataclass(frozen=True)
class Result:
    request: int
    subnet: int
    batch_size: int
    enqueued: float  # clock when the scheduler queued it
    queued: float  # seconds from enqueue to dispatch
    inference: float  # seconds the batch took
    finished: float  # clock when the batch ended
    predicted: float  # seconds the policy expected the batch to take
    probabilities: bytes  # float32, one per class
    stage: int = -1  # multi-stage bundles: the answering stage (0-based); -1 otherwise
    cut_short: bool = False
    blocks_run: int = -1  # gated bundles: blocks run for the image; -1 otherwise
    groups_run: float = -1.0  # gated bundles: share of channel groups computed

    LAYOUT = struct.Struct("<QHHdddddbBhf")

    def encode(self) -> bytes:
        head = self.LAYOUT.pack(
            self.request, self.subnet, self.batch_size, self.enqueued, self.queued, self.inference, self.finished,
            self.predicted, self.stage, self.cut_short, self.blocks_run, self.groups_run,
        )  # fmt: skip
        return frame(RESULT, head + self.probabilities)

    @classmethod
    def decode(cls, payload: bytes) -> Result:
        (request, subnet, batch, enqueued, queued, inference, finished, predicted, stage, cut_short, blocks,
         groups) = _unpack(cls.LAYOUT, payload, "RESULT")  # fmt: skip
        probabilities = payload[cls.LAYOUT.size :]
        if len(probabilities) % 4:
            raise ProtocolError(f"RESULT probabilities of {len(probabilities)} bytes are not float32s")
        return cls(
            request,
            subnet,
            batch,
            enqueued,
            queued,
            inference,
            finished,
            predicted,
            probabilities,
            stage,
            bool(cut_short),
            blocks,
            groups,
        )


@dataclass(frozen=True)
class Refusal:
    request: int
    reason: int  # a server.refusals.Refused value
    retry_after: int  # seconds; 0 = no Retry-After
    message: str

    LAYOUT = struct.Struct("<QHI")

    def encode(self) -> bytes:
        return frame(REJECTED, self.LAYOUT.pack(self.request, self.reason, self.retry_after) + self.message.encode())

    @classmethod
    def decode(cls, payload: bytes) -> Refusal:
        request, reason, retry_after = _unpack(cls.LAYOUT, payload, "REJECTED")
        return cls(request, reason, retry_after, payload[cls.LAYOUT.size :].decode(errors="replace"))


@dataclass(frozen=True)
class Load:
    depth: int  # requests queued
    full_retry_after: int  # the Retry-After to shed with while the queue is full; 0 = not full
    fastest: float  # predicted seconds of the fastest subnet at batch 1, under the current load

    LAYOUT = struct.Struct("<IId")

    def encode(self) -> bytes:
        return frame(LOAD, self.LAYOUT.pack(self.depth, self.full_retry_after, self.fastest))

    @classmethod
    def decode(cls, payload: bytes) -> Load:
        return cls(*_unpack(cls.LAYOUT, payload, "LOAD"))


ID = struct.Struct("<Q")
QUERY_LAYOUT = struct.Struct("<QB")


def cancel(request: int) -> bytes:
    return frame(CANCEL, ID.pack(request))


def count(outcome: str) -> bytes:
    return frame(COUNT, outcome.encode())


def query(query_id: int, what: int) -> bytes:
    return frame(QUERY, QUERY_LAYOUT.pack(query_id, what))


def reply(query_id: int, body: bytes) -> bytes:
    return frame(REPLY, ID.pack(query_id) + body)


def state(phase: str, **fields: Any) -> bytes:
    return frame(STATE, json.dumps({"phase": phase, **fields}).encode())


def decode_id(payload: bytes, what: str) -> tuple[int, bytes]:
    """The leading request or query id, and what follows it."""
    (value,) = _unpack(ID, payload, what)
    return value, payload[ID.size :]


def decode_query(payload: bytes) -> tuple[int, int]:
    """(query id, what it asks for)."""
    query_id, what = _unpack(QUERY_LAYOUT, payload, "QUERY")
    return query_id, what


def decode_state(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(f"STATE frame is not JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("phase"), str):
        raise ProtocolError("STATE frame has no phase")
    return message
