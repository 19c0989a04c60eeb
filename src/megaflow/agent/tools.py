"""The built-in agent's tools, shared by the agent and the simulated policy.

bash       {"command": str}                      run in the persistent shell
edit_file  {"path": str, "old": str, "new": str}  replace exactly one occurrence
submit     {}                                    done: run the hidden evaluation
"""

from __future__ import annotations

import json

from megaflow.v1 import common_pb2

BASH = "bash"
EDIT_FILE = "edit_file"
SUBMIT = "submit"


def tool_specs() -> list[common_pb2.ToolSpec]:
    """JSON-schema descriptions of the tools, as sent to the model."""
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
