"""Seeded property tests: arbitrary bytes never raise anything but the documented errors.

Set CLUSTERSYNC_FUZZ_SEED to replay a run; a failure prints the seed.
"""

from __future__ import annotations

import json
import os
import random
import socket
from typing import Any, Iterator, List

import pytest

from clustersync import Address, Message
from clustersync.codec import Codec
from clustersync.relay.link import WorkerLink
from clustersync.relay.loop import Loop
from clustersync.relay.router import Peer, Router
from clustersync.relay.wire import (
    DATA,
    ProtocolError,
    check_records,
    pack_frame,
    pack_run,
    parse_records,
    parse_tagged,
)
from clustersync.sync import decode_envelope, encode_envelope

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
    good = encode_envelope(Address(0, "h"), Message("n", "t", b"data", Address(0, "h")))
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
        assert result is None or (isinstance(result[0], Address) and isinstance(result[1], Message)), _seed()


def test_envelope_round_trip(rng: random.Random) -> None:
    for _ in range(CASES // 3):
        data = rng.randbytes(rng.randrange(50)) if rng.random() < 0.5 else str(random_value(rng, 3))
        msg = Message(str(rng.random()), str(rng.randrange(99)), data, Address(rng.randrange(-1, 9), "hub"))
        assert decode_envelope(encode_envelope(msg.origin, msg)) == (msg.origin, msg, None), _seed()


def _mutated(rng: random.Random, valid: bytes) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(60))
    body = bytearray(valid)
    for _ in range(rng.randrange(1, 4)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return bytes(body[: rng.randrange(len(body) + 1)])


VALID = pack_run(b"o", b"ns", b"t", [b"data", b"more"]) + pack_run(b"p", b"", b"u", [b"x"], to=b"h")
#: One message alone in its frame: parse_tagged's fast path.
VALID_ONE = pack_run(b"o", b"ns", b"t", [b"data"])


def test_both_record_parsers_raise_only_protocol_error_and_agree(rng: random.Random) -> None:
    """The primary's check and the worker's parsers accept exactly the same bodies, and raise nothing else."""
    for case in range(CASES):
        body = _mutated(rng, VALID if case % 2 else VALID_ONE)
        try:
            runs = parse_records(body)
        except ProtocolError:
            runs = None
        try:
            tagged = parse_tagged(body)
        except ProtocolError:
            tagged = None
        assert (tagged is None) == (runs is None), f"{body!r} {_seed()}"  # the two worker parsers agree
        if runs is not None:  # and they read the same messages
            split = [(o, t, n, tp, bytes(d[0] if d else 0 for d in datas), [d[1:] for d in datas])
                     for o, t, n, tp, datas in runs]
            assert tagged == split, f"{body!r} {_seed()}"
        count = sum(len(run[4]) for run in runs) if runs is not None else 3
        try:
            check_records(body, 0, len(body), count)
            checked = True
        except ProtocolError:
            checked = False
        assert checked == (runs is not None and count > 0), f"{body!r} {_seed()}"


def test_record_round_trip(rng: random.Random) -> None:
    def name(n: int) -> bytes:
        return "".join(rng.choice("abcé") for _ in range(n)).encode()

    for _ in range(CASES // 10):
        expected = []
        body = b""
        for _ in range(rng.randrange(1, 6)):
            origin, ns, topic, to = name(3), name(rng.randrange(3)), name(2), name(rng.randrange(2))
            datas = [rng.randbytes(rng.randrange(20)) for _ in range(rng.randrange(1, 6))]
            body += pack_run(origin, ns, topic, datas, to=to)
            expected.append((origin.decode(), to.decode(), ns.decode(), topic.decode(), datas))
        check_records(body, 0, len(body), sum(len(e[4]) for e in expected))
        assert parse_records(body) == expected, _seed()
        split = [(o, t, n, tp, bytes(d[0] if d else 0 for d in datas), [d[1:] for d in datas])
                 for o, t, n, tp, datas in expected]
        assert parse_tagged(body) == split, _seed()


def test_worker_frame_handler_drops_what_does_not_parse(rng: random.Random) -> None:
    """The worker's reader hands every DATA frame to ``WorkerLink._frame``: it raises only ProtocolError."""
    ours, theirs = socket.socketpair()
    try:
        link = WorkerLink(ours, 1, max_message=1 << 20, out_limit=1 << 20, publish_block=0.1)
        got: List[Any] = []
        tagged: List[Any] = []
        # A hub taking plain runs and one taking tagged runs: the frame goes through both parsers.
        link.add_member(b"c", b"h", lambda ns, t, o, datas: got.append(len(datas)), None)
        link.add_member(b"c", b"k", lambda ns, t, o, tags, values: tagged.append((tags, values)), None, True)
        for _ in range(CASES):
            try:
                link._frame(DATA, b"c", 0, 0xFFFF, 1, _mutated(rng, VALID))
            except ProtocolError:
                pass
        link._frame(DATA, b"c", 0, 0xFFFF, 3, VALID)
        assert got[-2:] == [2, 1]
        assert tagged[-1] == (b"dm", [b"ata", b"ore"])  # the second run is for hub "h" alone
    finally:
        ours.close()
        theirs.close()


def test_router_survives_random_bytes(rng: random.Random) -> None:
    """Random and mutated frames: the router relays valid ones and cuts the sender off at the first bad one."""
    loop = Loop()
    broken: List[str] = []
    router = Router(loop, max_buffer=1 << 20, max_message=1 << 16,
                    on_control=lambda *a: None, on_broken=lambda p, why: broken.append(why))
    try:
        valid = pack_frame(DATA, b"chan!", 0, body=pack_run(b"o", b"x", b"t", [b"data"]), count=1)
        for case in range(300):
            ours, theirs = socket.socketpair()
            peer = Peer(0, ours)
            router.add(peer)
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
                if not peer.connected:
                    break
                router.read(peer)  # must never raise
            assert not peer.connected, f"case {case} {_seed()}"
    finally:
        loop.close()
