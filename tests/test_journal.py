"""journal: telling an interrupted write (a frame cut short) from damage."""

from __future__ import annotations

from loopstore import journal


def test_a_frame_cut_short_is_partial_and_damage_is_not() -> None:
    frame = journal.encode_frame(journal.KIND_RECORD, {"seq": 2, "ops": []}, b"payload")
    for n in range(len(frame)):
        assert journal.is_partial_frame(frame[:n]), n  # nothing at all counts too
    assert not journal.is_partial_frame(frame)
    flipped = frame[:-1] + bytes([frame[-1] ^ 1])
    assert not journal.is_partial_frame(flipped)  # whole length, bad checksum: damage
    assert not journal.is_partial_frame(b"XXXX" + frame[4:20])  # not our magic
    assert not journal.is_partial_frame(b"junk")
    frames, end = journal.scan(frame[:-1])
    assert frames == [] and end == 0  # what a filesystem journal calls a torn tail
