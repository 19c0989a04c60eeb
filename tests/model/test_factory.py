"""Model specs resolve through the backend registry: the built-ins, a plug-in, and the
simulated fixture loaded by its dotted path (never imported by `megaflow.model`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.model.backend import ModelBackend
from megaflow.model.factory import MODEL_BACKENDS, BackendOptions, backend_from_spec, spec_of
from megaflow.model.latency import LatencyConfig
from megaflow.model.openai import OpenAIBackend
from megaflow.testing.simulated_model import SimulatedBackend


def test_simulated_is_built_with_the_options() -> None:
    backend = backend_from_spec(
        "simulated",
        success_rate=0.25,
        seed=7,
        latency=LatencyConfig(slots=3),
        name="sim",
        version="v2",
    )
    assert isinstance(backend, SimulatedBackend)
    assert (backend.name, backend.version) == ("sim", "v2")
    assert (backend.policy.success_rate, backend.policy.seed) == (0.25, 7)
    assert backend.latency.config.slots == 3
    assert spec_of(backend) == "simulated"


def test_openai_specs_round_trip() -> None:
    backend = backend_from_spec("openai:http://127.0.0.1:9/v1#m", request_timeout_s=5.0)
    assert isinstance(backend, OpenAIBackend)
    assert spec_of(backend) == "openai:http://127.0.0.1:9/v1#m"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown model spec ''"),
        ("gpt", "unknown model spec 'gpt': use 'simulated', 'openai:URL' or 'transformers:PATH'"),
        ("openai:localhost:8000", "expected openai:http"),
        ("transformers:", "expected transformers:/path/to/model"),
    ],
)
def test_bad_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        backend_from_spec(spec)


def test_a_registered_builder_gets_the_spec_and_the_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, BackendOptions]] = []

    def build(spec: str, options: BackendOptions) -> ModelBackend:
        seen.append((spec, options))
        return SimulatedBackend.fast(name=options.name or "echo")

    monkeypatch.setitem(MODEL_BACKENDS._builtin, "echo", lambda: build)
    try:
        backend = backend_from_spec("echo:anything", name="e", seed=3)
    finally:
        MODEL_BACKENDS._loaded.pop("echo", None)
    assert backend.name == "e"
    assert seen == [("echo:anything", BackendOptions(name="e", seed=3))]


def test_the_model_role_does_not_import_the_fixtures() -> None:
    code = (
        "import sys, megaflow.model.factory, megaflow.model.service; "
        "print([m for m in sys.modules if m.startswith(('megaflow.testing', 'megaflow.tasks',"
        " 'megaflow.agent'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
