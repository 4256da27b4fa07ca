"""From text rows to padded tensors: tokenization, collation with dynamic padding, and the training order.

Rows are dicts with `source` and `target` text (the task registry renders them; `read_source_target` reads a
plain JSONL file of that shape). Tokenization goes through `datasets.map`. Batches are padded to their longest
input (dynamic padding, the fast default) or to `s` (`pad_to_max_length`, the authors' setting); DePT gives the
same loss either way because its offset follows each token's position within its own sequence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
IGNORE = -100


def read_source_target(path: str | Path) -> list[dict]:
    """A JSONL file with `source` and `target` text columns (extra columns are kept)."""
    from pipeline.tasks.readers import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data file {path} does not exist: pass a JSONL file with source/target columns")
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("source"), str) or not isinstance(row.get("target"), str):
            raise PipelineError(f"{path} row {number} needs string 'source' and 'target' fields")
        row.setdefault("id", number - 1)
    if not rows:
        raise PipelineError(f"{path} holds no examples")
    return rows


def tokenize(rows: list[dict], tokenizer, is_encoder_decoder: bool, max_length: int,
             max_target_length: int = 32) -> list[dict]:
    """Token ids per row: `input_ids` (<= max_length), `labels`, and `prompt_ids` (the source alone, for
    generation). Longer sources are truncated with a warning, never an error.

    Runs through `datasets.map`, cached on disk (`pipeline.cache`, tokenized/) keyed by the texts, the tokenizer and
    the lengths, so every later stage, seed and rank reuses the work.
    """
    import datasets

    if not rows:
        raise PipelineError("no examples to tokenize: the data is empty after filtering")
    texts = [{"source": r["source"], "target": r["target"]} for r in rows]
    table = datasets.Dataset.from_list(texts)

    def encode(batch):
        sources = tokenizer(batch["source"], add_special_tokens=True)["input_ids"]
        targets = tokenizer(batch["target"], add_special_tokens=True)["input_ids"]
        out = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": []}
        for src, tgt in zip(sources, targets):
            tgt = tgt[:max_target_length]
            out["truncated"].append(len(src) > max_length)
            if is_encoder_decoder:
                if len(src) > max_length:
                    src = src[: max_length - 1] + src[-1:]  # keep the closing </s>
                out["input_ids"].append(src)
                out["labels"].append(tgt)
                out["prompt_ids"].append(src)
            else:
                src = src[:-1] if src and src[-1] == tokenizer.eos_token_id else src  # the target follows
                room = max_length - len(tgt)
                if room < 1:
                    raise PipelineError(f"max_length {max_length} leaves no room for the source next to a "
                                        f"{len(tgt)}-token target: raise max_length")
                src = src[:room]
                out["input_ids"].append(src + tgt)
                out["labels"].append([IGNORE] * len(src) + tgt)
                out["prompt_ids"].append(src)
        return out

    cache = _cache_file(texts, tokenizer, is_encoder_decoder, max_length, max_target_length)
    encoded = table.map(encode, batched=True, remove_columns=["source", "target"], cache_file_name=cache,
                        load_from_cache_file=True, desc="tokenize")
    result = encoded.to_list()
    truncated = sum(r.pop("truncated") for r in result)
    if truncated:
        log.warning("%d of %d inputs are longer than max_length s=%d and were truncated", truncated, len(rows),
                    max_length)
    return result


def _cache_file(texts, tokenizer, is_encoder_decoder, max_length, max_target_length) -> str:
    import hashlib

    from pipeline.cache import cache_root

    identity = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                           tokenizer.pad_token_id, tokenizer.eos_token_id, is_encoder_decoder, max_length,
                           max_target_length, texts], sort_keys=True)
    folder = cache_root() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.arrow")


def pad(sequences: list[list[int]], value: int, length: int, left: bool) -> torch.Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = seq[:length]
        if left:
            out[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(examples: list[dict], pad_id: int, is_encoder_decoder: bool, pad_to: int | None = None,
            for_generation: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows. Training batches are right-padded to the longest input (or to `pad_to`).

    `for_generation` uses the source alone (`prompt_ids`) and, for decoder-only models, left padding, so that
    every sequence ends where generation starts.
    """
    key = "prompt_ids" if for_generation else "input_ids"
    inputs = [e[key] for e in examples]
    length = pad_to or max(len(x) for x in inputs)
    left = for_generation and not is_encoder_decoder
    input_ids = pad(inputs, pad_id, length, left)
    attention_mask = pad([[1] * len(x) for x in inputs], 0, length, left)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not for_generation:
        labels = [e["labels"] for e in examples]
        label_length = max(len(x) for x in labels) if is_encoder_decoder else length
        batch["labels"] = pad(labels, IGNORE, label_length, left=False)
    return batch


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch_size: int = 1) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same data.

    With `lengths` (length-grouped batches), rows of similar length end up in the same batch: the shuffled order is
    cut into chunks of 50 batches, each chunk sorted by length, and the batches then shuffled again, so that
    dynamic padding wastes little while batch composition stays random.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None or batch_size <= 1:
        return order
    chunk = batch_size * 50
    grouped = []
    for start in range(0, n, chunk):
        grouped += sorted(order[start:start + chunk], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def global_batch(n: int, batch_size: int, step: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """Row indices of the global batch taken at optimizer step `step` (epochs wrap around)."""
    per_epoch = max(n // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch, lengths, batch_size)
    if n < batch_size:  # tiny data (k-shot): repeat the epoch to fill a batch
        order = (order * (batch_size // n + 1))
    return order[within * batch_size:(within + 1) * batch_size]
