"""Plug-in registries: scaffolds, sandbox backends and task sources find their
implementations the same way.

A name resolves, in order, to

1. a built-in (registered in code by MegaFlow itself, `Registry.add`),
2. a Python entry point of the registry's group (e.g. ``megaflow.scaffolds``), declared
   by any installed distribution::

       [project.entry-points."megaflow.scaffolds"]
       my-agent = "my_package.agent:MyAgent"

3. a dotted path ``package.module:Attribute`` (no installation needed).

Each plug-in carries a pydantic config class; `Registry.config` validates a settings
mapping or JSON text against it (the union keyed on ``type``: the type picks the class,
the class's config validates the rest). Unknown names, broken entry points and bad
settings are `InvalidRequestError`s that say which.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from megaflow.core.errors import InvalidRequestError

log = logging.getLogger(__name__)

T = TypeVar("T")


def load_dotted(path: str) -> Any:
    """The object at ``package.module:Attribute`` (or ``package.module.Attribute``)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise InvalidRequestError(f"{path!r} is not a dotted path 'package.module:Attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidRequestError(f"cannot import {module_name!r} (from {path!r}): {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidRequestError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


class Registry(Generic[T]):
    """Named plug-ins of one kind (``what``), from code, entry points and dotted paths."""

    def __init__(
        self, group: str, what: str, *, check: Callable[[Any], bool] | None = None
    ) -> None:
        self.group = group
        self.what = what
        self._check = check
        self._builtin: dict[str, Callable[[], T]] = {}
        self._loaded: dict[str, T] = {}

    def add(self, name: str, loader: Callable[[], T]) -> None:
        """Register a built-in; ``loader`` imports it on first use (keeps imports light)."""
        self._builtin[name] = loader
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        """Every name known without a dotted path: built-ins and entry points."""
        found = set(self._builtin)
        found.update(ep.name for ep in entry_points(group=self.group))
        return sorted(found)

    def get(self, name: str) -> T:
        """The plug-in called ``name``; InvalidRequestError says why there is none."""
        if not name:
            raise InvalidRequestError(f"empty {self.what} name")
        if name in self._loaded:
            return self._loaded[name]
        obj: Any
        if name in self._builtin:
            obj = self._builtin[name]()
        else:
            matches = [ep for ep in entry_points(group=self.group) if ep.name == name]
            if matches:
                if len(matches) > 1:
                    log.warning(
                        "%s %r is declared by %d entry points; using %s",
                        self.what,
                        name,
                        len(matches),
                        matches[0].value,
                    )
                try:
                    obj = matches[0].load()
                except Exception as exc:
                    raise InvalidRequestError(
                        f"{self.what} {name!r} (entry point {matches[0].value!r} of "
                        f"{self.group!r}) cannot be loaded: {exc}"
                    ) from exc
            elif ":" in name:
                obj = load_dotted(name)
            else:
                known = ", ".join(self.names()) or "none"
                raise InvalidRequestError(
                    f"unknown {self.what} {name!r}; known: {known} (or a dotted path "
                    f"'package.module:Class', or an entry point in group {self.group!r})"
                )
        if self._check is not None and not self._check(obj):
            raise InvalidRequestError(f"{name!r} is not a {self.what}: {obj!r}")
        self._loaded[name] = obj
        return obj  # type: ignore[no-any-return]


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_config(
    config_class: type[ConfigT], settings: str | Mapping[str, Any] | None, what: str
) -> ConfigT:
    """``settings`` (a JSON object text, a mapping, or None/"" for the defaults) validated
    by ``config_class``; InvalidRequestError names each bad field."""
    data: Any
    if settings is None or settings == "":
        data = {}
    elif isinstance(settings, str):
        try:
            data = json.loads(settings)
        except ValueError as exc:
            raise InvalidRequestError(f"{what} config is not valid JSON: {exc}") from None
    else:
        data = dict(settings)
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{what} config must be a JSON object, not {type(data).__name__}")
    data.pop("type", None)  # the key of the union: it picked the class
    try:
        return config_class.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequestError(f"bad {what} config: {problems}") from None
