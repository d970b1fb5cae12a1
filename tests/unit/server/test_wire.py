"""The front end <-> inference process frames: round trips, arbitrary fragmentation, malformed input."""

from __future__ import annotations

import struct

import pytest

from slimserve.server import wire
from slimserve.server.refusals import Refused


def test_every_message_round_trips() -> None:
    submit = wire.Submit(7, 123.5, 0.025, (1, 2, 3), bytes(range(6)))
    result = wire.Result(7, 3, 8, 1.0, 0.002, 0.004, 1.006, 0.0035, struct.pack("<3f", 0.1, 0.2, 0.7))
    staged = wire.Result(8, 1, 2, 1.0, 0.002, 0.004, 1.006, 0.0035, struct.pack("<3f", 0.5, 0.2, 0.3), 0, True)
    refusal = wire.Refusal(9, Refused.OVERLOADED, 2, "server overloaded: 256 requests queued; retry after 2 s")
    answered = wire.Answered(3, True, 0.0125, 0.002, 0.0004)
    load = wire.Load(17, 0, 0.0009)
    stream = b"".join(
        [submit.encode(), result.encode(), refusal.encode(), answered.encode(), load.encode(), wire.cancel(7)]
    )
    gated = wire.Result(9, 0, 1, 1.0, 0.002, 0.004, 1.006, 0.0035, struct.pack("<3f", 0.5, 0.2, 0.3), -1, False, 7, 0.5)
    assert wire.Result.decode(wire.FrameReader().feed(staged.encode())[0][1]) == staged
    assert wire.Result.decode(wire.FrameReader().feed(gated.encode())[0][1]) == gated  # 0.5: exact in float32
    frames = wire.FrameReader().feed(stream)
    assert [kind for kind, _ in frames] == [
        wire.SUBMIT,
        wire.RESULT,
        wire.REJECTED,
        wire.ANSWERED,
        wire.LOAD,
        wire.CANCEL,
    ]
    assert wire.Submit.decode(frames[0][1]) == submit
    assert wire.Result.decode(frames[1][1]) == result
    assert wire.Refusal.decode(frames[2][1]) == refusal
    assert wire.Answered.decode(frames[3][1]) == answered
    assert wire.Load.decode(frames[4][1]) == load
    assert wire.decode_id(frames[5][1], "CANCEL") == (7, b"")


def test_frames_split_at_every_byte_boundary_reassemble_in_order() -> None:
    messages = [wire.Submit(i, float(i), 0.01, (1, 2, 2), bytes([i] * 4)).encode() for i in range(5)]
    stream = b"".join(messages)
    reader = wire.FrameReader()
    frames = [frame for byte in range(len(stream)) for frame in reader.feed(stream[byte : byte + 1])]
    assert [wire.Submit.decode(payload).request for _, payload in frames] == [0, 1, 2, 3, 4]


def test_query_reply_and_state_carry_their_payloads() -> None:
    reader = wire.FrameReader()
    (query,) = reader.feed(wire.query(42, wire.METRICS))
    assert wire.decode_query(query[1]) == (42, wire.METRICS)
    (reply,) = reader.feed(wire.reply(42, b"slimserve_ready 1\n"))
    assert wire.decode_id(reply[1], "REPLY") == (42, b"slimserve_ready 1\n")
    (state,) = reader.feed(wire.state("failed", error="cannot serve x: missing"))
    assert wire.decode_state(state[1]) == {"phase": "failed", "error": "cannot serve x: missing"}


@pytest.mark.parametrize(
    ("payload", "decode", "message"),
    [
        (b"\x00" * 5, wire.Submit.decode, "shorter than its"),
        (wire.Submit.LAYOUT.pack(1, 0.0, 0.1, 1, 28, 28) + b"\x00" * 10, wire.Submit.decode, "carries 10 bytes"),
        (
            wire.Result.LAYOUT.pack(1, 0, 1, 0, 0, 0, 0, 0, -1, 0, -1, -1.0) + b"\x00" * 6,
            wire.Result.decode,
            "not float32s",
        ),
        (b"not json", wire.decode_state, "not JSON"),
        (b'{"error": "x"}', wire.decode_state, "no phase"),
    ],
)
def test_malformed_payloads_are_protocol_errors_that_say_what_is_wrong(payload, decode, message) -> None:
    with pytest.raises(wire.ProtocolError, match=message):
        decode(payload)


def test_a_frame_claiming_more_than_the_limit_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.FrameReader().feed(wire.HEADER.pack(wire.MAX_FRAME_BYTES + 1, wire.SUBMIT))


def test_a_refusal_keeps_its_reason_across_the_process_boundary() -> None:
    for reason in Refused:
        frame = wire.Refusal(1, reason, 0, reason.name.lower()).encode()
        decoded = wire.Refusal.decode(wire.FrameReader().feed(frame)[0][1])
        assert Refused(decoded.reason) is reason and decoded.message == reason.name.lower()
