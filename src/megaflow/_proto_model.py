"""The base of the public pydantic models: frozen, strict about unknown fields, and
converted to and from their protobuf message field by field.

A model declares the message it mirrors (`_message`) and fields named as the
message's. Conversion follows the message's descriptor: scalars and maps copy,
repeated fields become lists, a nested message becomes the nested model (None while
unset, for a singular message field). Fields a model renames or derives override
`to_proto` / `from_proto` around the generic step.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self, get_args, get_origin

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict


class ProtoModel(BaseModel):
    """A pydantic model mirroring one protobuf message (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    _message: ClassVar[type[Message]]
    # Fields a subclass converts itself (skipped by the generic step).
    _custom: ClassVar[frozenset[str]] = frozenset()

    def to_proto(self) -> Any:
        """The protobuf message with this model's values."""
        message = self._message()
        for field in message.DESCRIPTOR.fields:
            if field.name not in type(self).model_fields or field.name in self._custom:
                continue
            value = getattr(self, field.name)
            if value is None:
                continue
            target = getattr(message, field.name)
            if _is_map(field):
                for key, item in value.items():
                    if isinstance(item, ProtoModel):
                        target[key].CopyFrom(item.to_proto())
                    else:
                        target[key] = item
            elif _is_repeated(field):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    target.extend(item.to_proto() for item in value)
                else:
                    target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value.to_proto())
            else:
                setattr(message, field.name, value)
        return message

    @classmethod
    def from_proto(cls, message: Message) -> Self:
        """The model of `message` (which must be a `cls._message`)."""
        if not isinstance(message, cls._message):
            raise TypeError(
                f"{cls.__name__}.from_proto takes a {cls._message.__name__}, "
                f"not {type(message).__name__}"
            )
        return cls.model_validate(cls._values(message))

    @classmethod
    def _values(cls, message: Message) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field in message.DESCRIPTOR.fields:
            info = cls.model_fields.get(field.name)
            if info is None or field.name in cls._custom:
                continue
            value = getattr(message, field.name)
            nested = _model_in(info.annotation)
            if _is_map(field):
                values[field.name] = {
                    k: nested.from_proto(v) if nested else v for k, v in value.items()
                }
            elif _is_repeated(field):
                values[field.name] = [nested.from_proto(v) if nested else v for v in value]
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if nested is not None and message.HasField(field.name):
                    values[field.name] = nested.from_proto(value)
            else:
                values[field.name] = value
        return values


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _is_map(field: Any) -> bool:
    return bool(
        _is_repeated(field)
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _model_in(annotation: Any) -> type[ProtoModel] | None:
    """The ProtoModel class inside an annotation such as `X | None`, `list[X]`,
    `dict[str, X]`; None when there is none."""
    if isinstance(annotation, type) and issubclass(annotation, ProtoModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
