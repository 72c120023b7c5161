"""encode_envelope / decode_envelope."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clustersync import Message
from clustersync.sync import decode_envelope, encode_envelope


def test_round_trip_bytes_and_str() -> None:
    for data in (b"\x00\x01\xffbin", "text é"):
        raw = encode_envelope("hub-1", Message("ns", "topic", data, "hub-1"))
        assert isinstance(raw, str)
        assert decode_envelope(raw) == ("hub-1", Message("ns", "topic", data, "hub-1"))
        assert decode_envelope(raw.encode()) == ("hub-1", Message("ns", "topic", data, "hub-1"))


def test_well_formed_envelope_written_by_hand() -> None:
    raw = json.dumps({"v": 1, "id": "a", "ns": "", "topic": "t", "b64": "aGk="})
    assert decode_envelope(raw) == ("a", Message("", "t", b"hi", "a"))


GOOD = {"v": 1, "id": "a", "ns": "", "topic": "t", "b64": "aGk="}


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
        json.dumps({k: v for k, v in GOOD.items() if k != "topic"}),
        json.dumps({k: v for k, v in GOOD.items() if k != "b64"}),
        json.dumps({**GOOD, "id": 5}),
        json.dumps({**GOOD, "id": ""}),
        json.dumps({**GOOD, "ns": None}),
        json.dumps({**GOOD, "topic": ["t"]}),
        json.dumps({**GOOD, "b64": 5}),
        json.dumps({**GOOD, "b64": "not base64!"}),
        json.dumps({**GOOD, "b64": "aGk"}),
        json.dumps({**GOOD, "text": "both"}),
        json.dumps({**GOOD, "v": 2}),
        json.dumps({k: v for k, v in GOOD.items() if k != "b64"} | {"text": 5}),
        "[" * 100000,
    ],
)
def test_malformed_input_gives_none(raw: Any) -> None:
    assert decode_envelope(raw) is None


def test_encode_rejects_other_data() -> None:
    with pytest.raises(TypeError):
        encode_envelope("a", Message("", "t", {"x": 1}, "a"))
