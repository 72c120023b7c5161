"""Seeded property tests: arbitrary bytes never raise anything but the documented errors.

Set CLUSTERSYNC_FUZZ_SEED to replay a run; a failure prints the seed.
"""

from __future__ import annotations

import json
import os
import random
import socket
from typing import Any, Iterator

import pytest

from clustersync import Message
from clustersync.codec import Codec
from clustersync.primary import Primary, WorkerHandle
from clustersync.sync import decode_envelope, encode_envelope
from clustersync.wire import DATA, HEADER, ProtocolError, iter_records, pack_record

SEED = int(os.environ.get("CLUSTERSYNC_FUZZ_SEED", random.SystemRandom().randrange(2**32)))
CASES = 3000


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> Iterator[random.Random]:
    print(f"fuzz seed: CLUSTERSYNC_FUZZ_SEED={SEED}")  # shown with a failure's captured output
    yield random.Random(f"{SEED}-{request.node.name}")


def _seed() -> str:
    return f"(replay with CLUSTERSYNC_FUZZ_SEED={SEED})"


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-(2**63), 2**63)
    if kind == 3:
        return rng.uniform(-1e300, 1e300)
    if kind == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)])) for _ in range(rng.randrange(20)))
    if kind == 5:
        # bytes travel as themselves at the top; nested in a JSON value they are not JSON
        return rng.randbytes(rng.randrange(30)) if depth == 0 else rng.randrange(10)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(random_value(rng, 3)): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_codec_round_trip_is_the_identity(rng: random.Random) -> None:
    codec = Codec()
    for _ in range(CASES):
        value = random_value(rng)
        wire = codec.encode(value)
        out = codec.decode(wire)
        assert out == value and type(out) is type(value), f"{value!r} {_seed()}"


def test_codec_rejects_what_json_cannot_carry() -> None:
    with pytest.raises(TypeError, match="bytes"):
        Codec().encode([b"nested bytes"])
    with pytest.raises(TypeError, match="float"):
        Codec().encode(float("nan"))


def test_codec_decode_of_random_bytes_raises_only_value_error(rng: random.Random) -> None:
    codec = Codec()
    for _ in range(CASES):
        raw = rng.choice([b"s", b"b", b"v", b""]) + rng.randbytes(rng.randrange(40))
        try:
            codec.decode(raw)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            pass


def test_decode_envelope_never_raises(rng: random.Random) -> None:
    good = encode_envelope("h", Message("n", "t", b"data", "h"))
    for _ in range(CASES):
        choice = rng.randrange(4)
        if choice == 0:
            raw: Any = rng.randbytes(rng.randrange(60))
        elif choice == 1:
            raw = good[: rng.randrange(len(good))]
        elif choice == 2:
            pos = rng.randrange(len(good))
            raw = good[:pos] + chr(rng.randrange(32, 127)) + good[pos + 1 :]
        else:
            raw = json.dumps(random_value(rng, 1))
        result = decode_envelope(raw)
        assert result is None or (isinstance(result[0], str) and isinstance(result[1], Message)), _seed()


def test_envelope_round_trip(rng: random.Random) -> None:
    for _ in range(CASES // 3):
        data = rng.randbytes(rng.randrange(50)) if rng.random() < 0.5 else str(random_value(rng, 3))
        msg = Message(str(rng.random()), str(rng.randrange(99)), data, "hub")
        assert decode_envelope(encode_envelope("hub", msg)) == ("hub", msg), _seed()


def test_record_parser_raises_only_protocol_error(rng: random.Random) -> None:
    valid = pack_record(b"o", b"ns", b"t", b"data") + pack_record(b"o", b"ns", b"t", b"more", same=True)
    for _ in range(CASES):
        if rng.random() < 0.5:
            body = rng.randbytes(rng.randrange(40))
        else:
            body = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body[: rng.randrange(len(body) + 1)])
        try:
            for origin, ns, topic, data in iter_records(body):
                assert all(isinstance(x, bytes) for x in (origin, ns, topic, data))
        except ProtocolError:
            pass


def test_record_round_trip(rng: random.Random) -> None:
    for _ in range(CASES // 10):
        records = []
        body = b""
        prev = None
        for _ in range(rng.randrange(1, 10)):
            meta = prev if prev and rng.random() < 0.5 else (rng.randbytes(3), rng.randbytes(rng.randrange(3)), rng.randbytes(2))
            data = rng.randbytes(rng.randrange(20))
            body += pack_record(*meta, data, same=meta is prev)
            records.append((*meta, data))
            prev = meta
        assert list(iter_records(body)) == records, _seed()


class _Process:
    """Stands in for a worker process: the primary may kill it."""

    pid = 0
    exitcode = None
    killed = False
    sentinel = None

    def kill(self) -> None:
        self.killed = True


def test_primary_frame_parser_survives_random_bytes(rng: random.Random) -> None:
    """Random and mutated frames: the primary routes valid ones and drops the connection on the first bad one."""
    primary = Primary(start_method="fork")
    try:
        for case in range(300):
            ours, theirs = socket.socketpair()
            theirs.setblocking(False)
            proc = _Process()
            w = WorkerHandle(0, proc, ours)
            ours.setblocking(False)
            primary._workers[0] = w
            primary._sel.register(ours, 1, ("io", w))
            valid = HEADER.pack(5 + 4 + len(b"oxt") + 4, DATA, 5, 0, 0xFFFF, 1) + b"chan!" + pack_record(b"o", b"x", b"t", b"data")
            if rng.random() < 0.3:
                raw = rng.randbytes(rng.randrange(200))
            else:
                raw = bytearray(valid * rng.randrange(1, 4))
                for _ in range(rng.randrange(1, 3)):
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
                raw = bytes(raw)
            theirs.sendall(raw)
            theirs.close()
            for _ in range(5):
                if not w.connected:
                    break
                primary._read(w)  # must never raise
            assert not w.connected, f"case {case} {_seed()}"
            primary._workers.pop(0, None)
    finally:
        primary.close()
