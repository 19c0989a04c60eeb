"""Runs a swe-synth task's hidden tests; copied into the sandbox only at submit.

    printf '%s\\n' CODE | python3 -I .megaflow/hidden_tests.py TESTFILE COUNT; test $? -eq CODE

Built so the code under test (which the agent wrote) cannot score itself:
- `python3 -I`: no PYTHONPATH, no user site, and the working directory is not put
  first on sys.path, so a workspace `unittest.py` cannot shadow the standard library;
  the workspace is appended after it, for the package under test;
- the hidden test file is loaded by path: no other `test_*.py` is collected;
- every one of COUNT tests must run and pass;
- success is a per-task exit CODE read from stdin before any agent code is imported,
  so agent code that calls `os._exit(0)` (or any code it could read from argv) at
  import time does not pass.
This is not a sandbox within the sandbox: code running in the same interpreter could
still, with effort, find the code in memory. It closes the cheap tricks.
"""

import importlib.util
import os
import sys
import unittest


def main() -> int:
    success_code = int(sys.stdin.readline())
    sys.stdin.close()
    test_file, expected = sys.argv[1], int(sys.argv[2])
    sys.path.append(os.getcwd())  # after the standard library
    spec = importlib.util.spec_from_file_location("megaflow_hidden_tests", test_file)
    if spec is None or spec.loader is None:
        print(f"cannot load {test_file}", file=sys.stderr)
        return 1
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    if result.testsRun != expected:
        print(f"ran {result.testsRun} hidden tests, expected {expected}", file=sys.stderr)
        return 1
    return success_code if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
