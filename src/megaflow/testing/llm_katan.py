"""Start and stop a real `llm-katan` server (echo backend) for tests and benchmarks.

llm-katan (https://pypi.org/project/llm-katan/, pinned 0.22.0 in the dev extras) is a
third-party OpenAI-compatible server. Its `echo` backend loads no model and needs no
network: it answers every chat with one assistant message

    [echo] model=<name> host=<host>:<port> time=... messages=N max_tokens=M temperature=T
    User: <the last user message>

with word-count "token" usage, and it can inject faults (`--error-rate` -> HTTP 500,
`--latency-ms`, `--timeout-after` -> 504, `--rate-limit-after` -> 429,
`--max-inflight` -> 503). Quirks worth knowing:

* Every OpenAI route (`/v1/chat/completions`, `/v1/models`) answers 401 unless an
  `Authorization` header is present; the value is only checked with `--validate-keys`.
  Use `server.api_key` (any non-empty string works).
* When a request carries `tools`, the echo answer is always a call of the *first* tool
  with dummy arguments made from its schema (`finish_reason="tool_calls"`, content null).
* `--max-concurrent` defaults to 1, which serialises requests (and their injected
  latency); this helper passes a large value instead.
* It writes persistent stats to ~/.llm-katan/stats.json by default; this helper turns
  that off (`--stats-file ""`), and passes `--device cpu` so nothing probes for torch.

Usage:

    async with LlmKatanServer(latency_ms=50) as server:
        backend = OpenAIBackend(OpenAIBackendConfig(base_url=server.base_url,
                                                    model=server.model,
                                                    api_key=server.api_key))

The server runs in its own process group; `stop()` ends it as every test process ends
(:func:`megaflow.testing.processes.stop_group`: SIGTERM, then SIGKILL of the group after
`stop_grace_s`, reaped), so no process is left behind. Servers still
running when the interpreter exits are killed by an atexit hook.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from megaflow.testing.processes import spawn, stop_group
from megaflow.testing.server import free_port

__all__ = ["LlmKatanError", "LlmKatanServer", "find_llm_katan", "free_port"]

DEFAULT_MODEL = "katan-echo"
DEFAULT_API_KEY = "llm-katan-openai-key"

_live: weakref.WeakSet[LlmKatanServer] = weakref.WeakSet()


class LlmKatanError(RuntimeError):
    """The llm-katan server could not be found, started, or did not become ready."""


def find_llm_katan() -> list[str]:
    """The command that runs llm-katan: the script next to sys.executable, on PATH, or -m."""
    beside = Path(sys.executable).parent / "llm-katan"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("llm-katan")
    if on_path:
        return [on_path]
    try:
        import importlib.util

        if importlib.util.find_spec("llm_katan") is not None:
            return [sys.executable, "-m", "llm_katan.cli"]
    except (ImportError, ValueError):
        pass
    raise LlmKatanError(
        "llm-katan is not installed: no llm-katan next to "
        f"{sys.executable}, none on PATH, and no llm_katan module (pip install llm-katan)"
    )


def _probe(url: str, timeout_s: float) -> bool:
    """True if `url` answers HTTP 200 within `timeout_s`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class LlmKatanServer:
    """One `llm-katan --backend echo` subprocess on 127.0.0.1 and a free port."""

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        port: int | None = None,
        host: str = "127.0.0.1",
        api_key: str = DEFAULT_API_KEY,
        error_rate: float = 0.0,
        latency_ms: int = 0,
        timeout_after: int = 0,
        rate_limit_after: int = 0,
        max_inflight: int = 0,
        max_concurrent: int = 100_000,
        max_tokens: int | None = None,
        workers: int = 1,
        dashboard: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 30.0,
        stop_grace_s: float = 3.0,
        command: Sequence[str] | None = None,
    ) -> None:
        """Configure (not start) a server.

        `error_rate` (0..1, HTTP 500), `latency_ms`, `timeout_after` (504 after N requests),
        `rate_limit_after` (429 after N) and `max_inflight` (503 above N concurrent) are
        llm-katan's fault injection, echo backend only; 0 disables each. `command` replaces
        the llm-katan executable (default: `find_llm_katan()`).
        """
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {error_rate}")
        self.model = model
        self.host = host
        self.api_key = api_key
        self.error_rate = error_rate
        self.latency_ms = latency_ms
        self.timeout_after = timeout_after
        self.rate_limit_after = rate_limit_after
        self.max_inflight = max_inflight
        self.max_concurrent = max_concurrent
        self.max_tokens = max_tokens
        self.workers = workers
        self.dashboard = dashboard
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._command = list(command) if command is not None else None
        self._fixed_port = port
        self.port = port or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """e.g. "http://127.0.0.1:43123" (no /v1; OpenAIBackendConfig accepts both)."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """The OpenAI API root, e.g. "http://127.0.0.1:43123/v1"."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        """The full command line for the current port."""
        args = [
            *(self._command if self._command is not None else find_llm_katan()),
            "--backend",
            "echo",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--stats-file",
            "",
            "--log-level",
            "warning",
            "--max-concurrent",
            str(self.max_concurrent),
            "--workers",
            str(self.workers),
        ]
        if not self.dashboard:
            args.append("--disable-dashboard")
        if self.max_tokens is not None:
            args += ["--max-tokens", str(self.max_tokens)]
        if self.error_rate:
            args += ["--error-rate", repr(self.error_rate)]
        for flag, value in (
            ("--latency-ms", self.latency_ms),
            ("--timeout-after", self.timeout_after),
            ("--rate-limit-after", self.rate_limit_after),
            ("--max-inflight", self.max_inflight),
        ):
            if value:
                args += [flag, str(value)]
        return args + self.extra_args

    def log_text(self, limit: int = 4000) -> str:
        """The tail of the server's combined stdout/stderr so far."""
        if self._log_path is None:
            return ""
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", errors="replace")

    # -- lifecycle (blocking core) ------------------------------------------------------

    def _spawn(self) -> None:
        if self._fixed_port is None:
            self.port = free_port(self.host)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_KATAN_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        fd, name = tempfile.mkstemp(prefix="llm-katan-", suffix=".log")
        self._log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        try:
            self._proc = spawn(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            self._cleanup_log()
            raise LlmKatanError(f"cannot run {self.argv()[0]}: {exc}") from exc
        _live.add(self)

    def _startup_failure(self) -> str | None:
        """Why startup failed, if the process already exited."""
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return None
        return f"llm-katan exited with status {code} during startup"

    def _port_clash(self) -> bool:
        text = self.log_text().lower()
        return self._fixed_port is None and ("address already in use" in text or "errno 98" in text)

    def _fail(self, why: str) -> LlmKatanError:
        log = self.log_text()
        self._terminate()
        return LlmKatanError(f"{why} ({' '.join(self.argv())}); server output:\n{log or '(none)'}")

    def start_sync(self) -> Self:
        """Start the server and block until it answers GET /health (or raise)."""
        try:
            return self._start_sync()
        except BaseException:
            self._terminate()
            raise

    def _start_sync(self) -> Self:
        for attempt in range(3):
            self._spawn()
            deadline = time.monotonic() + self.startup_timeout_s
            while True:
                why = self._startup_failure()
                if why is not None:
                    if self._port_clash() and attempt < 2:
                        self._terminate()
                        break
                    raise self._fail(why)
                if _probe(self.base_url + "/health", 1.0):
                    return self
                if time.monotonic() > deadline:
                    raise self._fail(f"llm-katan did not answer in {self.startup_timeout_s:g}s")
                time.sleep(0.05)
        raise LlmKatanError("unreachable")  # pragma: no cover

    def _terminate(self) -> None:
        """SIGTERM, SIGKILL of the group after the grace period, reap, drop the log."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                stop_group(proc, self.stop_grace_s)
            finally:
                _live.discard(self)
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def stop_sync(self) -> None:
        """Stop the server (idempotent); blocks up to `stop_grace_s` + a few seconds."""
        self._terminate()

    # -- asyncio interface ----------------------------------------------------------------

    async def start(self) -> Self:
        """Start the server without blocking the event loop; returns once it is ready."""
        try:
            return await self._start()
        except BaseException:  # cancelled or timed out by the caller: leave nothing behind
            await asyncio.to_thread(self._terminate)
            raise

    async def _start(self) -> Self:
        for attempt in range(3):
            self._spawn()
            deadline = time.monotonic() + self.startup_timeout_s
            while True:
                why = self._startup_failure()
                if why is not None:
                    if self._port_clash() and attempt < 2:
                        await asyncio.to_thread(self._terminate)
                        break
                    raise await asyncio.to_thread(self._fail, why)
                if await asyncio.to_thread(_probe, self.base_url + "/health", 1.0):
                    return self
                if time.monotonic() > deadline:
                    why = f"llm-katan did not answer in {self.startup_timeout_s:g}s"
                    raise await asyncio.to_thread(self._fail, why)
                await asyncio.sleep(0.05)
        raise LlmKatanError("unreachable")  # pragma: no cover

    async def stop(self) -> None:
        """Stop the server without blocking the event loop (idempotent)."""
        await asyncio.to_thread(self._terminate)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        return self.start_sync()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"LlmKatanServer({self.base_url}, model={self.model!r}, {state})"


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop_grace_s = min(server.stop_grace_s, 1.0)
            server.stop_sync()
