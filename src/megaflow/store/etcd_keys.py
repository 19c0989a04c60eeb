"""Key layout and value encodings of :class:`~megaflow.store.etcd.EtcdLedger`.

Under ``/<prefix>/`` (run ids are percent-encoded inside keys, so no run's keys
fall under another run's prefix):

    t/<task>            JSON: run seq (never changes)
    s/<task>            the TaskSpec (protobuf)
    st/<task>           JSON: state attempts at (absent: pending, no attempt yet)
    a/<task>            the current attempt id ('' while pending): checkpoint fencing
    e/<task>            JSON: ekind err
    f/<task>            empty; exists once the task is terminal (finish-once compare)
    o/<task>, j/<task>  the TaskResult and Trajectory (protobuf), once terminal
    u/<seq:020>         task id, while the task is not terminal (submission order)
    r/<run>/<seq:020>   task id (the run's tasks in submission order)
    d/<run>/<task>      empty, once the task is terminal (counted by runs())
    runs/<run>          JSON: seq cap total
    seq, runseq         counters
    s0/<task>           when its first attempt was marked running (Unix time, text)
    c/<task>            the latest checkpoint: JSON header (aid seq at n hl), newline,
                        its head (the last hl bytes; before checkpoint logs: all of it)
    cr/<task>/<n>       the log's record n (from 1); every few, the records appended
                        since the last fold, folded into one value at the first's key
    sub/<token>         a submission of several transactions not yet committed (JSON: run
                        ids seq): its tasks are hidden from readers until it is
    l/<name>            the lease holder, attached to an etcd lease
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, unquote

from megaflow.store.ledger import Checkpoint


class Keys:
    def __init__(self, prefix: str) -> None:
        self.base = f"/{prefix.strip('/')}/"
        self.seq = self._k("seq")
        self.run_seq = self._k("runseq")
        self.runs = self._k("runs/")
        self.unfinished_all = self._k("u/")
        self.submissions = self._k("sub/")

    def _k(self, tail: str) -> bytes:
        return (self.base + tail).encode()

    def task(self, task_id: str) -> bytes:
        return self._k(f"t/{task_id}")

    def spec(self, task_id: str) -> bytes:
        return self._k(f"s/{task_id}")

    def state(self, task_id: str) -> bytes:
        return self._k(f"st/{task_id}")

    def started(self, task_id: str) -> bytes:
        return self._k(f"s0/{task_id}")

    def attempt(self, task_id: str) -> bytes:
        return self._k(f"a/{task_id}")

    def error(self, task_id: str) -> bytes:
        return self._k(f"e/{task_id}")

    def final(self, task_id: str) -> bytes:
        return self._k(f"f/{task_id}")

    def result(self, task_id: str) -> bytes:
        return self._k(f"o/{task_id}")

    def trajectory(self, task_id: str) -> bytes:
        return self._k(f"j/{task_id}")

    def unfinished(self, seq: int) -> bytes:
        return self._k(f"u/{seq:020d}")

    def run_tasks(self, run_id: str) -> bytes:
        return self._k(f"r/{quote(run_id, safe='')}/")

    def run_task(self, run_id: str, seq: int) -> bytes:
        return self.run_tasks(run_id) + f"{seq:020d}".encode()

    def done_of(self, run_id: str) -> bytes:
        return self._k(f"d/{quote(run_id, safe='')}/")

    def done(self, run_id: str, task_id: str) -> bytes:
        return self.done_of(run_id) + task_id.encode()

    def run(self, run_id: str) -> bytes:
        return self.runs + quote(run_id, safe="").encode()

    def run_id(self, run_key: bytes) -> str:
        return unquote(run_key[len(self.runs) :].decode())

    def checkpoint(self, task_id: str) -> bytes:
        return self._k(f"c/{task_id}")

    def records(self, task_id: str) -> bytes:
        return self._k(f"cr/{quote(task_id, safe='')}/")

    def record(self, task_id: str, n: int) -> bytes:
        return self.records(task_id) + f"{n:010d}".encode()

    def submission(self, token: str) -> bytes:
        return self.submissions + token.encode()

    def lease(self, name: str) -> bytes:
        return self._k(f"l/{name}")


@dataclass(frozen=True)
class StoredCheckpoint:
    """The value of c/<task>: the checkpoint, the first record(s) of its log and its head
    apart, and how many records its log has (the rest are under cr/<task>/)."""

    checkpoint: Checkpoint  # data: the log's first record(s) then the head
    n: int
    head_len: int

    @property
    def base(self) -> bytes:
        data = self.checkpoint.data
        return data[: len(data) - self.head_len]


def encode_checkpoint(checkpoint: Checkpoint, *, n: int = 1, head_len: int = 0) -> bytes:
    head = {
        "aid": checkpoint.attempt_id,
        "seq": checkpoint.seq,
        "at": checkpoint.saved_at,
        "n": n,
        "hl": head_len,
    }
    return json.dumps(head).encode() + b"\n" + checkpoint.data


def decode_stored(raw: bytes) -> StoredCheckpoint:
    head, _, data = raw.partition(b"\n")
    fields = json.loads(head)
    checkpoint = Checkpoint(
        attempt_id=fields["aid"], data=data, seq=int(fields["seq"]), saved_at=float(fields["at"])
    )
    return StoredCheckpoint(checkpoint, int(fields.get("n", 1)), int(fields.get("hl", 0)))


def decode_checkpoint(raw: bytes) -> Checkpoint:
    """The value of c/<task> alone (a checkpoint whose log has one record)."""
    return decode_stored(raw).checkpoint
