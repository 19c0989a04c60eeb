"""A sandbox backend as a third party writes one: ``tinybox``, bubblewrap sandboxes in
their own folder with small limits that requests cannot raise, and no suspend.

Registered by entry point (``pyproject.toml`` beside this file); MegaFlow's own files
know nothing of it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError
from megaflow.env.config import EnvServiceConfig
from megaflow.env.local import LocalSandbox, reclaim_orphans
from megaflow.env.registry import SandboxSpec
from megaflow.env.sandbox import Capabilities, Sandbox

BUILT: list[tuple[str, int, int]] = []
"""(sandbox id, memory_mib, pids) of every sandbox built in this process."""


class TinyboxConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mib: int = Field(default=256, ge=16, description="Memory cap of every sandbox.")
    pids: int = Field(default=64, ge=8, description="Process cap of every sandbox.")


class TinySandbox(LocalSandbox):
    capabilities: ClassVar[Capabilities] = Capabilities(snapshot=True)  # no suspend


class TinyboxBackend:
    name: ClassVar[str] = "tinybox"
    config_class: ClassVar[type[BaseModel]] = TinyboxConfig
    capabilities: ClassVar[Capabilities] = TinySandbox.capabilities

    def __init__(self, service: EnvServiceConfig, config: TinyboxConfig) -> None:
        self.config = config
        self.root_dir = Path(f"{service.root_dir}-tinybox")

    @classmethod
    def placement(cls, image: str, runtime: str) -> tuple[str, str]:
        if image not in ("", "host") or runtime:
            raise InvalidRequestError("tinybox runs the host's image only, with no runtime")
        return "host", ""

    async def build(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        memory_mib = min(spec.memory_mib, self.config.memory_mib)
        pids = min(spec.pids, self.config.pids)
        BUILT.append((sandbox_id, memory_mib, pids))
        return TinySandbox(
            sandbox_id,
            root_dir=self.root_dir,
            memory_mib=memory_mib,
            pids=pids,
            output_bytes=spec.output_bytes,
        )

    def released(self, sandbox: Sandbox) -> None:
        pass

    async def reclaim(self) -> int:
        return await asyncio.to_thread(reclaim_orphans, self.root_dir)

    async def aclose(self) -> None:
        pass
