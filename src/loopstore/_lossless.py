"""Shared base for models that read and write phi-core JSON without changing a value.

phi-core (serde) decides which keys appear; a port must neither invent nor drop any:

* unknown keys are kept verbatim (``extra="allow"``) and written back;
* ``model_dump``/``model_dump_json`` default to ``exclude_unset=True`` so a key that was
  absent on input stays absent, and a ``null`` that was present stays ``null``;
* models built in Python follow serde's rules instead: every always-serialized field is
  marked as set (so ``None`` is written as ``null``), while fields phi-core skips when
  empty (``skip_serializing_if``) are left out when they hold their empty value.

Validation and serialization stay inside pydantic-core: no Python validators run per
value on the load/dump hot path.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, Strict
from pydantic_core import PydanticSerializationError, SchemaSerializer, core_schema
from typing_extensions import Self

from loopstore._timestamps import format_timestamp

__all__ = [
    "F32",
    "U32",
    "U64",
    "JsonValue",
    "LosslessModel",
    "OpenEnum",
    "StrictBool",
    "StrictFloat",
    "StrictInt",
    "StrictStr",
    "Timestamp",
    "gc_paused",
]

StrictStr = Annotated[str, Strict()]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictFloat = Annotated[float, Strict()]
U64 = Annotated[int, Strict(), Field(ge=0, le=2**64 - 1)]
U32 = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
# Rust f32/f64: serde writes "0.7" or "1.0" but also reads a bare integer; an int read
# stays an int (written back as "1", not "1.0"), a float stays a float.
F32 = Annotated[StrictInt | StrictFloat, Field(union_mode="smart")]
# serde_json::Value: any JSON, kept as plain Python values in their original key order.
JsonValue = Any

_TS_PATTERN = r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?(Z|z|[+-]\d\d:?\d\d)$"


class _TimestampMarker:
    """Marks a field holding chrono ``DateTime<Utc>`` text (nanosecond precision)."""

    def __repr__(self) -> str:
        return "Timestamp"


_TIMESTAMP = _TimestampMarker()

# The exact text phi-core wrote; ``parse_timestamp`` gives the datetime view.
Timestamp = Annotated[str, Strict(), Field(pattern=_TS_PATTERN), _TIMESTAMP]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a large tree of models is built.

    Validation creates hundreds of thousands of container objects and no garbage;
    with the GC running, each generation-2 pass re-walks the growing tree, making
    load time grow quadratically with session size (5x slower at 30 MB). Objects are
    all reachable, so pausing loses nothing; the GC is restored even on error.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict)) and not value)


# --------------------------------------------------------------------------- fast dumps
#
# A model that sorts its keys on dump (`_sorts_keys`) does it with a wrap serializer:
# pydantic-core then calls back into Python for every such object (a loop has hundreds),
# a third of a loop's dump time. Only an object holding unknown keys needs it (declared
# fields are in sorted order already), and those are rare. So `dump_json` first runs a
# serializer built from a copy of the schema without the wrap serializers, in which the
# unknown-key serializer of those models raises a flag instead; a flagged dump is redone
# the exact way. Same bytes either way (tests compare them); if pydantic ever reuses the
# classes' own serializers for the copy, it is merely not faster.

_unsorted = threading.local()
_BUILD_LOCK = threading.Lock()


def _flag_unsorted(value: Any) -> Any:
    _unsorted.seen = True
    return value


def _fast_schema(schema: Any, models: set[type]) -> Any:
    """`schema` with each key-sorting model's wrap serializer replaced by the flag."""
    if isinstance(schema, list):
        return [_fast_schema(v, models) for v in schema]
    if not isinstance(schema, dict):
        return schema
    node = {k: _fast_schema(v, models) for k, v in schema.items()}
    cls = node.get("cls")
    if node.get("type") == "model" and isinstance(cls, type):
        models.add(cls)
        if getattr(cls, "_sorts_keys", False):
            node.pop("serialization", None)
            fields = dict(node["schema"])
            fields["extras_schema"] = core_schema.any_schema(
                serialization=core_schema.plain_serializer_function_ser_schema(_flag_unsorted)
            )
            node["schema"] = fields
    return node


@functools.cache
def _fast_serializer(cls: type[BaseModel]) -> SchemaSerializer | None:
    """The copy's serializer (None: a class whose schema is not built yet, e.g. a
    subclass with `defer_build`; its own serializer is used). pydantic-core reuses a
    complete model class's own serializer for its schema node (which would bring the
    wrap serializers back), so the classes are marked incomplete while it is built,
    once per process."""
    built = cls.__pydantic_core_schema__
    if not isinstance(built, dict):
        return None
    models: set[type] = set()
    schema = _fast_schema(built, models)
    with _BUILD_LOCK:
        saved = {m: m.__dict__.get("__pydantic_complete__", False) for m in models}
        try:
            for m in models:
                type.__setattr__(m, "__pydantic_complete__", False)
            return SchemaSerializer(schema)
        finally:
            for m, complete in saved.items():
                type.__setattr__(m, "__pydantic_complete__", complete)


class LosslessModel(BaseModel):
    """Base of every phi-core model: unknown keys kept, absent keys stay absent.

    Subclasses list in ``_skip_if_empty`` the fields phi-core declares with
    ``skip_serializing_if`` (``Option::is_none``/``Vec::is_empty``); those are left out
    of the dump when a Python caller leaves them empty.
    """

    model_config = ConfigDict(
        extra="allow",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        validate_assignment=False,
        revalidate_instances="never",
        ser_json_inf_nan="null",
    )

    _skip_if_empty: ClassVar[frozenset[str]] = frozenset()
    _timestamp_fields: ClassVar[frozenset[str]] = frozenset()
    #: Dumps its keys sorted (a wrap serializer); see "fast dumps".
    _sorts_keys: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._timestamp_fields = frozenset(
            name
            for name, info in cls.model_fields.items()
            if any(meta is _TIMESTAMP for meta in info.metadata)
        )

    def __init__(self, /, **data: Any) -> None:
        """Build like serde would: every field set, skip-if-empty fields unset when empty.

        Runs only for construction in Python: the marker below tells pydantic this is
        not a custom ``__init__``, so ``model_validate*`` never calls it (lossless path).
        """
        for name in self._timestamp_fields:
            value = data.get(name)
            if isinstance(value, datetime):
                data[name] = format_timestamp(value)
        super().__init__(**data)
        fields_set = self.__pydantic_fields_set__
        skip = self._skip_if_empty
        for name in type(self).model_fields:
            if name in skip:
                if _is_empty(getattr(self, name)):
                    fields_set.discard(name)
                else:
                    fields_set.add(name)
            else:
                fields_set.add(name)
        self._after_init(data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def _after_init(self, data: dict[str, Any]) -> None:
        """Hook for subclasses to adjust ``model_fields_set`` after Python construction."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._timestamp_fields and isinstance(value, datetime):
            value = format_timestamp(value)
        super().__setattr__(name, value)
        if name in self._skip_if_empty and _is_empty(value):
            self.__pydantic_fields_set__.discard(name)

    @classmethod
    def model_validate_json(
        cls,
        json_data: str | bytes | bytearray,
        **kwargs: Any,
    ) -> Self:
        """``BaseModel.model_validate_json`` with the cyclic GC paused (see ``gc_paused``)."""
        with gc_paused():
            return super().model_validate_json(json_data, **kwargs)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """``BaseModel.model_validate`` with the cyclic GC paused (see ``gc_paused``)."""
        with gc_paused():
            return super().model_validate(obj, **kwargs)

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Dump as phi-core would write it (``exclude_unset`` defaults to True)."""
        kwargs.setdefault("exclude_unset", True)
        self._materialize()
        with gc_paused():
            return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        """JSON as phi-core would write it (``exclude_unset`` defaults to True)."""
        if kwargs.keys() <= {"indent", "exclude_unset"}:
            return self.dump_json(indent=kwargs.get("indent")).decode()
        kwargs.setdefault("exclude_unset", True)
        self._materialize()
        return super().model_dump_json(**kwargs)

    def dump_json(self, *, indent: int | None = None) -> bytes:
        """``model_dump_json(indent=indent)`` as bytes, the way stores write it (see
        "fast dumps" above: the same bytes, a third less CPU)."""
        self._materialize()
        fast = _fast_serializer(type(self))
        if fast is not None:
            _unsorted.seen = False
            try:
                data = fast.to_json(self, indent=indent, exclude_unset=True)
                if not _unsorted.seen:
                    return data
            except PydanticSerializationError:
                if not _unsorted.seen:
                    raise
        return self.__pydantic_serializer__.to_json(self, indent=indent, exclude_unset=True)

    def _materialize(self) -> None:
        """Fetch what a lazily loaded field still holds back (the serializer reads the
        list's storage directly, not through its methods): see loopstore.lazy."""
        for value in self.__dict__.values():
            if isinstance(value, list) and hasattr(value, "materialize"):
                value.materialize()

    @property
    def unknown_fields(self) -> dict[str, Any]:
        """Keys phi-core wrote that these models do not know (kept and written back)."""
        return dict(self.__pydantic_extra__ or {})


class OpenEnum(str, Enum):
    """A str enum that keeps values it does not know (phi-core may add variants).

    An unknown value becomes a pseudo-member whose ``value`` is the exact text read,
    so it is written back unchanged; ``is_known`` tells the two apart.
    """

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, str):
            return None
        cache: dict[str, Any] = cls.__dict__.get("_unknown_cache_") or {}
        if not cache:
            type.__setattr__(cls, "_unknown_cache_", cache)
        member = cache.get(value)
        if member is None:
            member = str.__new__(cls, value)
            member._name_ = value
            member._value_ = value
            cache[value] = member
        return member

    def __str__(self) -> str:
        return str(self.value)

    @property
    def is_known(self) -> bool:
        """False for a value phi-core 0.10 does not define (kept verbatim)."""
        return self._name_ in type(self).__members__
