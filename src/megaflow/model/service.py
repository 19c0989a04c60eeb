"""The Model Service: chat completions from routed, health-checked, versioned replicas.

Each model name is a `ModelPool` (`megaflow.model.versions`) of replicas, each wrapping
one `ModelBackend`. `ModelServiceImpl([backend, ...])` makes one single-replica pool per
backend (the embedded mode and CLI); `add_replica` adds more, `deploy_version` hot-swaps
a model to a new version (also over gRPC as `UpdateWeights`).

A `generate` call:

    1. validate; admit under the client's rate limits (wait if the wait fits the
       deadline, else `CapacityError`)
    2. route (`megaflow.model.router`, a pure policy); if every healthy replica is
       saturated, wait in the model's bounded queue (`CapacityError` past the bound
       or the deadline)
    3. dispatch inside a `call_scope` (the deadline, and whether another healthy replica
       could take a retry: then the backend hands a failed attempt back at once instead
       of retrying it on the same upstream); on a retryable error, count a failure
       against the replica (and its circuit breaker) and retry on ANOTHER replica within
       the deadline; once every replica has failed the request
       (`retry_rounds` times over, after a backoff), raise the last (retryable) error, so
       the caller's own retry policy takes over; `InvalidRequestError` and other final
       errors are raised at once
    4. tag the response with the `replica` and `model_version` that served it

`generate_stream` is the same call answered as `GenerateChunk`s while the backend
produces them (`megaflow.model.backend.stream_backend`): steps 1-3 alike until the
first chunk, so a failure before it is retried (on another replica, or by the backend's
own retry policy) as in `generate`; from the first chunk on the stream is committed to
its replica, and a failure ends the stream with that error (it still counts against the
replica), never a retry that would repeat text already sent. Closing the stream early
(the caller went away) closes the backend's stream, which stops the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence

from megaflow.core import jitter
from megaflow.core.errors import (
    CapacityError,
    DeadlineExceededError,
    InvalidRequestError,
    MegaFlowError,
    ModelUnavailableError,
    NotFoundError,
)
from megaflow.core.runtime import coarse_timeout_at
from megaflow.model.admission import (
    ModelServiceConfig,
    client_key,
    estimate_tokens,
    validate_generate,
)
from megaflow.model.backend import ModelBackend, stream_backend
from megaflow.model.factory import backend_from_spec, spec_of
from megaflow.model.latency import LatencyConfig
from megaflow.model.openai import OpenAIBackend
from megaflow.model.ratelimit import RateLimiter
from megaflow.model.replicas import Replica, ReplicaState
from megaflow.model.resilience import call_scope
from megaflow.model.router import Router
from megaflow.model.versions import ModelPool, SwapReport, hot_swap
from megaflow.v1 import common_pb2, model_pb2

log = logging.getLogger(__name__)

BackendFactory = Callable[..., ModelBackend]

__all__ = [
    "BackendFactory",
    "ModelServiceConfig",
    "ModelServiceImpl",
    "client_key",
    "estimate_tokens",
    "validate_generate",
]


# Replicas one UpdateWeights may start per backend spec (a bigger number is a typo or
# an attack: each replica is built before any serves).
MAX_REPLICAS_PER_SPEC = 256


class ModelServiceImpl:
    """Serves `GenerateRequest`s from the replicas of the model named by `request.model`."""

    def __init__(
        self,
        backends: Sequence[ModelBackend],
        default: str | None = None,
        config: ModelServiceConfig | None = None,
        *,
        backend_factory: BackendFactory = backend_from_spec,
    ) -> None:
        if not backends:
            raise ValueError("a Model Service needs at least one backend")
        self.config = config or ModelServiceConfig()
        self._factory = backend_factory
        self._pools: dict[str, ModelPool] = {}
        self._routers: dict[str, Router] = {}
        self._limiter = RateLimiter(self.config.rate_limit)
        self._health_task: asyncio.Task[None] | None = None
        self._probes_needed = False  # only non-simulated replicas need periodic probes
        self._closed = False
        for backend in backends:
            self.add_replica(backend)
        self.default = default or backends[0].name
        if self.default not in self._pools:
            raise ValueError(f"default model {self.default!r} is not among the backends")

    # -- replicas -------------------------------------------------------------------------

    def add_replica(
        self, backend: ModelBackend, *, model: str | None = None, capacity: int | None = None
    ) -> Replica:
        """Serve `model` (default: `backend.name`) from one more replica, at once."""
        name = model or backend.name
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ModelPool(name)
            pool.breaker = self.config.health.breaker
            self._routers[name] = Router(
                self.config.route_policy, sticky=self.config.sticky, seed=self.config.seed
            )
        replica = pool.new_replica(
            backend, pool.version, capacity or self.config.replica_capacity, ReplicaState.ACTIVE
        )
        pool.add(replica)
        self._probes_needed |= backend.kind != "simulated"
        spec = spec_of(backend)
        if spec is not None and spec not in pool.specs:
            pool.specs.append(spec)
        self._ensure_health_task()
        return replica

    def _pool(self, name: str) -> ModelPool:
        pool = self._pools.get(name or self.default)
        if pool is None:
            raise NotFoundError(f"no model named {name!r}; known: {sorted(self._pools)}")
        return pool

    def replicas(self, model: str = "") -> list[Replica]:
        """The live replicas of one model (or of all), in routing order."""
        pools = [self._pool(model)] if model else list(self._pools.values())
        return [r for pool in pools for r in pool.replicas]

    def backend(self, name: str) -> ModelBackend:
        """The backend of a model's first active replica (single-replica callers)."""
        pool = self._pool(name)
        active = pool.active()
        if not active:
            raise ModelUnavailableError(f"model {pool.name!r} has no active replica")
        return active[0].backend

    # -- generate -------------------------------------------------------------------------

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        call = await self._admit(request)
        pool, tokens = call.pool, call.tokens
        while True:
            replica = await self._next_replica(call)
            if replica is None:
                continue  # a pause between rounds over all replicas
            # Another healthy replica could take a retry: the backend hands it over.
            failover = _can_fail_over(pool, replica, call.tried)
            replica.breaker.acquire()  # claims a half-open breaker's one trial call
            replica.begin(tokens)
            try:
                # coarse: one shared timer handle, not one per request (core.runtime)
                async with coarse_timeout_at(_loop_time(call.deadline, call.started)) as scope:
                    with call_scope(call.deadline, failover=failover):
                        response = await replica.backend.generate(request)
            except MegaFlowError as error:
                if not error.retryable:
                    replica.breaker.release()
                    raise
                call.failed(replica, error)
                self._count_failure(pool, replica, error)
                log.info("replica %s failed a request (%s); retrying elsewhere", replica.id, error)
                continue
            except TimeoutError as error:
                replica.breaker.release()
                if scope.expired():
                    raise DeadlineExceededError(
                        f"model {pool.name!r}: no answer within {self.config.deadline_s:g}s"
                        + (f" (last error: {call.last})" if call.last else "")
                    ) from error
                raise
            except BaseException:
                replica.breaker.release()
                raise
            finally:
                replica.end(tokens)
                pool.wake_one()
            self._succeeded(call, replica, response)
            return response

    async def generate_stream(
        self, request: model_pb2.GenerateRequest
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        """`generate`, answered incrementally (see the module docstring)."""
        call = await self._admit(request)
        pool, tokens = call.pool, call.tokens
        while True:
            replica = await self._next_replica(call)
            if replica is None:
                continue
            failover = _can_fail_over(pool, replica, call.tried)
            replica.breaker.acquire()
            replica.begin(tokens)
            chunks = stream_backend(replica.backend, request)
            # Before the first chunk: failures are retried exactly as in `generate`.
            try:
                first = await self._next_chunk(pool, chunks, call.deadline, failover, call.last)
            except BaseException as error:
                replica.end(tokens)
                pool.wake_one()
                await _close(chunks)
                if not isinstance(error, MegaFlowError) or not error.retryable:
                    replica.breaker.release()
                    raise
                call.failed(replica, error)
                self._count_failure(pool, replica, error)
                log.info("replica %s failed a request (%s); retrying elsewhere", replica.id, error)
                continue
            # From the first chunk on, the stream is this replica's: no retry.
            finished = False
            try:
                chunk = first
                while True:
                    if chunk.HasField("final"):
                        finished = True
                        self._succeeded(call, replica, chunk.final)
                        yield chunk
                        return
                    yield chunk
                    chunk = await self._next_chunk(pool, chunks, call.deadline, False, None)
            except MegaFlowError as error:
                if not finished:
                    if error.retryable:
                        self._count_failure(pool, replica, error)
                    else:
                        replica.breaker.release()
                raise
            except BaseException:  # cancelled, or the caller closed the stream
                if not finished:
                    replica.breaker.release()
                raise
            finally:
                replica.end(tokens)
                pool.wake_one()
                await _close(chunks)

    async def _admit(self, request: model_pb2.GenerateRequest) -> _Call:
        """Validate a call, find its pool, start its deadline and wait out its rate limit."""
        validate_generate(request)
        pool = self._pools.get(request.model or self.default) or self._pool(request.model)
        if self._health_task is None:
            self._ensure_health_task()
        started = time.monotonic()
        call = _Call(pool, request, started, started + self.config.deadline_s)
        limiter = self._limiter
        if limiter.enabled:
            wait = limiter.reserve(call.client, call.tokens, started, call.deadline - started)
            if wait is None:
                raise CapacityError(f"client {call.client!r} is over its rate limit; retry later")
            if wait > 0:
                await asyncio.sleep(wait)
        call.backoff = self.config.retry_backoff_s
        return call

    async def _next_replica(self, call: _Call) -> Replica | None:
        """The replica to try next, or None after a jittered pause once every replica has
        failed this call (a new round); raises the last error after `retry_rounds`."""
        replica = await self._acquire(
            call.pool, call.request.task_id, call.tokens, call.tried, call.deadline, call.last
        )
        if replica is not None:
            return replica
        call.rounds += 1
        if call.rounds >= self.config.retry_rounds and call.last is not None:
            raise call.last  # retryable: the caller (agent, scheduler) decides what next
        call.tried.clear()  # pause, then another round over all replicas
        left = max(call.deadline - time.monotonic(), 0.0)
        await asyncio.sleep(min(jitter.full(call.backoff), left))
        call.backoff = min(call.backoff * 2, 1.0)
        return None

    def _succeeded(
        self, call: _Call, replica: Replica, response: model_pb2.GenerateResponse
    ) -> None:
        """Book a call's answer: replica health, breaker, rate limit, the answer's fields."""
        replica.record(True, self.config.health)
        replica.breaker.success()
        response.replica = replica.id
        response.model_version = replica.version or response.model_version
        now = time.monotonic()
        if response.completion_tokens and self._limiter.enabled:
            self._limiter.charge(call.client, response.completion_tokens, now)
        response.latency_s = max(response.latency_s, now - call.started)

    async def _next_chunk(
        self,
        pool: ModelPool,
        chunks: AsyncIterator[model_pb2.GenerateChunk],
        deadline: float,
        failover: bool,
        last: MegaFlowError | None,
    ) -> model_pb2.GenerateChunk:
        """The backend's next chunk within the call's deadline."""
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                with call_scope(deadline, failover=failover):
                    return await anext(chunks)
        except StopAsyncIteration:
            raise ModelUnavailableError(
                f"model {pool.name!r}: the backend's stream ended without a final chunk"
            ) from None
        except TimeoutError as error:
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"model {pool.name!r}: no answer within {self.config.deadline_s:g}s"
                    + (f" (last error: {last})" if last else "")
                ) from error
            raise

    def _count_failure(self, pool: ModelPool, replica: Replica, error: MegaFlowError) -> None:
        """A retryable failure against `replica` (health and circuit breaker)."""
        opened = replica.breaker.failure()
        if replica.record(False, self.config.health) or opened:
            pool.wake_all()
        if opened:
            log.warning(
                "replica %s: circuit breaker open for %gs after: %s",
                replica.id,
                replica.breaker.config.cooldown_s,
                error,
            )

    async def _acquire(
        self,
        pool: ModelPool,
        task_id: str,
        tokens: int,
        tried: set[str],
        deadline: float,
        last: MegaFlowError | None,
    ) -> Replica | None:
        """A replica to send to, after waiting for capacity; None if all were tried."""
        router = self._routers[pool.name]
        replicas = pool.replicas
        if not tried and len(replicas) == 1:  # the one replica, if it can take it (fast path)
            only = replicas[0]
            if (
                only.state is ReplicaState.ACTIVE
                and only.in_flight < only.capacity
                and time.monotonic() < deadline
            ):
                router.only(only.id, task_id)  # what `router.choose` would do
                return only
        woken = False
        while True:
            if time.monotonic() >= deadline:
                if last is not None:
                    raise last
                raise CapacityError(f"model {pool.name!r}: no capacity within the deadline")
            route = router.choose(pool.views(), task_id=task_id, tokens=tokens, exclude=tried)
            if route.replica is not None:
                return pool.get(route.replica)
            if route.reason == "unavailable":
                if tried:
                    return None
                raise ModelUnavailableError(f"model {pool.name!r} has no active replica")
            if len(pool.waiters) >= self.config.max_queue and not woken:
                raise CapacityError(
                    f"model {pool.name!r}: every replica is saturated and "
                    f"{len(pool.waiters)} requests are already queued"
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if woken:
                pool.waiters.appendleft(waiter)  # keep its place in line
            else:
                pool.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await waiter
            except TimeoutError:
                if last is not None:
                    raise last from None
                raise CapacityError(
                    f"model {pool.name!r}: every replica stayed saturated until the deadline"
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    pool.waiters.remove(waiter)
            woken = True

    # -- versions -------------------------------------------------------------------------

    async def deploy_version(
        self,
        model: str,
        version: str,
        backends: Sequence[ModelBackend],
        *,
        capacity: int | None = None,
        drain_timeout_s: float | None = None,
        specs: Sequence[str] = (),
    ) -> SwapReport:
        """Hot-swap `model` to `version` served by `backends` (warm, shift, drain, retire)."""
        if not version:
            raise InvalidRequestError("deploy_version needs a version tag")
        if not backends:
            raise InvalidRequestError("deploy_version needs at least one backend")
        name = model or self.default
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ModelPool(name)
            pool.breaker = self.config.health.breaker
            self._routers[name] = Router(
                self.config.route_policy, sticky=self.config.sticky, seed=self.config.seed
            )
        if not specs:
            specs = [s for s in (spec_of(b) for b in backends) if s is not None]
        await _preflight(backends, self.config.health.timeout_s)
        self._probes_needed |= any(b.kind != "simulated" for b in backends)
        report = await hot_swap(
            pool,
            version,
            backends,
            capacity=capacity or self.config.replica_capacity,
            health=self.config.health,
            warm_timeout_s=self.config.warm_timeout_s,
            drain_timeout_s=drain_timeout_s or self.config.drain_timeout_s,
            specs=specs,
        )
        self._ensure_health_task()
        return report

    async def update_weights(
        self, request: model_pb2.UpdateWeightsRequest
    ) -> model_pb2.UpdateWeightsResponse:
        """The trainer-facing hot swap: build the new version's backends from specs."""
        pool = self._pool(request.model)
        if not request.version:
            raise InvalidRequestError("UpdateWeightsRequest.version is required")
        if request.replicas > MAX_REPLICAS_PER_SPEC:
            raise InvalidRequestError(
                f"UpdateWeightsRequest.replicas is {request.replicas}: at most "
                f"{MAX_REPLICAS_PER_SPEC} per backend spec"
            )
        if not math.isfinite(request.drain_timeout_s) or request.drain_timeout_s < 0:
            raise InvalidRequestError(
                f"UpdateWeightsRequest.drain_timeout_s must be >= 0, got {request.drain_timeout_s}"
            )
        specs = list(request.backend_specs) or list(pool.specs)
        if not specs:
            raise InvalidRequestError(
                f"model {pool.name!r}: no backend_specs given and none known to reuse"
            )
        template = pool.active()[0].backend if pool.active() else None
        latency = getattr(getattr(template, "latency", None), "config", None)
        backends = []
        for spec in specs:
            for _ in range(max(request.replicas, 1)):
                kwargs: dict[str, object] = {"name": pool.name, "version": request.version}
                if spec == "simulated" and isinstance(latency, LatencyConfig):
                    kwargs["latency"] = latency
                if request.checkpoint:
                    kwargs["checkpoint"] = request.checkpoint
                backends.append(self._factory(spec, **kwargs))
        report = await self.deploy_version(
            pool.name,
            request.version,
            backends,
            drain_timeout_s=request.drain_timeout_s or None,
            specs=specs,
        )
        return model_pb2.UpdateWeightsResponse(
            model=report.model,
            version=report.version,
            previous_version=report.previous_version,
            replicas=list(report.replicas),
            retired=list(report.retired),
            swap_s=report.swap_s,
        )

    # -- health ---------------------------------------------------------------------------

    def _ensure_health_task(self) -> None:
        """Start periodic probes once a replica needs them (simulated ones do not)."""
        if self._health_task is not None or self._closed:
            return
        if not self._probes_needed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside a loop: started by start() or the first request
        self._health_task = loop.create_task(self._health_loop(), name="model-health")

    async def _health_loop(self) -> None:
        health = self.config.health
        while True:
            await asyncio.sleep(health.interval_s)
            try:
                await self.check_health()
            except Exception:  # keep probing: a bad round must not end health checks
                log.exception("health check round failed")

    async def check_health(self) -> None:
        """Probe every active replica once; wake queued requests if any came back."""
        for pool in list(self._pools.values()):
            active = pool.active()
            results = await asyncio.gather(*(r.probe(self.config.health.timeout_s) for r in active))
            changed = [
                r.record(ok, self.config.health) for r, ok in zip(active, results, strict=True)
            ]
            if any(changed):
                pool.wake_all()

    # -- the rest of the contract -----------------------------------------------------------

    async def list_models(
        self, request: model_pb2.ListModelsRequest
    ) -> model_pb2.ListModelsResponse:
        models = []
        for pool in self._pools.values():
            active = pool.active()
            kind = active[0].backend.kind if active else ""
            models.append(
                model_pb2.ModelInfo(name=pool.name, version=pool.current_version(), backend=kind)
            )
        return model_pb2.ListModelsResponse(models=models)

    async def list_replicas(
        self, request: model_pb2.ListReplicasRequest
    ) -> model_pb2.ListReplicasResponse:
        return model_pb2.ListReplicasResponse(
            replicas=[r.info() for r in self.replicas(request.model)]
        )

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        replicas = self.replicas()
        healthy = sum(1 for r in replicas if r.accepting and r.healthy)
        return common_pb2.HealthResponse(
            ok=healthy > 0,
            detail=f"{len(self._pools)} model(s), {healthy}/{len(replicas)} replica(s) healthy",
        )

    def stats(self) -> dict[str, model_pb2.ModelStats]:
        """Per model: mean utilisation and summed load over its active replicas."""
        out = {}
        for name, pool in self._pools.items():
            stats = [r.backend.stats() for r in pool.active()]
            out[name] = model_pb2.ModelStats(
                utilisation=sum(s.utilisation for s in stats) / len(stats) if stats else 0.0,
                in_flight=sum(s.in_flight for s in stats),
                queued=sum(s.queued for s in stats) + len(pool.waiters),
                requests=sum(s.requests for s in stats),
            )
        return out

    async def start(self) -> None:
        self._ensure_health_task()

    async def stop(self, grace_s: float = 0.0) -> None:
        self._closed = True
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pool in self._pools.values():
            pool.wake_all()
            await asyncio.gather(*(r.close() for r in pool.replicas))


async def _preflight(backends: Sequence[ModelBackend], timeout_s: float) -> None:
    """Check every OpenAI-compatible upstream of a new version before it warms: a key
    it rejects or a model it does not serve is an `InvalidRequestError` naming it, at
    once (not a warm-up that times out). One that does not answer yet may be starting:
    the warm-up's health checks wait for it. The new backends are closed if one fails."""
    checks = [
        b.preflight(timeout_s, allow_unreachable=True)
        for b in backends
        if isinstance(b, OpenAIBackend)
    ]
    if not checks:
        return
    try:
        await asyncio.gather(*checks)
    except BaseException:
        for backend in backends:
            with contextlib.suppress(Exception):
                await backend.close()
        raise


async def _close(chunks: AsyncIterator[model_pb2.GenerateChunk]) -> None:
    """Close a backend's stream (stops its generation); its errors are not the caller's."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _loop_time(deadline: float, now: float | None = None) -> float:
    """A `time.monotonic()` deadline on the event loop's clock (`now`: the monotonic
    time, if just read)."""
    if now is None:
        now = time.monotonic()
    return asyncio.get_running_loop().time() + (deadline - now)


class _Call:
    """One `generate` call's state across its tries."""

    __slots__ = (
        "backoff",
        "client",
        "deadline",
        "last",
        "pool",
        "request",
        "rounds",
        "started",
        "tokens",
        "tried",
    )

    def __init__(
        self, pool: ModelPool, request: model_pb2.GenerateRequest, started: float, deadline: float
    ) -> None:
        self.pool = pool
        self.request = request
        self.started = started
        self.deadline = deadline
        self.tokens = estimate_tokens(request)
        self.client = client_key(request)
        self.tried: set[str] = set()
        self.backoff = 0.0
        self.rounds = 0
        self.last: MegaFlowError | None = None

    def failed(self, replica: Replica, error: MegaFlowError) -> None:
        self.last = error
        self.tried.add(replica.id)


def _can_fail_over(pool: ModelPool, replica: Replica, tried: set[str]) -> bool:
    """Whether another healthy replica, not tried yet, could take a retry of this call."""
    return len(pool.replicas) > 1 and any(
        v.healthy and v.accepting and v.id != replica.id and v.id not in tried for v in pool.views()
    )
