"""The committed generated code must equal what scripts/gen_proto.py produces now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generated = _load_generator().generate(tmp_path)
    committed = ROOT / "src" / "megaflow" / "v1"
    fresh = {p.name: p.read_bytes() for p in generated if p.is_file()}
    current = {p.name: p.read_bytes() for p in committed.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh.keys() | current.keys() if fresh.get(n) != current.get(n))
    assert not stale, (
        f"src/megaflow/v1 is stale for {stale}: run `{sys.executable} scripts/gen_proto.py`"
    )


def test_every_service_has_the_seed_verbs() -> None:
    from megaflow.v1 import env_pb2

    methods = {m.name for m in env_pb2.DESCRIPTOR.services_by_name["EnvironmentService"].methods}
    assert {"ExecuteStep", "GetObservation", "SubmitAction"} <= methods
