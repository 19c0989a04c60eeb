"""The distributed ledger: Redis (``redis.asyncio``).

Run the server durable, or "acknowledged" means nothing::

    redis-server --appendonly yes --appendfsync always

With ``appendfsync always`` Redis fsyncs its append-only file before it replies, so a
write this ledger returned from survives a kill -9 of ``redis-server`` (the AOF is
replayed on restart). :class:`~megaflow.testing.redis_server.RedisServer` starts one
like that. Standalone Redis only (the Lua scripts build their keys; not Redis Cluster).

Every state change is one Lua script (atomic: finish-once, fenced checkpoints, lease
compare-and-set). Writes issued concurrently are pipelined: calls queued while a
pipeline is in flight go out together in the next one (Redis then fsyncs once for
all of them). Connections come from a ``BlockingConnectionPool``; every call has a
timeout (``timeout_s``): a call that times out or cannot connect raises
:class:`~megaflow.core.errors.ServiceUnavailableError` (retryable; the write may or
may not have been applied).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aredis
import redis.exceptions
from redis.commands.core import AsyncScript

from megaflow.core.errors import InvalidRequestError, ServiceUnavailableError
from megaflow.store import redis_lua
from megaflow.store.batching import Batcher, Failed
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
Call = tuple[AsyncScript, list[str], list[Any]]

_CHUNK = 1000  # keys per pipeline when reading


class RedisLedger:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "megaflow",
        timeout_s: float = 30.0,
        max_connections: int = 32,
        max_batch: int = 2000,
    ) -> None:
        """``url``: ``redis://host:port[/db]``; ``prefix``: namespace of every key;
        ``max_batch``: most calls per pipeline (1: none, each call on its own connection)."""
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_batch = max_batch
        self._client: aredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._batcher: Batcher[Call] = Batcher(self._flush, max_batch=max_batch)

    # -- plumbing ---------------------------------------------------------------------

    @property
    def client(self) -> aredis.Redis:
        if self._client is None:
            raise RuntimeError("ledger is not open")
        return self._client

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call()
        except TimeoutError as error:
            raise ServiceUnavailableError(
                f"redis {self.url}: {what} timed out after {self.timeout_s}s"
            ) from error
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise ServiceUnavailableError(f"redis {self.url}: {what}: {error}") from error

    async def _flush(self, calls: list[Call]) -> list[Any]:
        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            return [Failed(r) if isinstance(r, Exception) else r for r in replies]

        return await self._guard("pipeline", send)

    async def _script(self, name: str, args: list[Any], keys: list[str] | None = None) -> Any:
        if self._client is None:
            raise RuntimeError("ledger is not open")
        script, argv = self._scripts[name], [self.prefix, *args]
        if self.max_batch == 1:  # no coalescing: each call on its own pooled connection
            return await self._guard(name, lambda: script(keys=keys or [], args=argv))
        return await self._batcher.submit((script, keys or [], argv))

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    async def open(self) -> None:
        pool = aredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=min(self.timeout_s, 10.0),
        )
        self._client = aredis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._client.register_script(str(getattr(redis_lua, name)))
            for name in (
                "ADD_TASKS",
                "MARK_RUNNING",
                "MARK_RETRYING",
                "FINISH",
                "SAVE_CHECKPOINT",
                "ACQUIRE_LEASE",
                "RELEASE_LEASE",
            )
        }
        await self._guard("ping", self._client.ping)

    async def close(self) -> None:
        await self._batcher.drain()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            await client.connection_pool.disconnect()

    # -- tasks ------------------------------------------------------------------------

    async def add_tasks(
        self, run_id: str, tasks: list[common_pb2.TaskSpec], *, max_concurrency: int = 0
    ) -> None:
        check_new_tasks(tasks)
        args: list[Any] = [run_id, max_concurrency, repr(time.time())]
        for task in tasks:
            args += [task.task_id, task.SerializeToString()]
        taken = await self._script("ADD_TASKS", args)
        if taken:
            names = [t.decode() for t in taken]
            raise InvalidRequestError(f"task ids already submitted: {names}")

    async def mark_running(self, task_id: str, attempt: int, attempt_id: str) -> None:
        await self._script("MARK_RUNNING", [task_id, attempt, attempt_id, repr(time.time())])

    async def mark_retrying(self, task_id: str, attempt: int, error: str) -> None:
        await self._script("MARK_RETRYING", [task_id, attempt, error, repr(time.time())])

    async def finish(
        self,
        task_id: str,
        result: common_pb2.TaskResult,
        trajectory: common_pb2.Trajectory | None,
    ) -> bool:
        check_result(result)
        args = [
            task_id,
            int(result.state),
            result.attempts,
            int(result.error_kind),
            result.error,
            result.SerializeToString(),
            trajectory.SerializeToString() if trajectory is not None else b"",
            "1" if trajectory is not None else "0",
            repr(time.time()),
        ]
        return bool(await self._script("FINISH", args))

    async def _hashes(self, keys: list[str], fields: list[str]) -> list[list[Any]]:
        """HMGET ``fields`` of every key, pipelined in chunks."""
        out: list[list[Any]] = []
        for start in range(0, len(keys), _CHUNK):

            async def chunk(part: list[str] = keys[start : start + _CHUNK]) -> list[Any]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in part:
                        pipe.hmget(key, fields)
                    return list(await pipe.execute())

            out += await self._guard("read", chunk)
        return out

    async def _names(self, what: str, read: Callable[[], Any]) -> list[str]:
        """A list or sorted set of names (bytes from Redis) as text."""

        async def call() -> list[Any]:
            return list(await read())

        return [
            n.decode() if isinstance(n, bytes) else str(n) for n in await self._guard(what, call)
        ]

    async def run(self, run_id: str) -> list[LedgerRow]:
        ids = await self._names("run", lambda: self.client.lrange(self._key("rt", run_id), 0, -1))
        fields = ["run", "state", "attempts", "ekind", "err", "result", "traj"]
        rows = await self._hashes([self._key("t", i) for i in ids], fields)
        return [
            LedgerRow(
                run_id=r[0].decode(),
                task_id=task_id,
                state=int(r[1]),
                attempts=int(r[2]),
                error_kind=int(r[3]),
                error=r[4].decode(),
                result=common_pb2.TaskResult.FromString(r[5]) if r[5] is not None else None,
                trajectory=common_pb2.Trajectory.FromString(r[6]) if r[6] is not None else None,
            )
            for task_id, r in zip(ids, rows, strict=True)
            if r[0] is not None
        ]

    async def runs(self) -> list[RunRow]:
        names = await self._names("runs", lambda: self.client.zrange(f"{self.prefix}:runs", 0, -1))
        rows = await self._hashes([self._key("r", n) for n in names], ["cap", "total", "terminal"])
        return [
            RunRow(run_id=n, max_concurrency=int(r[0]), total=int(r[1]), terminal=int(r[2]))
            for n, r in zip(names, rows, strict=True)
            if r[0] is not None
        ]

    async def unfinished(self) -> list[TaskRow]:
        ids = await self._names("unfinished", lambda: self.client.zrange(f"{self.prefix}:u", 0, -1))
        fields = ["run", "spec", "state", "attempts", "aid", "st"]
        rows = await self._hashes([self._key("t", i) for i in ids], fields)
        return [
            TaskRow(
                run_id=r[0].decode(),
                spec=common_pb2.TaskSpec.FromString(r[1]),
                state=int(r[2]),
                attempts=int(r[3]),
                attempt_id=r[4].decode(),
                started_at=float(r[5] or 0),
            )
            for r in rows
            if r[0] is not None and int(r[2]) not in (3, 4)
        ]

    # -- checkpoints ------------------------------------------------------------------

    async def save_checkpoint(
        self, task_id: str, attempt_id: str, data: bytes, *, head: bytes = b"", after: int = 0
    ) -> bool:
        check_append(after)
        args = [task_id, attempt_id, bytes(data), repr(time.time()), bytes(head), after]
        return bool(await self._script("SAVE_CHECKPOINT", args))

    async def load_checkpoint(self, task_id: str) -> Checkpoint | None:
        async def read() -> list[Any]:  # MULTI: the hash and its log as of one moment
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hmget(self._key("c", task_id), ["aid", "data", "seq", "at", "head"])
                pipe.get(self._key("cl", task_id))
                return list(await pipe.execute())

        row, log = await self._guard("checkpoint", read)
        if row[0] is None:
            return None
        data = b"".join([bytes(row[1]), bytes(log or b""), bytes(row[4] or b"")])
        return Checkpoint(
            attempt_id=row[0].decode(), data=data, seq=int(row[2]), saved_at=float(row[3])
        )

    # -- leases -----------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        check_lease_args(name, holder, ttl_s)
        ttl_ms = max(1, round(ttl_s * 1000))
        return bool(
            await self._script("ACQUIRE_LEASE", [holder, ttl_ms], keys=[self._key("l", name)])
        )

    async def release_lease(self, name: str, holder: str) -> bool:
        check_lease_args(name, holder)
        return bool(await self._script("RELEASE_LEASE", [holder], keys=[self._key("l", name)]))

    async def lease_holder(self, name: str) -> str | None:
        value: Any = await self._guard("lease", lambda: self.client.get(self._key("l", name)))
        return None if value is None else bytes(value).decode()
