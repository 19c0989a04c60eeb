"""What the Environment Service runs when a task is submitted, beyond an exit status.

    from megaflow.env.evaluation import EvalSpec, TestRef, read_spec, tests_evaluation

- `spec`: `EvalSpec`, carried by a task as a hidden file (per-test outcomes from a
  test log, or a reward file), and `tests_evaluation`, which builds one;
- `log_parsers`: the registry of test-log parsers (entry-point group
  ``megaflow.log_parsers``; built-in ``pytest``);
- `runner`: the standard-library script copied into the sandbox that applies the test
  patch and runs exactly the tests named.

Task sources (`megaflow.tasks`) write these specs and the Environment Service
(`megaflow.env.actions`) reads them: they live in `env`, below both.
"""

from megaflow.env.evaluation.log_parsers import LOG_PARSERS, LogParser
from megaflow.env.evaluation.spec import EvalSpec, TestRef, read_spec, tests_evaluation

__all__ = ["LOG_PARSERS", "EvalSpec", "LogParser", "TestRef", "read_spec", "tests_evaluation"]
