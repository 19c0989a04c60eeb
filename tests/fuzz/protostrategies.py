"""Hypothesis strategies that build protobuf messages field by field from their
descriptors: random scalars (bounds, NaN, infinities, unknown enum numbers), strings,
bytes, nested messages, repeated and map fields, oneofs; and raw random bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import symbol_database
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
_INT_BOUNDS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

# (message full name, field name) -> the strategy of that field's value (one element
# of a repeated field), in place of the generic one.
Overrides = Mapping[tuple[str, str], st.SearchStrategy[Any]]


def message_class(descriptor: Descriptor) -> type[Message]:
    return symbol_database.Default().GetSymbol(descriptor.full_name)  # type: ignore[no-any-return]


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_BOUNDS:
        lo, hi = _INT_BOUNDS[kind]
        edges = sorted({lo, hi, 0, 1, min(hi, 2**31 - 1), max(lo, -1)})
        return st.one_of(
            st.sampled_from(edges),
            st.integers(lo, hi),
            st.integers(-5, 100).filter(lambda v: lo <= v <= hi),
        )
    if kind == F.TYPE_DOUBLE:
        return st.one_of(
            st.sampled_from([0.0, -1.0, 1e-9, 1e308, float("nan"), float("inf"), -float("inf")]),
            st.floats(),
        )
    if kind == F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return st.one_of(
            st.text(max_size=24),
            st.sampled_from(
                ["", "host", "simulated", "..", "/", "../../etc/passwd", "\x00", "a" * 300]
            ),
        )
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=48)
    if kind == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"unexpected field type {kind} of {field.full_name}")


def _value(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    custom = overrides.get((field.containing_type.full_name, field.name))
    if custom is not None:
        return custom
    if field.type in (F.TYPE_MESSAGE, F.TYPE_GROUP):
        return messages(field.message_type, depth - 1, overrides)
    return _scalar(field)


def _setter(
    field: FieldDescriptor, depth: int, overrides: Overrides
) -> st.SearchStrategy[Callable[[Message], None]]:
    name = field.name
    if (
        field.is_repeated
        and field.type == F.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    ):
        key_f = field.message_type.fields_by_name["key"]
        val_f = field.message_type.fields_by_name["value"]

        def set_map(items: dict[Any, Any]) -> Callable[[Message], None]:
            def apply(msg: Message) -> None:
                target = getattr(msg, name)
                for k, v in items.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v

            return apply

        return st.dictionaries(
            _value(key_f, depth, overrides), _value(val_f, depth, overrides), max_size=3
        ).map(set_map)
    if field.is_repeated:
        return st.lists(_value(field, depth, overrides), max_size=3).map(
            lambda items: lambda msg: getattr(msg, name).extend(items)
        )
    if field.type == F.TYPE_MESSAGE:
        return _value(field, depth, overrides).map(
            lambda sub: lambda msg: getattr(msg, name).CopyFrom(sub)
        )
    return _value(field, depth, overrides).map(lambda v: lambda msg: setattr(msg, name, v))


def messages(
    descriptor: Descriptor, depth: int = 3, overrides: Overrides | None = None
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type, any subset of its fields set (nested ones down
    to `depth` levels; deeper ones are left empty)."""
    overrides = overrides or {}
    cls = message_class(descriptor)
    if depth <= 0:
        return st.just(cls())
    setters = {f.name: _setter(f, depth, overrides) for f in descriptor.fields}

    def build(chosen: dict[str, Callable[[Message], None]]) -> Message:
        msg = cls()
        for apply in chosen.values():
            apply(msg)
        return msg

    return st.fixed_dictionaries({}, optional=setters).map(build)


def request_bytes(
    descriptor: Descriptor, overrides: Overrides | None = None
) -> st.SearchStrategy[bytes]:
    """A serialized request: a message of the right type (mostly), raw random bytes, a
    message of the right type with random bytes appended, or a truncated one."""
    good = messages(descriptor, overrides=overrides).map(lambda m: m.SerializeToString())
    return st.one_of(
        good,
        good,
        good,
        st.binary(max_size=256),
        st.tuples(good, st.binary(min_size=1, max_size=32)).map(lambda p: p[0] + p[1]),
        good.filter(lambda b: len(b) > 1).flatmap(
            lambda b: st.integers(1, len(b) - 1).map(lambda n: b[:n])
        ),
    )
