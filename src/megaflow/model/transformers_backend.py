"""`TransformersBackend`: a local Hugging Face causal LM, batched, with exact token ids.

Loads a model and tokenizer from a directory (`from_pretrained`, local files only) onto
the GPU if there is one, else the CPU. torch and transformers are imported when the
backend loads (the `transformers` extra), never when this module is imported.

Prompt: the tokenizer's chat template (`apply_chat_template(add_generation_prompt=True)`);
a tokenizer without one gets the fallback `"{role}: {content}\\n"` per message followed
by `"assistant: "`. Tool results are rendered as role `tool`. A prompt longer than the
context allows (`n_positions - max_tokens`) is cut from the left; the ids actually fed to
the model are what `prompt_token_ids` reports.

Batching: `generate` puts the request on an asyncio queue; one worker collects up to
`max_batch` requests, waiting at most `batch_wait_s` after the first, and runs one
`model.generate` per temperature group in a worker thread, with left padding. Each
row's `max_new_tokens` is the batch's largest; a row is cut back to its own limit
afterwards (what an autoregressive sampler produced for a prefix does not depend on
what came after it), with `finish_reason="length"`.

Token fidelity: `completion_token_ids` are exactly the ids `generate` produced for the
row, up to and including the first end-of-sequence token (never re-tokenised); the
message text is `tokenizer.decode` of those ids with special tokens skipped.
`completion_logprobs[i]` is the log-probability of token i under the model's raw
next-token distribution (log-softmax of the unprocessed logits, i.e. temperature 1, no
top-k/top-p), one per completion token.

Tool calls: if the text contains a JSON object `{"name": ..., "arguments": {...}}`
(optionally inside `<tool_call>...</tool_call>`), it becomes a `ToolCall`; the message
content stays the full decoded text so that it matches the token ids exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.v1 import common_pb2, model_pb2

__all__ = ["TransformersBackend", "TransformersBackendConfig", "parse_tool_calls"]

log = logging.getLogger(__name__)

_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


class TransformersBackendConfig(BaseModel):
    """Where the model lies and how requests are batched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="Directory of a saved causal LM and its tokenizer.")
    name: str = Field(default="", description="Model name in MegaFlow. Empty: the directory name.")
    version: str = Field(
        default="",
        description=(
            "Reported as model_version. Empty: the model config's `megaflow_version`, else "
            "a digest of config.json."
        ),
    )
    device: str = Field(
        default="auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:N]'."
    )
    max_batch: int = Field(default=16, ge=1, description="Most requests in one generate call.")
    batch_wait_s: float = Field(
        default=0.005, ge=0, description="How long a batch waits for more requests."
    )
    default_max_tokens: int = Field(
        default=64, ge=1, description="Completion limit for requests with max_tokens=0."
    )
    max_new_tokens_cap: int = Field(
        default=256, ge=1, description="Hard cap on generated tokens per request."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of one request, queueing included."
    )
    seed: int | None = Field(default=None, description="Seeds torch once at load, if set.")


def parse_tool_calls(text: str, call_prefix: str) -> list[common_pb2.ToolCall]:
    """A tool call written as JSON in `text`, if there is one."""
    inner = text
    if "<tool_call>" in text:
        inner = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    match = _JSON_OBJECT.search(inner)
    if match is None:
        return []
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return []
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        arguments_json = arguments
    else:
        arguments_json = json.dumps(arguments, sort_keys=True)
    return [
        common_pb2.ToolCall(id=f"{call_prefix}_0", name=data["name"], arguments_json=arguments_json)
    ]


@dataclass
class _Pending:
    request: model_pb2.GenerateRequest
    prompt_ids: list[int]
    max_new: int
    enqueued: float
    future: asyncio.Future[model_pb2.GenerateResponse] = field(repr=False)


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    logprobs: list[float]
    finish: str


class TransformersBackend:
    """`ModelBackend` over a local Hugging Face causal LM (see the module docstring)."""

    kind = "transformers"

    def __init__(self, config: TransformersBackendConfig) -> None:
        self.config = config
        self.name = config.name or config.path.name
        self.version = config.version
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._load_lock: asyncio.Lock | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0
        self._requests = 0
        self._batches = 0
        self._busy_s = 0.0
        self._started = time.monotonic()

    # -- loading --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (after `load()`)."""
        if self._tokenizer is None:
            raise ModelUnavailableError(f"model {self.name!r} is not loaded yet")
        return self._tokenizer

    async def load(self) -> None:
        """Load model and tokenizer (in a thread); `generate` calls this on first use."""
        if self._model is not None:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self._model is None:
                await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        try:
            torch: Any = importlib.import_module("torch")
            transformers: Any = importlib.import_module("transformers")
        except ImportError as error:
            raise ModelUnavailableError(
                "the transformers backend needs the `transformers` extra "
                f"(torch, transformers): {error}"
            ) from error
        path = self.config.path
        if not (path / "config.json").is_file():
            raise InvalidRequestError(f"{path} holds no Hugging Face model (no config.json)")
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        model.to(device)
        model.eval()
        if not self.version:
            self.version = str(
                getattr(model.config, "megaflow_version", "")
                or "hf-" + hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12]
            )
        self._device = device
        self._tokenizer = tokenizer
        self._model = model
        log.info("loaded %s (%s) on %s", self.name, self.version, device)

    # -- prompts --------------------------------------------------------------------

    def render(self, messages: list[common_pb2.ChatMessage]) -> str:
        """The prompt text: the chat template, or the documented fallback."""
        chat = [{"role": m.role, "content": _content(m)} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            )
        return "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant: "

    def _prompt_ids(self, request: model_pb2.GenerateRequest, max_new: int) -> list[int]:
        ids: list[int] = self.tokenizer(
            self.render(list(request.messages)), add_special_tokens=False
        )["input_ids"]
        limit = int(getattr(self._model.config, "n_positions", 0) or 0) or int(
            getattr(self._model.config, "max_position_embeddings", 0) or 0
        )
        if limit and len(ids) + max_new > limit:
            ids = ids[len(ids) + max_new - limit :]
        return ids

    # -- ModelBackend ---------------------------------------------------------------

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        """Queue the request for the next batch and wait for its answer."""
        if self._closed:
            raise ModelUnavailableError(f"transformers backend {self.name!r} is closed")
        if not request.messages:
            raise InvalidRequestError("generate needs at least one message")
        await self.load()
        max_new = min(
            request.max_tokens or self.config.default_max_tokens, self.config.max_new_tokens_cap
        )
        prompt_ids = await asyncio.to_thread(self._prompt_ids, request, max_new)
        pending = _Pending(
            request,
            prompt_ids,
            max_new,
            time.monotonic(),
            asyncio.get_running_loop().create_future(),
        )
        self._ensure_worker().put_nowait(pending)
        self._requests += 1
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                return await pending.future
        except TimeoutError as error:
            raise ModelUnavailableError(
                f"{self.name}: no answer within {self.config.request_timeout_s:g}s"
            ) from error
        finally:
            self._in_flight -= 1
            pending.future.cancel()  # no-op once answered; else the batch skips it

    def _ensure_worker(self) -> asyncio.Queue[_Pending]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = self._queue or asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run_batches())
        return self._queue

    async def _run_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.config.batch_wait_s
            while len(batch) < self.config.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:  # asyncio.timeout: 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]
            if batch:
                await self._serve(batch)

    async def _serve(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        groups: dict[float, list[_Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.request.temperature, []).append(pending)
        for temperature, group in groups.items():
            try:
                responses = await asyncio.to_thread(self._serve_sync, group, temperature, started)
            except Exception as error:  # a failed batch fails its requests, not the worker
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(
                            ModelUnavailableError(f"{self.name}: generate failed: {error}")
                        )
                continue
            for pending, response in zip(group, responses, strict=True):
                if not pending.future.done():
                    pending.future.set_result(response)
        self._batches += 1
        self._busy_s += time.monotonic() - started

    def _serve_sync(
        self, group: list[_Pending], temperature: float, started: float
    ) -> list[model_pb2.GenerateResponse]:
        """Generate for one temperature group and build the answers (in a worker thread)."""
        rows = self._generate_sync(group, temperature)
        return [self._response(p, row, started) for p, row in zip(group, rows, strict=True)]

    def _generate_sync(self, group: list[_Pending], temperature: float) -> list[_Row]:
        import torch

        tokenizer, model = self._tokenizer, self._model
        width = max(len(p.prompt_ids) for p in group)
        pad = int(tokenizer.pad_token_id)
        input_ids = torch.tensor(
            [[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in group],
            device=self._device,
        )
        mask = torch.tensor(
            [[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in group],
            device=self._device,
        )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(p.max_new for p in group),
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_logits=True,
                **sampling,
            )
            new = out.sequences[:, width:]
            logits = torch.stack(out.logits, dim=1).float()  # (batch, steps, vocab)
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(-1, new[:, : logprobs.shape[1]].unsqueeze(-1)).squeeze(-1)
        eos = tokenizer.eos_token_id
        rows = []
        for i, pending in enumerate(group):
            ids = [int(t) for t in new[i].tolist()]
            end = ids.index(eos) + 1 if eos in ids else len(ids)
            finish = "stop" if eos in ids[:end] else "length"
            if end > pending.max_new:
                end, finish = pending.max_new, "length"
            rows.append(_Row(ids[:end], [float(x) for x in chosen[i, :end].tolist()], finish))
        return rows

    def _response(self, pending: _Pending, row: _Row, started: float) -> model_pb2.GenerateResponse:
        text = self._tokenizer.decode(
            row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        prefix = (
            "call_"
            + hashlib.sha256(f"{pending.request.task_id}:{pending.enqueued}".encode()).hexdigest()[
                :12
            ]
        )
        calls = parse_tool_calls(text, prefix)
        now = time.monotonic()
        return model_pb2.GenerateResponse(
            message=common_pb2.ChatMessage(role="assistant", content=text, tool_calls=calls),
            model=self.name,
            model_version=self.version,
            prompt_tokens=len(pending.prompt_ids),
            completion_tokens=len(row.ids),
            finish_reason="tool_calls" if calls else row.finish,
            queue_s=started - pending.enqueued,
            latency_s=now - pending.enqueued,
            prompt_token_ids=pending.prompt_ids,
            completion_token_ids=row.ids,
            completion_logprobs=row.logprobs,
        )

    def stats(self) -> model_pb2.ModelStats:
        """Busy fraction of wall time since start, in-flight and queued requests."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return model_pb2.ModelStats(
            utilisation=min(1.0, self._busy_s / elapsed),
            in_flight=self._in_flight,
            queued=self._queue.qsize() if self._queue is not None else 0,
            requests=self._requests,
        )

    @property
    def batches(self) -> int:
        """How many batches (groups of requests served together) have run."""
        return self._batches

    async def close(self) -> None:
        """Stop the batch worker; waiting requests fail with `ModelUnavailableError`."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ModelUnavailableError(f"{self.name} closed"))
        self._model = None


def _content(message: common_pb2.ChatMessage) -> str:
    """A message's text for the template; an assistant's tool calls are appended as JSON."""
    parts = [message.content]
    for call in message.tool_calls:
        if call.name in message.content:  # our own parsed call: already in the text
            continue
        try:
            arguments: Any = json.loads(call.arguments_json or "{}")
        except ValueError:
            arguments = call.arguments_json
        parts.append(json.dumps({"name": call.name, "arguments": arguments}))
    return "\n".join(p for p in parts if p)
