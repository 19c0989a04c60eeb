"""A child process for the durability test: writes, says what was acknowledged, waits.

    python -m tests.store.durable_writer URL

Opens the ledger at URL, submits tasks, finishes one and checkpoints another, prints
``acked`` once every call has returned, then sleeps until it is killed (-9).
"""

from __future__ import annotations

import asyncio
import sys

from megaflow.store.factory import open_ledger
from megaflow.v1 import common_pb2

TASKS = [f"d{i}" for i in range(40)]
RESULT = common_pb2.TaskResult(
    task_id="d0", state=common_pb2.TASK_STATE_SUCCEEDED, has_reward=True, reward=1.0, attempts=1
)
TRAJECTORY = common_pb2.Trajectory(
    task_id="d0", messages=[common_pb2.ChatMessage(role="assistant", content="done")]
)
CHECKPOINT = b"\x00state\xff" * 1000


async def main(url: str) -> None:
    ledger = open_ledger(url)
    await ledger.open()
    specs = [common_pb2.TaskSpec(task_id=t, problem_statement="fix it") for t in TASKS]
    await ledger.add_tasks("durable", specs, max_concurrency=7)
    await ledger.mark_running("d0", 1, "d0#1")
    await ledger.mark_running("d1", 1, "d1#1")
    assert await ledger.finish("d0", RESULT, TRAJECTORY)
    assert await ledger.save_checkpoint("d1", "d1#1", CHECKPOINT)
    print("acked", flush=True)
    await asyncio.sleep(3600)  # the test kills us


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
