"""Format v1 codec: ids, blobs, manifests, marker (pure functions, no store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash

from loopstore import ondisk
from loopstore.errors import CorruptSession, InvalidSessionId, UnsupportedFormat

P = Path("/x/manifest.json")


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "a/b", "/abs", "a\\b", "nul\x00l", "x" * 201, "é" * 101, "\udcff"],
)
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSessionId) as exc:
        ondisk.validate_session_id(bad)
    assert isinstance(exc.value, ValueError)


def test_non_str_id_is_refused() -> None:
    with pytest.raises(InvalidSessionId):
        ondisk.validate_session_id(42)


@pytest.mark.parametrize(
    "good", ["a", "...", ".hidden", "a.b.c", "with space", "ünïcødé-会话", "x" * 200, "é" * 100]
)
def test_valid_ids(good: str) -> None:
    assert ondisk.validate_session_id(good) == good


def test_layout_builds_every_path_under_root() -> None:
    lay = ondisk.Layout(Path("/r"))
    assert lay.marker == Path("/r/loopstore.json")
    assert lay.manifest("s") == Path("/r/sessions/s/manifest.json")
    assert lay.blob("s", "ab" * 16) == Path("/r/sessions/s/loops/" + "ab" * 16 + ".zst")
    assert lay.lock("s") == Path("/r/locks/s.lock")
    with pytest.raises(InvalidSessionId):
        lay.session_dir("..")


def test_blob_round_trip_and_name_is_hash_of_raw() -> None:
    raw = json.dumps({"loop_id": "l", "text": "x" * 5000}).encode()
    blob = ondisk.encode_blob(raw)
    assert blob.digest == xxhash.xxh3_128_hexdigest(raw)
    assert blob.stored_size < len(raw)
    assert ondisk.blob_frame_size(blob.data) == len(raw)
    out = ondisk.decode_blob(blob.data, blob.digest, session_id="s", path=P)
    assert out == raw


def test_blob_damage_is_detected_and_names_the_file() -> None:
    raw = b'{"a": "' + b"y" * 3000 + b'"}'
    blob = ondisk.encode_blob(raw)
    other = ondisk.encode_blob(b'{"a": 1}')
    with pytest.raises(CorruptSession) as exc:
        ondisk.decode_blob(other.data, blob.digest, session_id="s", path=P)
    assert exc.value.kind == "hash_mismatch"  # type: ignore[attr-defined]
    assert exc.value.path == P
    with pytest.raises(CorruptSession) as exc:
        ondisk.decode_blob(blob.data[: len(blob.data) // 2], blob.digest, session_id="s", path=P)
    assert exc.value.kind == "undecodable"  # type: ignore[attr-defined]
    with pytest.raises(CorruptSession):
        ondisk.decode_blob(b"not zstd at all", blob.digest, session_id="s", path=P)
    with pytest.raises(CorruptSession):
        ondisk.decode_blob(blob.data, blob.digest, session_id="s", path=P, expected_raw_size=1)


def _entries(n: int) -> tuple[ondisk.LoopEntry, ...]:
    return tuple(
        ondisk.LoopEntry(f"l{i}", f"{i:032x}", 100 + i, 10 + i, "Completed", "t", None, None)
        for i in range(n)
    )


def test_manifest_round_trip() -> None:
    header = {"session_id": "s", "agent_id": "a", "last_active_at": "2025-01-01T00:00:00Z"}
    data, m = ondisk.encode_manifest("s", 7, 123, header, _entries(3))
    json.loads(data)  # still plain JSON for humans and tools
    back = ondisk.decode_manifest(data, session_id="s", path=P)
    assert back.generation == 7 and back.committed_at_ns == 123
    assert back.loops == m.loops and dict(back.header) == header
    assert back.checksum == m.checksum


def test_manifest_bit_rot_is_detected() -> None:
    data, _ = ondisk.encode_manifest("s", 1, 1, {"session_id": "s"}, _entries(2))
    for pos in (5, len(data) // 2, len(data) - 10):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptSession):
            ondisk.decode_manifest(bytes(damaged), session_id="s", path=P)
    with pytest.raises(CorruptSession):
        ondisk.decode_manifest(data[:-20], session_id="s", path=P)
    with pytest.raises(CorruptSession):
        ondisk.decode_manifest(b"", session_id="s", path=P)


def test_manifest_of_another_session_is_refused() -> None:
    data, _ = ondisk.encode_manifest("s", 1, 1, {"session_id": "s"}, ())
    with pytest.raises(CorruptSession):
        ondisk.decode_manifest(data, session_id="t", path=P)


def test_marker_versions() -> None:
    ondisk.check_marker(ondisk.marker_bytes(), P)
    newer = json.loads(ondisk.marker_bytes())
    newer["version"] = ondisk.FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormat, match="newer"):
        ondisk.check_marker(json.dumps(newer).encode(), P)
    with pytest.raises(UnsupportedFormat):
        ondisk.check_marker(b'{"format": "other", "version": 1}', P)
    with pytest.raises(UnsupportedFormat):
        ondisk.check_marker(b"garbage", P)


def test_timestamp_ns_keeps_nanoseconds_and_offsets() -> None:
    a = ondisk.timestamp_ns("2025-06-01T10:15:30.250192131Z")
    b = ondisk.timestamp_ns("2025-06-01T10:15:30.250192132Z")
    assert a is not None and b is not None and b - a == 1
    assert ondisk.timestamp_ns("2025-06-01T12:15:30+02:00") == ondisk.timestamp_ns(
        "2025-06-01T10:15:30Z"
    )
    assert ondisk.timestamp_ns("nonsense") is None


def test_incremental_decode_matches_full_decode() -> None:
    header = {"session_id": "s", "agent_id": "a"}
    base = _entries(5)
    data1, _ = ondisk.encode_manifest("s", 1, 1, header, base)
    prev = ondisk.decode_manifest(data1, session_id="s", path=P)
    known = ondisk.known_lines(prev.loops)
    changed = (
        *base[:2],
        ondisk.LoopEntry("l2", "f" * 32, 1, 1, "Rejected", "t", "u", "l1"),
        *base[3:],
        *_entries(7)[5:],
    )
    for entries in (changed, (), base[:1], base):
        data, _ = ondisk.encode_manifest("s", 2, 2, {**header, "x": 1}, entries)
        full = ondisk.decode_manifest(data, session_id="s", path=P)
        inc = ondisk.decode_manifest(data, session_id="s", path=P, known=known)
        assert inc.loops == full.loops == entries
        assert dict(inc.header) == dict(full.header) and inc.generation == 2
        for e in inc.loops:
            assert json.loads(e.encoded)["loop_id"] == e.loop_id
    empty, _ = ondisk.encode_manifest("s", 3, 3, header, ())
    assert ondisk.decode_manifest(empty, session_id="s", path=P, known=known).loops == ()
