"""The etcd ledger (``aetcd``): leases and snapshots in the seed's key-value store.

etcd fsyncs its raft log before it answers, so a write this ledger returned from
survives a kill -9 of etcd. Every change is a transaction guarded by a compare on the
task's key (``mod_revision``): finish-once and checkpoint fencing hold under racing
callers (the loser re-reads and sees the new state). Leases are real etcd leases
(``ttl_s`` rounded up to whole seconds; etcd's minimum TTL applies, ~2 s here).

Limits, said plainly:

- etcd refuses a request over ``--max-request-bytes`` (default 1.5 MiB). A finish
  whose result + trajectory, a checkpoint, or a task spec larger than
  ``max_request_bytes`` (less a small margin) raises
  :class:`~megaflow.core.errors.InvalidRequestError` before anything is sent, and so
  does the server's own "request is too large" answer; nothing is written. Store big
  trajectories as artifacts (a directory or fsspec URL) and finish with a reference.
- etcd allows 128 operations per transaction, so ``add_tasks`` writes a submission
  of more than a transaction's worth of tasks in several, and still atomically: it
  first records the submission (``sub/<token>``: its run, ids and first seq), then
  writes the tasks' keys in chunks, then commits with one transaction that records the
  run and deletes the submission record. Readers (``run``, ``runs``, ``unfinished``)
  hide the tasks of an uncommitted submission; a duplicate id undoes the chunks; a
  submission its caller never committed (a crash) is rolled back by ``unfinished``,
  which a starting scheduler calls under its lease (the only submitter).

Every call has a timeout (``timeout_s``); an unreachable or timed-out etcd raises
:class:`~megaflow.core.errors.ServiceUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd  # type: ignore[import-untyped]
import aetcd.exceptions  # type: ignore[import-untyped]
from aetcd import rpc
from aetcd.transactions import Delete, Get, Put  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError, ServiceUnavailableError
from megaflow.store.etcd_keys import (
    Keys,
    StoredCheckpoint,
    decode_stored,
    encode_checkpoint,
)
from megaflow.store.ledger import (
    Checkpoint,
    LedgerRow,
    RunRow,
    TaskRow,
    check_append,
    check_lease_args,
    check_new_tasks,
    check_result,
)
from megaflow.v1 import common_pb2

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1_572_864  # etcd's --max-request-bytes default (1.5 MiB)
_MARGIN = 16_384  # keys, headers and framing of one request
_TXN_OPS = 128  # etcd's --max-txn-ops default
COMPACT_RECORDS = 32  # appended checkpoint records folded into c/<task> every so many
_MAX_CAS = 1000  # compare-and-swap retries before giving up (heavy contention)


class EtcdLedger:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "megaflow",
        timeout_s: float = 30.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_in_flight: int = 256,
    ) -> None:
        """``url``: ``etcd://host:port``; ``max_request_bytes``: the server's limit."""
        host, _, port = url.removeprefix("etcd://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequestError(f"etcd url must be etcd://host:port, got {url!r}")
        self.url = url
        self.host, self.port = host, int(port)
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self._gate = asyncio.Semaphore(max_in_flight)
        self._client: Any = None

    # -- plumbing ---------------------------------------------------------------------

    async def _rpc(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One etcd call with a timeout and MegaFlow errors."""
        if self._client is None:
            raise RuntimeError("ledger is not open")
        try:
            async with self._gate, asyncio.timeout(self.timeout_s):
                return await call()
        except TimeoutError as error:
            raise ServiceUnavailableError(
                f"etcd {self.url}: {what} timed out after {self.timeout_s}s"
            ) from error
        except (aetcd.exceptions.ClientError, rpc.AioRpcError) as error:
            text = str(error)
            grpc_error = error if isinstance(error, rpc.AioRpcError) else error.__cause__
            code = grpc_error.code() if isinstance(grpc_error, rpc.AioRpcError) else None
            if "too large" in text or code == rpc.StatusCode.RESOURCE_EXHAUSTED:
                raise InvalidRequestError(
                    f"etcd {self.url}: {what}: request too large for etcd ({text})"
                ) from error
            raise ServiceUnavailableError(f"etcd {self.url}: {what}: {text}") from error

    def _fits(self, what: str, size: int) -> None:
        if size > self.max_request_bytes - _MARGIN:
            raise InvalidRequestError(
                f"{what} is {size} bytes: over etcd's request limit of "
                f"{self.max_request_bytes} bytes (--max-request-bytes); store it as an artifact"
            )

    async def _get(self, key: bytes) -> Any:
        return await self._rpc("get", lambda: self._client.get(key))

    async def _txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        ok, replies = await self._rpc(
            "txn", lambda: self._client.transaction(compare, success, failure)
        )
        return ok, replies

    async def _range(self, prefix: bytes, page: int = 500, end: bytes = b"") -> list[Any]:
        """Every key-value under ``prefix`` (or from it to ``end``), in key order, read in
        pages."""
        end, start, out = end or _prefix_end(prefix), prefix, []
        while True:
            request: Any = rpc.RangeRequest(key=start, range_end=end, limit=page)
            reply = await self._rpc("range", functools.partial(self._read, request))
            out += list(reply.kvs)
            if not reply.more or not reply.kvs:
                return out
            start = reply.kvs[-1].key + b"\0"

    async def _read(self, request: Any) -> Any:
        return await self._client.kvstub.Range(request, timeout=self.timeout_s)

    async def _values(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The values of ``keys`` that exist (many gets per transaction)."""
        parts = [keys[i : i + 100] for i in range(0, len(keys), 100)]
        replies = await asyncio.gather(*(self._txn([], [Get(k) for k in p], []) for p in parts))
        found: dict[bytes, bytes] = {}
        for _, ranges in replies:
            for kvs in ranges:
                for value, meta in kvs:
                    found[meta.key] = value
        return found

    async def _cas(self, key: bytes, change: Callable[[Any], Awaitable[T | None]]) -> T:
        """Read ``key``, let ``change`` decide (it returns None after a lost race)."""
        for _ in range(_MAX_CAS):
            outcome = await change(await self._get(key))
            if outcome is not None:
                return outcome
        raise ServiceUnavailableError(f"etcd {self.url}: too much contention on {key!r}")

    async def open(self) -> None:
        options = {
            "grpc.max_receive_message_length": 256 << 20,
            "grpc.max_send_message_length": 256 << 20,
        }
        self._client = aetcd.Client(
            host=self.host, port=self.port, timeout=self.timeout_s, options=options
        )
        await self._rpc("status", lambda: self._client.status())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- tasks ------------------------------------------------------------------------

    async def _counter(self, key: bytes, n: int) -> int:
        """Reserve ``n`` numbers of counter ``key``; returns the last one before them."""

        async def bump(got: Any) -> int | None:
            base = int(got.value) if got is not None else 0
            rev = got.mod_revision if got is not None else 0
            ok, _ = await self._txn([self._client.transactions.mod(key) == rev],
                                    [Put(key, str(base + n).encode())], [])  # fmt: skip
            return base if ok else None

        return await self._cas(key, bump)

    async def add_tasks(
        self, run_id: str, tasks: list[common_pb2.TaskSpec], *, max_concurrency: int = 0
    ) -> None:
        ids = check_new_tasks(tasks)
        specs = [t.SerializeToString() for t in tasks]
        for i, spec in zip(ids, specs, strict=True):
            self._fits(f"task {i!r}'s spec", len(spec))
        base = await self._counter(self.keys.seq, len(ids))
        chunks: list[list[int]] = [[]]
        size = 0
        for n, spec in enumerate(specs):
            if len(chunks[-1]) * 4 + 4 > _TXN_OPS or size + len(spec) > self.max_request_bytes // 2:
                chunks.append([])
                size = 0
            chunks[-1].append(n)
            size += len(spec) + 256
        k, tx = self.keys, self._client.transactions

        def ops(n: int) -> list[Any]:  # no state key yet: pending, 0 attempts
            seq, task_id = base + n + 1, ids[n]
            return [
                Put(k.task(task_id), json.dumps({"run": run_id, "seq": seq}).encode()),
                Put(k.spec(task_id), specs[n]),
                Put(k.unfinished(seq), task_id.encode()),
                Put(k.run_task(run_id, seq), task_id.encode()),
            ]

        def taken(chunk: list[int]) -> list[Any]:
            return [tx.create(k.task(ids[n])) == 0 for n in chunk]

        if len(chunks) == 1:  # one transaction: the tasks and the run together
            (chunk,) = chunks
            if not await self._record_run(
                run_id,
                len(ids),
                max_concurrency,
                taken(chunk),
                [op for n in chunk for op in ops(n)],
            ):
                await self._refuse_taken(ids)
            return
        token = uuid.uuid4().hex
        record = {"run": run_id, "ids": ids, "seq": base + 1, "at": time.time()}
        sub = k.submission(token)
        blob = json.dumps(record).encode()
        self._fits("the submission's record", len(blob))
        await self._txn([], [Put(sub, blob)], [])

        async def write(chunk: list[int]) -> bool:
            ok, _ = await self._txn(taken(chunk), [op for n in chunk for op in ops(n)], [])
            return bool(ok)

        written = await asyncio.gather(*(write(c) for c in chunks), return_exceptions=True)
        if all(w is True for w in written) and await self._record_run(
            run_id, len(ids), max_concurrency, [tx.version(sub) > 0], [Delete(sub)]
        ):
            return
        undo = [op.key for c, w in zip(chunks, written, strict=True) if w is True
                for n in c for op in ops(n)]  # fmt: skip
        await self._delete(undo)
        await self._txn([], [Delete(sub)], [])
        error = next((w for w in written if isinstance(w, BaseException)), None)
        if error is not None:
            raise error
        await self._refuse_taken(
            [ids[n] for c, w in zip(chunks, written, strict=True) if w is not True for n in c]
        )

    async def _refuse_taken(self, ids: list[str]) -> None:
        found = await self._values([self.keys.task(i) for i in ids])
        raise InvalidRequestError(
            f"task ids already submitted: {[i for i in ids if self.keys.task(i) in found][:5]}"
        )

    async def _delete(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), _TXN_OPS):
            await self._txn([], [Delete(key) for key in keys[start : start + _TXN_OPS]], [])

    async def _open_submissions(self) -> list[dict[str, Any]]:
        return [
            json.loads(kv.value) | {"key": kv.key}
            for kv in await self._range(self.keys.submissions)
        ]

    async def _hidden(self) -> set[str]:
        """The ids of tasks in submissions not committed (not yet, or never)."""
        return {i for sub in await self._open_submissions() for i in sub["ids"]}

    async def _roll_back_submissions(self) -> None:
        """Undo every submission that was not committed (its caller crashed)."""
        k = self.keys
        for sub in await self._open_submissions():
            ids, run_id = sub["ids"], sub["run"]
            mine = await self._values([k.task(i) for i in ids])
            keys: list[bytes] = []
            for n, task_id in enumerate(ids):
                head = mine.get(k.task(task_id))
                if head is None or json.loads(head)["seq"] != sub["seq"] + n:
                    continue  # not written by this submission
                seq = sub["seq"] + n
                keys += [
                    k.task(task_id),
                    k.spec(task_id),
                    k.unfinished(seq),
                    k.run_task(run_id, seq),
                ]
            await self._delete(keys)
            await self._txn([], [Delete(sub["key"])], [])
            log.warning(
                "rolled back an uncommitted submission of %d tasks to run %r", len(ids), run_id
            )

    async def _record_run(
        self,
        run_id: str,
        count: int,
        max_concurrency: int,
        compare: list[Any],
        success: list[Any],
    ) -> bool:
        """Record ``count`` more tasks of the run, in one transaction with ``success``
        when ``compare`` holds; False (nothing written) when it does not."""
        key = self.keys.run(run_id)
        tx = self._client.transactions

        async def record(got: Any) -> bool | None:
            if got is None:
                run = {"seq": await self._counter(self.keys.run_seq, 1) + 1,
                       "cap": max_concurrency, "total": count}  # fmt: skip
            else:
                run = json.loads(got.value)
                run["total"] += count
                run["cap"] = max_concurrency or run["cap"]
            rev = got.mod_revision if got is not None else 0
            ok, replies = await self._txn(
                [*compare, tx.mod(key) == rev],
                [*success, Put(key, json.dumps(run).encode())],
                [Get(key)],
            )
            if ok:
                return True
            (kvs,) = replies
            return False if (kvs[0][1].mod_revision if kvs else 0) == rev else None

        return await self._cas(key, record)

    def _alive(self, task_id: str) -> list[Any]:
        """Compares: the task exists and is not terminal."""
        tx = self._client.transactions
        return [tx.create(self.keys.task(task_id)) > 0, tx.create(self.keys.final(task_id)) == 0]

    def _state(self, task_id: str, state: int, attempts: int) -> Any:
        value = {"state": state, "attempts": attempts, "at": time.time()}
        return Put(self.keys.state(task_id), json.dumps(value).encode())

    def _error(self, task_id: str, kind: int, error: str) -> Any:
        return Put(self.keys.error(task_id), json.dumps({"ekind": kind, "err": error}).encode())

    async def mark_running(self, task_id: str, attempt: int, attempt_id: str) -> None:
        success = [
            self._state(task_id, 2, attempt),
            Put(self.keys.attempt(task_id), attempt_id.encode()),
        ]
        if attempt == 1:  # the task starts: its deadline counts from now
            success.append(Put(self.keys.started(task_id), repr(time.time()).encode()))
        await self._txn(self._alive(task_id), success, [])

    async def mark_retrying(self, task_id: str, attempt: int, error: str) -> None:
        success = [
            self._state(task_id, 1, attempt),
            Put(self.keys.attempt(task_id), b""),
            self._error(task_id, common_pb2.ERROR_KIND_INFRA, error),
        ]
        await self._txn(self._alive(task_id), success, [])

    async def finish(
        self,
        task_id: str,
        result: common_pb2.TaskResult,
        trajectory: common_pb2.Trajectory | None,
    ) -> bool:
        check_result(result)
        blob = result.SerializeToString()
        traj = trajectory.SerializeToString() if trajectory is not None else None
        self._fits(f"task {task_id!r}'s result and trajectory", len(blob) + len(traj or b""))
        k = self.keys
        got = await self._get(k.task(task_id))  # run and seq never change
        if got is None:
            return False
        head = json.loads(got.value)
        success = [
            Put(k.final(task_id), b""),
            self._state(task_id, int(result.state), result.attempts),
            self._error(task_id, int(result.error_kind), result.error),
            Put(k.result(task_id), blob),
            Put(k.trajectory(task_id), traj) if traj is not None else Delete(k.trajectory(task_id)),
            Delete(k.unfinished(head["seq"])),
            Put(k.done(head["run"], task_id), b""),
        ]
        ok, _ = await self._txn(self._alive(task_id), success, [])  # exactly one wins
        return bool(ok)

    async def run(self, run_id: str) -> list[LedgerRow]:
        k = self.keys
        hidden = await self._hidden()
        ids = [kv.value.decode() for kv in await self._range(k.run_tasks(run_id))]
        ids = [i for i in ids if i not in hidden]
        wanted = [
            key for i in ids for key in (k.state(i), k.error(i), k.result(i), k.trajectory(i))
        ]
        found = await self._values(wanted)
        rows = []
        for i in ids:
            state = _state_of(found.get(k.state(i)))
            error = json.loads(found.get(k.error(i), b'{"ekind": 0, "err": ""}'))
            result, traj = found.get(k.result(i)), found.get(k.trajectory(i))
            rows.append(
                LedgerRow(
                    run_id=run_id,
                    task_id=i,
                    state=state["state"],
                    attempts=state["attempts"],
                    error_kind=error["ekind"],
                    error=error["err"],
                    result=common_pb2.TaskResult.FromString(result) if result is not None else None,
                    trajectory=common_pb2.Trajectory.FromString(traj) if traj is not None else None,
                )
            )
        return rows

    async def runs(self) -> list[RunRow]:
        records = [(kv.key, json.loads(kv.value)) for kv in await self._range(self.keys.runs)]
        records.sort(key=lambda r: int(r[1]["seq"]))
        rows = []
        for key, run in records:
            run_id = self.keys.run_id(key)
            done = await self._count(self.keys.done_of(run_id))
            rows.append(RunRow(run_id, int(run["cap"]), int(run["total"]), done))
        return rows

    async def _count(self, prefix: bytes) -> int:
        request = rpc.RangeRequest(key=prefix, range_end=_prefix_end(prefix), count_only=True)
        reply = await self._rpc("count", lambda: self._read(request))
        return int(reply.count)

    async def unfinished(self) -> list[TaskRow]:
        """Also rolls back the submissions never committed: call it (as a starting
        scheduler does, under its lease) only while nobody submits."""
        await self._roll_back_submissions()
        k = self.keys
        ids = [kv.value.decode() for kv in await self._range(k.unfinished_all)]
        found = await self._values(
            [
                key
                for i in ids
                for key in (
                    k.task(i),
                    k.spec(i),
                    k.state(i),
                    k.attempt(i),
                    k.final(i),
                    k.started(i),
                )
            ]
        )
        rows = []
        for i in ids:
            head, spec = found.get(k.task(i)), found.get(k.spec(i))
            if head is None or spec is None or k.final(i) in found:
                continue  # finished since the index was read
            state = _state_of(found.get(k.state(i)))
            rows.append(
                TaskRow(
                    run_id=json.loads(head)["run"],
                    spec=common_pb2.TaskSpec.FromString(spec),
                    state=state["state"],
                    attempts=state["attempts"],
                    attempt_id=found.get(k.attempt(i), b"").decode(),
                    started_at=float(found.get(k.started(i), b"0")),
                )
            )
        return rows

    # -- checkpoints ------------------------------------------------------------------

    async def save_checkpoint(
        self, task_id: str, attempt_id: str, data: bytes, *, head: bytes = b"", after: int = 0
    ) -> bool:
        check_append(after)
        data, head = bytes(data), bytes(head)
        self._fits(f"task {task_id!r}'s checkpoint", len(data) + len(head))
        if not attempt_id:
            return False
        tx, ckey = self._client.transactions, self.keys.checkpoint(task_id)
        records = self.keys.records(task_id)
        for _ in range(_MAX_CAS):
            old = await self._get(ckey)
            rev = old.mod_revision if old is not None else 0
            stored = decode_stored(old.value) if old is not None else None
            seq = stored.checkpoint.seq + 1 if stored is not None else 1
            compare = [
                tx.value(self.keys.attempt(task_id)) == attempt_id.encode(),  # fencing
                tx.create(self.keys.final(task_id)) == 0,
                tx.mod(ckey) == rev,
            ]
            if not after:  # a whole log: one record
                value = Checkpoint(attempt_id, head, seq, time.time())
                ops = [
                    Put(ckey, encode_checkpoint(value, n=1, head_len=len(head))),
                    Put(self.keys.record(task_id, 1), data),
                    Delete(self.keys.record(task_id, 2), range_end=_prefix_end(records)),
                ]
            elif stored is None or stored.checkpoint.attempt_id != attempt_id or stored.n != after:
                return False  # not this attempt's log as the caller knows it
            else:
                ops = await self._append(task_id, stored, seq, data, head)
            ok, replies = await self._txn(compare, ops, [Get(ckey)])
            if ok:
                return True
            (kvs,) = replies
            if (kvs[0][1].mod_revision if kvs else 0) == rev:
                return False  # fenced: stale attempt or terminal task
        raise ServiceUnavailableError(f"etcd {self.url}: too much contention on {ckey!r}")

    async def _append(
        self, task_id: str, stored: StoredCheckpoint, seq: int, data: bytes, head: bytes
    ) -> list[Any]:
        """The operations that append ``data`` to the log of ``stored`` as its record
        n+1 under cr/<task>/ and replace the head in c/<task> (which holds no record, so
        that etcd's history of it stays small). Every ``COMPACT_RECORDS`` records, the
        ones appended since the last fold and this one become one key (while that fits
        one request): a record's bytes are written twice at most."""
        n, records = stored.n + 1, self.keys.records(task_id)
        value = Checkpoint(stored.checkpoint.attempt_id, stored.base + head, seq, time.time())
        ops = [
            Put(self.keys.checkpoint(task_id), encode_checkpoint(value, n=n, head_len=len(head)))
        ]
        if stored.n >= COMPACT_RECORDS and stored.n % COMPACT_RECORDS == 0:
            first = stored.n - COMPACT_RECORDS + 2
            kvs = await self._range(self.keys.record(task_id, first), end=_prefix_end(records))
            chunk = b"".join([*(kv.value for kv in kvs), data])
            if len(chunk) <= self.max_request_bytes - _MARGIN:
                return [
                    *ops,
                    Delete(self.keys.record(task_id, first + 1), range_end=_prefix_end(records)),
                    Put(self.keys.record(task_id, first), chunk),
                ]
        return [*ops, Put(self.keys.record(task_id, n), data)]

    async def load_checkpoint(self, task_id: str) -> Checkpoint | None:
        ckey, records = self.keys.checkpoint(task_id), self.keys.records(task_id)
        tx = self._client.transactions
        # one read transaction: c/<task> and its records as of one revision
        ok, replies = await self._txn(
            [tx.version(ckey) > 0], [Get(ckey), Get(records, range_end=_prefix_end(records))], []
        )
        if not ok:
            return None
        (kvs,), appended = replies
        stored = decode_stored(kvs[0])
        rest = [value for value, _ in appended]
        data = b"".join([stored.base, *rest, stored.checkpoint.data[len(stored.base) :]])
        return dataclasses.replace(stored.checkpoint, data=data)

    # -- leases -----------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        check_lease_args(name, holder, ttl_s)
        key, ttl = self.keys.lease(name), max(1, math.ceil(ttl_s))

        async def acquire(got: Any) -> bool | None:
            if got is not None and got.value != holder.encode():
                return False
            lease = await self._rpc("lease", lambda: self._client.lease(ttl))
            rev = got.mod_revision if got is not None else 0
            compare = [self._client.transactions.mod(key) == rev]
            ok, _ = await self._txn(compare, [Put(key, holder.encode(), lease=lease.id)], [])
            if not ok:  # lost a race: drop our lease and look again
                await self._revoke(lease.id)
                return None
            if got is not None and got.lease:  # renewed: the old lease holds nothing now
                await self._revoke(got.lease)
            return True

        return await self._cas(key, acquire)

    async def release_lease(self, name: str, holder: str) -> bool:
        check_lease_args(name, holder)
        key = self.keys.lease(name)
        got = await self._get(key)
        if got is None or got.value != holder.encode():
            return False
        compare = [self._client.transactions.mod(key) == got.mod_revision]
        ok, _ = await self._txn(compare, [Delete(key)], [])
        if ok and got.lease:
            await self._revoke(got.lease)
        return bool(ok)

    async def _revoke(self, lease_id: int) -> None:
        """Best effort: a lease that expired meanwhile is gone already."""
        with contextlib.suppress(ServiceUnavailableError):
            await self._rpc("revoke", lambda: self._client.revoke_lease(lease_id))

    async def lease_holder(self, name: str) -> str | None:
        got = await self._get(self.keys.lease(name))
        return None if got is None else bytes(got.value).decode()


def _state_of(raw: bytes | None) -> dict[str, Any]:
    """A task's state value; none yet means pending with no attempt."""
    return {"state": 1, "attempts": 0} if raw is None else dict(json.loads(raw))


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])
