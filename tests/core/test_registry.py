"""The plug-in registry: built-ins, dotted paths, clear errors for unknown names and bad
configs (entry points are exercised by tests/plugins, which installs a package)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from megaflow.core.errors import InvalidRequestError
from megaflow.core.registry import Registry, load_dotted, parse_config


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = 3


def test_a_builtin_loads_once_and_is_listed() -> None:
    calls = []

    def loader() -> str:
        calls.append(1)
        return "thing"

    registry: Registry[str] = Registry("megaflow.test-nothing", "widget")
    registry.add("w", loader)
    assert registry.get("w") == "thing"
    assert registry.get("w") == "thing"
    assert calls == [1]
    assert registry.names() == ["w"]


def test_a_dotted_path_resolves() -> None:
    registry: Registry[object] = Registry("megaflow.test-nothing", "widget")
    assert registry.get("json:dumps") is load_dotted("json.dumps")


def test_unknown_names_say_what_is_known() -> None:
    registry: Registry[str] = Registry("megaflow.test-nothing", "widget")
    registry.add("w", lambda: "x")
    with pytest.raises(InvalidRequestError, match="unknown widget 'nope'; known: w"):
        registry.get("nope")
    with pytest.raises(InvalidRequestError, match="cannot import"):
        registry.get("no_such_module_xyz:Thing")
    with pytest.raises(InvalidRequestError, match="has no attribute"):
        registry.get("json:no_such_thing")


def test_the_check_refuses_what_is_not_a_plugin() -> None:
    registry: Registry[object] = Registry("megaflow.test-nothing", "widget", check=callable)
    with pytest.raises(InvalidRequestError, match="is not a widget"):
        registry.get("json:__name__")


def test_configs_validate_with_field_names() -> None:
    assert parse_config(_Config, None, "w").steps == 3
    assert parse_config(_Config, '{"type": "w", "steps": 5}', "w").steps == 5
    assert parse_config(_Config, {"steps": 7}, "w").steps == 7
    with pytest.raises(InvalidRequestError, match="steps: Input should be a valid integer"):
        parse_config(_Config, '{"steps": "many"}', "w")
    with pytest.raises(InvalidRequestError, match="bogus: Extra inputs are not permitted"):
        parse_config(_Config, '{"bogus": 1}', "w")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_config(_Config, "{", "w")
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        parse_config(_Config, "[1]", "w")
