"""Loops read and decoded on first access: `store.load(session_id, lazy=True)`.

Decoding a loop into models costs about as much as all the rest of a load together. A
program that reads a session's header and a loop or two pays for those only: `loops`
is a list whose items are fetched (from the snapshot the load read) when first touched.
Anything that needs them all (iteration to the end, comparison, a dump, a copy, any
change to the list) fetches the rest first, so it behaves as the plain list it is.

The snapshot is the durable state the load read; blobs are immutable, so a later fetch
returns exactly what an eager load would have. One limit: a loop that was replaced
since, and whose blob gc then removed (older than its grace period, 15 min by default),
can no longer be fetched (CorruptSession at the access).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, SupportsIndex, overload

if TYPE_CHECKING:
    from loopstore.models import LoopRecord

_PENDING = object()
"""Placeholder of a loop not fetched yet (never visible outside this class)."""


def _eager(name: str) -> Callable[..., Any]:
    """A list method that needs every loop: fetch the rest, then do what list does."""
    base = getattr(list, name)

    def method(self: LazyLoops, *args: Any, **kwargs: Any) -> Any:
        self.materialize()
        return base(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


class LazyLoops(list["LoopRecord"]):
    """A `list[LoopRecord]` that fetches each loop the first time it is read."""

    def __init__(self, count: int, fetch: Callable[[int], LoopRecord]) -> None:
        super().__init__([_PENDING] * count)  # type: ignore[list-item]
        self._fetch = fetch
        self._left = count

    def _get(self, i: int) -> LoopRecord:
        item: Any = list.__getitem__(self, i)
        if item is _PENDING:
            item = self._fetch(i)
            list.__setitem__(self, i, item)
            self._left -= 1
        return item  # type: ignore[no-any-return]

    def materialize(self) -> None:
        """Fetch every loop not fetched yet (then this is a plain list in all but name)."""
        if self._left:
            for i in range(len(self)):
                self._get(i)

    @property
    def fetched(self) -> int:
        """How many loops have been fetched so far."""
        return len(self) - self._left

    @overload
    def __getitem__(self, index: SupportsIndex) -> LoopRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[LoopRecord]: ...

    def __getitem__(self, index: SupportsIndex | slice) -> LoopRecord | list[LoopRecord]:
        n = len(self)
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(n))]
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("list index out of range")
        return self._get(i)

    def __iter__(self) -> Iterator[LoopRecord]:
        i = 0
        while i < len(self):
            yield self._get(i)
            i += 1

    def __reversed__(self) -> Iterator[LoopRecord]:
        for i in range(len(self) - 1, -1, -1):
            yield self._get(i)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        self.materialize()
        return (list, (list(list.__iter__(self)),))

    def __copy__(self) -> list[LoopRecord]:
        self.materialize()
        return list(list.__iter__(self))

    def extend(self, values: Iterable[LoopRecord]) -> None:
        self.materialize()
        list.extend(self, values)

    __contains__ = _eager("__contains__")
    __eq__ = _eager("__eq__")
    __ne__ = _eager("__ne__")
    __lt__ = _eager("__lt__")
    __le__ = _eager("__le__")
    __gt__ = _eager("__gt__")
    __ge__ = _eager("__ge__")
    __repr__ = _eager("__repr__")
    __add__ = _eager("__add__")
    __mul__ = _eager("__mul__")
    __rmul__ = _eager("__rmul__")
    __iadd__ = _eager("__iadd__")
    __imul__ = _eager("__imul__")
    __setitem__ = _eager("__setitem__")
    __delitem__ = _eager("__delitem__")
    copy = _eager("copy")
    index = _eager("index")
    count = _eager("count")
    append = _eager("append")
    insert = _eager("insert")
    pop = _eager("pop")
    remove = _eager("remove")
    sort = _eager("sort")
    reverse = _eager("reverse")
    clear = _eager("clear")
    __hash__ = None
