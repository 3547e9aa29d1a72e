"""Lazy loads: the header at once, each loop read and decoded when first touched, and a
session that otherwise behaves exactly like an eager load."""

from __future__ import annotations

import copy
import pickle

import pytest

from helpers import StoreFactory, fixture_paths, load_fixture, make_loop, make_session
from loopstore import models
from loopstore.errors import CorruptSession
from loopstore.lazy import LazyLoops
from loopstore.store import SessionStore


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    """On both backends: every test here runs as [fs] and [s3]."""
    return make_store(durable=False)


def _fetched(session: models.Session) -> int:
    assert isinstance(session.loops, LazyLoops)
    return session.loops.fetched


def test_a_lazy_load_reads_one_loop_for_the_header_and_one_loop(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_session("z", 6)
    store.save(s)
    store.checkpoint("z")
    calls: list[int] = []
    real = models.LoopRecord.__pydantic_validator__

    class Counting:
        def validate_json(self, *args: object, **kwargs: object) -> object:
            calls.append(1)
            return real.validate_json(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models.LoopRecord, "__pydantic_validator__", Counting())
    lazy = store.load("z", lazy=True)
    assert (lazy.session_id, lazy.agent_id, len(lazy.loops)) == ("z", s.agent_id, 6)
    assert calls == []  # nothing decoded yet
    assert lazy.loops[-2].model_dump_json() == s.loops[4].model_dump_json()
    assert calls == [1] and _fetched(lazy) == 1
    lazy.loops[4]
    assert calls == [1]


def test_a_lazy_session_is_the_eager_one(store: SessionStore) -> None:
    for path in fixture_paths():
        f = load_fixture(path)
        store.save(f)
        lazy = store.load(f.session_id, lazy=True)
        assert lazy.model_dump_json(indent=2) == path.read_text()  # dump fetches the rest
        assert lazy == store.load(f.session_id)
    s = make_session("e", 4)
    store.save(s)
    for use in (
        lambda x: [lp.loop_id for lp in x.loops],
        lambda x: list(x.loops),
        lambda x: x.loops[1:3],
        lambda x: list(reversed(x.loops)),
        lambda x: x.loops[-1].loop_id,
        lambda x: x.loops == s.loops,
        lambda x: s.loops[2] in x.loops,
        lambda x: x.total_usage(),
        lambda x: x.root_loops(),
        lambda x: copy.deepcopy(x).loops,
        lambda x: pickle.loads(pickle.dumps(x.loops)),
        lambda x: x.model_dump(mode="json")["loops"],
        lambda x: x.model_copy(deep=True).model_dump_json(),
    ):
        assert use(store.load("e", lazy=True)) == use(s)
    changed = store.load("e", lazy=True)
    changed.loops.append(make_loop("e", 4))
    changed.loops.pop(0)
    store.save(changed)
    assert [lp.loop_id for lp in store.load("e").loops] == [
        lp.loop_id for lp in [*s.loops[1:], make_loop("e", 4)]
    ]


def test_a_lazy_session_reads_its_snapshot_after_later_commits_and_folds(
    store: SessionStore,
) -> None:
    s = make_session("f", 3)
    store.save(s)  # blobs in the journal
    lazy = store.load("f", lazy=True)
    store.append_loop("f", make_loop("f", 3))
    store.append_loop("f", make_loop("f", 0, text_bytes=999))  # replaces loop 0
    store.checkpoint("f")  # the journal that held the blobs is gone; files now
    assert [lp.loop_id for lp in lazy.loops] == [lp.loop_id for lp in s.loops]
    assert lazy.loops[0].model_dump_json() == s.loops[0].model_dump_json()  # the old one


def test_a_lazy_loop_collected_since_the_load_is_reported(store: SessionStore) -> None:
    s = make_session("g", 2)
    store.save(s)
    store.checkpoint("g")
    lazy = store.load("g", lazy=True)
    store.append_loop("g", make_loop("g", 0, text_bytes=777))  # replaces loop 0
    store.checkpoint("g")
    store.gc(grace=0)  # its old blob is collected
    assert lazy.loops[1].loop_id == s.loops[1].loop_id
    with pytest.raises(CorruptSession, match="is gone"):
        lazy.loops[0]
