"""Runs a task's tests after the agent submits; copied into the sandbox as a hidden file.

    python3 .megaflow/eval/run_tests.py .megaflow/eval/spec.json

Standard library only (it runs on the task's image, whatever Python it has). Reads the
evaluation spec (JSON, `megaflow.env.evaluation.spec.EvalSpec`), then, from the workspace:

1. when the workspace is a git repository and the spec names a ``base_commit``, the
   files the test patch touches go back to that commit (the agent's edits of the tests
   do not count, as in the SWE-bench harness);
2. ``git apply`` the test patch (if any); a patch that does not apply ends the run;
3. runs ``test_command`` followed by every test id as its own argv element: ids reach
   the test runner exactly, never through a shell (real ids hold spaces, brackets and
   quotes); stdout and stderr go to ``log_path``, which MegaFlow's log parser reads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

GIT = [
    *("git", "-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null"),
    *("-c", "core.fsmonitor=false"),
]


def patched_paths(patch: str) -> list[str]:
    """Paths a unified diff touches (its ``+++ b/...`` and ``--- a/...`` lines)."""
    paths = []
    for line in patch.splitlines():
        match = re.match(r"^(?:\+\+\+|---) [ab]/(.+?)\s*$", line)
        if match and match.group(1) not in paths:
            paths.append(match.group(1))
    return paths


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    log_path = spec["log_path"]
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "w") as log:
        patch_path = spec.get("test_patch_path") or ""
        if patch_path:
            with open(patch_path) as f:
                patch = f.read()
            if spec.get("base_commit") and os.path.isdir(".git"):
                for path in patched_paths(patch):
                    # Tracked at the base commit: restore it; new there: remove the agent's.
                    restored = subprocess.run(
                        [*GIT, "checkout", spec["base_commit"], "--", path],
                        capture_output=True,
                    )
                    if restored.returncode != 0 and os.path.isfile(path):
                        os.remove(path)
            applied = subprocess.run(
                [*GIT, "apply", "-v", patch_path], stdout=log, stderr=subprocess.STDOUT
            )
            if applied.returncode != 0:
                print("megaflow: the test patch does not apply", file=sys.stderr)
                return 2
        log.flush()
        argv = list(spec["test_command"]) + [t["test_id"] for t in spec["tests"]]
        ran = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    print(f"megaflow: tests exited {ran.returncode}; log in {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
