"""`megaflow run`'s pre-flight check of an OpenAI-compatible model server.

Kept apart from `megaflow.cli.commands` (which imports every service) so that a wrong
URL, model or key is reported before the heavy imports, within a second or two."""

from __future__ import annotations

import asyncio

from megaflow.model.openai import check_upstream

PREFLIGHT_TIMEOUT_S = 3.0
"""How long `megaflow run` waits for an OpenAI-compatible server's model list."""


def check_model_spec(
    spec: str, timeout_s: float = PREFLIGHT_TIMEOUT_S, *, allow_unreachable: bool = False
) -> None:
    """For an `openai:URL[#model]` spec: the server answers GET /v1/models in time,
    takes the key (OPENAI_API_KEY) and serves the model. InvalidRequestError names what
    is wrong. Other specs: nothing to check. `allow_unreachable`: a server that does not
    answer (yet) passes (`megaflow serve model` may start before the server it fronts)."""
    if not spec.startswith("openai:"):
        return
    url, _, model = spec.removeprefix("openai:").partition("#")
    if not url.startswith(("http://", "https://")):
        return  # the backend factory reports a malformed spec
    asyncio.run(
        check_upstream(url, model, timeout_s=timeout_s, allow_unreachable=allow_unreachable)
    )
