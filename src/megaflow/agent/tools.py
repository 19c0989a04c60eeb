"""The built-in agent's tools, shared by the agent and the simulated policy.

bash       {"command": str}                      run in the persistent shell
edit_file  {"path": str, "old": str, "new": str}  replace exactly one occurrence
submit     {}                                    done: run the hidden evaluation
"""

from __future__ import annotations

import functools
import json

from megaflow.v1 import common_pb2

BASH = "bash"
EDIT_FILE = "edit_file"
SUBMIT = "submit"


def tool_specs() -> list[common_pb2.ToolSpec]:
    """JSON-schema descriptions of the tools, as sent to the model (fresh messages)."""
    return [
        common_pb2.ToolSpec(name=n, description=d, parameters_json_schema=j) for n, d, j in _specs()
    ]


@functools.cache
def _specs() -> tuple[tuple[str, str, str], ...]:
    return tuple((spec.name, spec.description, spec.parameters_json_schema) for spec in _build())


def _build() -> list[common_pb2.ToolSpec]:
    return [
        common_pb2.ToolSpec(
            name=BASH,
            description="Run a shell command in the repository. State (cwd, env vars) persists.",
            parameters_json_schema=json.dumps(
                {
                    "type": "object",
                    "properties": {"command": {"type": "string"}},
                    "required": ["command"],
                }
            ),
        ),
        common_pb2.ToolSpec(
            name=EDIT_FILE,
            description="Replace exactly one occurrence of `old` with `new` in the file at `path`.",
            parameters_json_schema=json.dumps(
                {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string"},
                        "old": {"type": "string"},
                        "new": {"type": "string"},
                    },
                    "required": ["path", "old", "new"],
                }
            ),
        ),
        common_pb2.ToolSpec(
            name=SUBMIT,
            description="Submit the current state of the repository as the solution.",
            parameters_json_schema=json.dumps({"type": "object", "properties": {}}),
        ),
    ]
