"""encode_envelope / decode_envelope / is_for."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clustersync import Address, Message
from clustersync.sync.envelope import decode_envelope, encode_envelope, is_for

A = Address(1, "hub-1")


def test_round_trip_bytes_and_str() -> None:
    for data in (b"\x00\x01\xffbin", "text é"):
        raw = encode_envelope(A, Message("ns", "topic", data, A))
        assert isinstance(raw, str)
        assert decode_envelope(raw) == (A, Message("ns", "topic", data, A), None)
        assert decode_envelope(raw.encode()) == (A, Message("ns", "topic", data, A), None)


@pytest.mark.parametrize("to", [Address(3, "h"), 3, 0])
def test_round_trip_keeps_the_destination(to: Any) -> None:
    raw = encode_envelope(A, Message("", "t", "x", A), to)
    decoded = decode_envelope(raw)
    assert decoded is not None and decoded[2] == to and type(decoded[2]) is type(to)


def test_is_for() -> None:
    me = Address(3, "h")
    assert is_for(None, me) and is_for(me, me) and is_for(3, me)
    assert not is_for(Address(3, "other"), me) and not is_for(2, me) and not is_for(Address(2, "h"), me)


def test_well_formed_envelope_written_by_hand() -> None:
    raw = json.dumps({"v": 2, "w": 0, "id": "a", "ns": "", "topic": "t", "b64": "aGk="})
    origin = Address(0, "a")
    assert decode_envelope(raw) == (origin, Message("", "t", b"hi", origin), None)


GOOD = {"v": 2, "w": 0, "id": "a", "ns": "", "topic": "t", "b64": "aGk="}


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "null",
        "{}",
        "[]",
        "1",
        "",
        b"\xff\xfe",
        None,
        12,
        json.dumps({k: v for k, v in GOOD.items() if k != "id"}),
        json.dumps({k: v for k, v in GOOD.items() if k != "w"}),
        json.dumps({k: v for k, v in GOOD.items() if k != "topic"}),
        json.dumps({k: v for k, v in GOOD.items() if k != "b64"}),
        json.dumps({**GOOD, "id": 5}),
        json.dumps({**GOOD, "id": ""}),
        json.dumps({**GOOD, "w": "0"}),
        json.dumps({**GOOD, "ns": None}),
        json.dumps({**GOOD, "topic": ["t"]}),
        json.dumps({**GOOD, "b64": 5}),
        json.dumps({**GOOD, "b64": "not base64!"}),
        json.dumps({**GOOD, "b64": "aGk"}),
        json.dumps({**GOOD, "text": "both"}),
        json.dumps({**GOOD, "v": 1}),
        json.dumps({**GOOD, "to": "x"}),
        json.dumps({**GOOD, "to": [1]}),
        json.dumps({k: v for k, v in GOOD.items() if k != "b64"} | {"text": 5}),
        "[" * 100000,
    ],
)
def test_malformed_input_gives_none(raw: Any) -> None:
    assert decode_envelope(raw) is None


def test_encode_rejects_other_data() -> None:
    with pytest.raises(TypeError):
        encode_envelope(A, Message("", "t", {"x": 1}, A))
