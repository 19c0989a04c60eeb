"""A tiny GPT-2 and byte-level BPE tokenizer, trained at test time on CPU.

No pretrained weights can be fetched on our machines, yet the `transformers` backend
must be exercised through a real model: real tokenizer, real chat template, real
`generate`. `build_tiny_lm(out_dir)` trains both in a few seconds on a small synthetic
corpus of agent-like chats and saves them with `save_pretrained`, so
`TransformersBackend` loads them like any Hugging Face checkpoint.

The tokenizer's chat template is ChatML-like:

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

`<|im_end|>` is the end-of-sequence token; `<pad>` is a separate padding token, so a
batch's padding is never mistaken for a generated end of turn.

`cached_tiny_lm(root)` builds once per process per `root` (tests call it from a
session-scoped fixture). Needs the `transformers` extra (torch, transformers,
tokenizers); everything is imported lazily.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CHAT_TEMPLATE", "TinyLMConfig", "build_tiny_lm", "cached_tiny_lm"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "let me look at the file first . I will run the tests now . the bug is in the "
    "function , change the line and submit . reading src / module . py to find the "
    "faulty return value ; edit_file path old new . bash command cat grep python -m "
    "unittest ok failed passed error"
).split()
_ASSISTANT = [
    "Let me look at `{f}`.",
    "The bug is in `{f}`: I'll change the return value.",
    "Now let me run the visible tests.",
    "The tests pass. Submitting.",
    '{{"name": "bash", "arguments": {{"command": "cat {f}"}}}}',
]


class TinyLMConfig(BaseModel):
    """Size and training budget of the tiny model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(default=512, ge=300, description="BPE vocabulary size (incl. bytes).")
    n_layer: int = Field(default=2, ge=1, description="Transformer blocks.")
    n_embd: int = Field(default=64, ge=8, description="Hidden size.")
    n_head: int = Field(default=2, ge=1, description="Attention heads.")
    n_positions: int = Field(default=1024, ge=64, description="Longest context, in tokens.")
    train_steps: int = Field(default=150, ge=1, description="Most optimiser steps.")
    train_seconds: float = Field(default=5.0, gt=0, description="Training stops after this.")
    corpus_size: int = Field(default=400, ge=10, description="Synthetic chats to train on.")
    seed: int = Field(default=0, description="Seeds the corpus, weights and training.")


def _corpus(config: TinyLMConfig) -> list[list[dict[str, str]]]:
    rng = random.Random(config.seed)
    chats = []
    for _ in range(config.corpus_size):
        f = f"src/{rng.choice(['util', 'core', 'app'])}_{rng.randrange(100)}.py"
        user = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(5, 20)))
        chats.append(
            [
                {"role": "system", "content": "You are a careful software engineer."},
                {"role": "user", "content": f"Fix `{f}`: {user}"},
                {"role": "assistant", "content": rng.choice(_ASSISTANT).format(f=f)},
            ]
        )
    return chats


def _render(chat: list[dict[str, str]]) -> str:
    """What `CHAT_TEMPLATE` renders for `chat` (used before a tokenizer exists)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)


def build_tiny_lm(out_dir: Path, config: TinyLMConfig | None = None) -> Path:
    """Train the tokenizer and model, save both into `out_dir`, return `out_dir`."""
    torch: Any = importlib.import_module("torch")
    tokenizers: Any = importlib.import_module("tokenizers")
    transformers: Any = importlib.import_module("transformers")

    config = config or TinyLMConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    chats = _corpus(config)
    texts = [_render(chat) for chat in chats]

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=config.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the `tokenizers.Tokenizer` inside
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"

    torch.manual_seed(config.seed)
    model_config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
    model_config.megaflow_version = f"tiny-gpt2-{digest}"
    model = transformers.GPT2LMHeadModel(model_config)
    _train(model, tokenizer, texts, config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _train(model: Any, tokenizer: Any, texts: list[str], config: TinyLMConfig) -> None:
    import torch

    rng = random.Random(config.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    deadline = time.monotonic() + config.train_seconds
    for _ in range(config.train_steps):
        if time.monotonic() > deadline:
            break
        batch = tokenizer(
            rng.sample(texts, 16),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=128,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


_cache: dict[Path, Path] = {}
_cache_lock = threading.Lock()


def cached_tiny_lm(root: Path, config: TinyLMConfig | None = None) -> Path:
    """`build_tiny_lm(root / "tiny-lm")` once per process per `root`."""
    with _cache_lock:
        if root not in _cache:
            _cache[root] = build_tiny_lm(root / "tiny-lm", config)
        return _cache[root]
