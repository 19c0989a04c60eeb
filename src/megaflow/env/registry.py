"""Sandbox backends as plug-ins: one protocol, one registry.

A backend is a class satisfying `SandboxBackend`, found by name in `BACKENDS`
(`megaflow.core.registry.Registry`, entry-point group ``megaflow.backends``). A
third-party backend is one package declaring::

    [project.entry-points."megaflow.backends"]
    my-vm = "my_package.backend:VmBackend"

after which ``placement.backend = "my-vm"`` (or ``megaflow run --env my-vm``) uses it;
a dotted path (``my_package.backend:VmBackend``) works without installing anything.
MegaFlow's own ``local`` (bubblewrap) and ``docker`` register the same way, by the
same kind of reference, below.

The Environment Service (through `megaflow.env.backends.SandboxFactory`) makes one
instance of each backend it uses, with the service's settings and the backend's own
config (`EnvServiceConfig.backends[name]`, validated by its ``config_class``); it
reclaims what a dead earlier process left (`SandboxBackend.reclaim`) before its
first sandbox, and closes it at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

from megaflow.core.registry import Registry, load_dotted
from megaflow.env.sandbox import Capabilities, Sandbox

if TYPE_CHECKING:
    from megaflow.env.config import EnvServiceConfig


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox is made of; equal specs are interchangeable (one pool per spec)."""

    backend: str
    image: str
    runtime: str
    memory_mib: int
    pids: int
    output_bytes: int
    cpu_shares: int
    disk_mib: int


class SandboxBackend(Protocol):
    """Makes the sandboxes of one isolation mechanism for one Environment Service.

    Construction is cheap and may refuse (InvalidRequestError) when the service cannot
    offer this backend (e.g. ``docker`` without a Docker endpoint)."""

    name: ClassVar[str]
    """The backend's own name (messages); the registry's key picks it."""
    config_class: ClassVar[type[BaseModel]]
    """Its settings (`EnvServiceConfig.backends[name]`), a frozen pydantic model."""
    capabilities: ClassVar[Capabilities]
    """What its sandboxes can do beyond `Sandbox` (declared; see `Capabilities`)."""

    def __init__(self, service: EnvServiceConfig, config: Any) -> None: ...

    @classmethod
    def placement(cls, image: str, runtime: str) -> tuple[str, str]:
        """A request's image and runtime as this backend names them (defaults filled in);
        InvalidRequestError if it cannot run them. Needs no service: the CLI checks
        options with it before any service exists."""
        ...

    async def build(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        """An unstarted sandbox of ``spec``; InvalidRequestError if it cannot be made."""
        ...

    def released(self, sandbox: Sandbox) -> None:
        """``sandbox``, built here, is stopped: free what it held (e.g. an image pin)."""
        ...

    async def reclaim(self) -> int:
        """Remove what a dead earlier process left behind; how many sandboxes. Must leave
        live processes' sandboxes alone (several services may share a host)."""
        ...

    async def aclose(self) -> None:
        """Close connections and caches (every sandbox is stopped by then)."""
        ...


def _is_backend(obj: Any) -> bool:
    """Whether ``obj`` looks like a `SandboxBackend` class (a registry's sanity check)."""
    config_class = getattr(obj, "config_class", None)
    return (
        isinstance(obj, type)
        and isinstance(config_class, type)
        and issubclass(config_class, BaseModel)
        and isinstance(getattr(obj, "capabilities", None), Capabilities)
        and all(callable(getattr(obj, m, None)) for m in ("placement", "build", "reclaim"))
    )


BACKENDS: Registry[type[SandboxBackend]] = Registry(
    "megaflow.backends", "sandbox backend", check=_is_backend
)
"""Every sandbox backend by name: built-ins, entry points, dotted paths."""

BACKENDS.add("local", lambda: load_dotted("megaflow.env.local.backend:LocalBackend"))
BACKENDS.add("docker", lambda: load_dotted("megaflow.env.docker.backend:DockerBackend"))


def backend_class(name: str) -> type[SandboxBackend]:
    """The backend registered as ``name``; InvalidRequestError lists the known ones."""
    return BACKENDS.get(name)
