"""From text rows to padded tensors: tokenization, collation with dynamic padding, and the training order.

Rows are dicts with `source` and `target` text (the task registry renders them; `read_source_target` reads a
plain JSONL file of that shape). Tokenization goes through `datasets.map`. Batches are padded to their longest
input (dynamic padding, the fast default) or to `s` (`pad_to_max_length`, the authors' setting); DePT gives the
same loss either way because its offset follows each token's position within its own sequence.

Sequences (see `tokenize`): T5 encodes `source </s>` and decodes `target </s>`; a decoder-only model (LLaMA)
trains on `<s> source Label : target </s>` with the loss on `target </s>` only, and generates greedily from
`<s> source Label :`, so a model that learned the format emits the label and stops at EOS. With the real
LLaMA-2 tokenizer, source "sentence: the cat" and target "1" give

    input_ids  [1, 10541, 29901, 278, 6635, 15796, 584, 29871, 29896, 2]
    labels     [-100, -100, -100, -100, -100, -100, -100, 29871, 29896, 2]
    prompt_ids [1, 10541, 29901, 278, 6635, 15796, 584]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
IGNORE = -100
# The authors' separator between source and target for decoder-only models (ZhengxiangShi/DePT train.py,
# decoder_preprocess_function: f"{source} Label : "). T5 needs none: the target goes to the decoder.
DECODER_SEPARATOR = " Label : "
FORMAT_VERSION = 2  # bump when the token layout changes: the tokenization cache keys on it


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


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else unk, else EOS (LLaMA ships without a pad token).

    Pads are masked out of attention and labels, so any id works; unk keeps EOS free of a second meaning.
    """
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise PipelineError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, unk or eos token: "
                        "set tokenizer.pad_token before training")


def split_separator(separator: str) -> tuple[str, str]:
    """(the separator without its trailing whitespace, that whitespace): the prompt ends with the first part and
    the target is tokenized with the second in front, so a SentencePiece target gets its natural leading-space
    pieces ("positive" -> "\u2581positive") and prompt + target is exactly the tokenization of the whole text."""
    core = separator.rstrip()
    return core, separator[len(core):]


def _appends_eos(tokenizer) -> bool:
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1:] == [eos]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(rows: list[dict], tokenizer, is_encoder_decoder: bool, max_length: int,
             max_target_length: int = 32, separator: str = DECODER_SEPARATOR) -> list[dict]:
    """Token ids per row: `input_ids` (<= max_length), `labels`, and `prompt_ids` (what generation starts from).

    Encoder-decoder (T5): `input_ids` = the source with its closing EOS, `labels` = the target with its EOS (both
    keep the EOS when truncated). Decoder-only (LLaMA): the authors' sequence

        input_ids  = [BOS] source separator target [EOS]
        labels     = -100 over [BOS] source separator, then target [EOS]
        prompt_ids = [BOS] source separator          (greedy generation starts here and should stop at EOS)

    with `separator` " Label : " by default (the authors' LLaMA code). The target is tokenized without special
    tokens (no second BOS) after the separator's trailing whitespace, and EOS is appended so the model learns to
    stop. A long source is truncated from its end; the separator and the target are kept.
    Truncation never raises unless s cannot hold the separator and target at all; it is logged as a warning.

    Runs through `datasets.map`, cached on disk (`pipeline.cache`, tokenized/) keyed by the texts, the tokenizer,
    the lengths and the separator, so every later stage, seed and rank reuses the work.
    """
    import datasets

    if not rows:
        raise PipelineError("no examples to tokenize: the data is empty after filtering")
    if max_target_length < 1:
        raise PipelineError(f"max_target_length must be at least 1, got {max_target_length}")
    texts = [{"source": r["source"], "target": r["target"]} for r in rows]
    table = datasets.Dataset.from_list(texts)
    eos = tokenizer.eos_token_id
    strip_eos = _appends_eos(tokenizer)
    core, gap = split_separator(separator)

    def cut_target(ids: list[int], has_eos: bool) -> list[int]:
        if len(ids) <= max_target_length:
            return ids
        return ids[: max_target_length - 1] + ids[-1:] if has_eos else ids[:max_target_length]

    def encode_seq2seq(batch):
        sources = tokenizer(batch["source"], add_special_tokens=True)["input_ids"]
        targets = tokenizer(batch["target"], add_special_tokens=True)["input_ids"]
        out = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": [], "target_truncated": []}
        for src, tgt in zip(sources, targets):
            out["truncated"].append(len(src) > max_length)
            out["target_truncated"].append(len(tgt) > max_target_length)
            if len(src) > max_length:
                src = src[: max_length - 1] + src[-1:] if strip_eos else src[:max_length]  # keep the closing </s>
            tgt = cut_target(tgt, strip_eos)
            out["input_ids"].append(src)
            out["labels"].append(tgt)
            out["prompt_ids"].append(src)
        return out

    def encode_decoder(batch):
        prompts = tokenizer([s + core for s in batch["source"]], add_special_tokens=True)["input_ids"]
        targets = tokenizer([gap + t if t else "" for t in batch["target"]], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "prompt_ids": [], "truncated": [], "target_truncated": []}
        for source, prompt, tgt in zip(batch["source"], prompts, targets):
            if strip_eos and prompt and prompt[-1] == eos:
                prompt = prompt[:-1]  # the target follows the source
            tgt = tgt + [eos] if eos is not None else tgt
            out["target_truncated"].append(len(tgt) > max_target_length)
            tgt = cut_target(tgt, eos is not None)
            room = max_length - len(tgt)
            truncated = len(prompt) > room
            if truncated:
                alone = tokenizer(source, add_special_tokens=True)["input_ids"]
                alone = alone[:-1] if strip_eos and alone and alone[-1] == eos else alone
                tail = len(prompt) - _common_prefix(prompt, alone)  # the separator's tokens
                if room - tail < 1:
                    raise PipelineError(f"max_length {max_length} leaves no room for the source next to the "
                                        f"{tail}-token separator {separator!r} and a {len(tgt)}-token target: "
                                        "raise max_length")
                prompt = prompt[: room - tail] + prompt[len(prompt) - tail:]
            out["truncated"].append(truncated)
            out["input_ids"].append(prompt + tgt)
            out["labels"].append([IGNORE] * len(prompt) + tgt)
            out["prompt_ids"].append(prompt)
        return out

    encode = encode_seq2seq if is_encoder_decoder else encode_decoder
    cache = _cache_file(texts, tokenizer, is_encoder_decoder, max_length, max_target_length, separator)
    encoded = table.map(encode, batched=True, remove_columns=["source", "target"], cache_file_name=cache,
                        load_from_cache_file=True, desc="tokenize")
    result = encoded.to_list()
    truncated = sum(r.pop("truncated") for r in result)
    target_truncated = sum(r.pop("target_truncated") for r in result)
    if truncated:
        log.warning("%d of %d inputs are longer than max_length s=%d and were truncated", truncated, len(rows),
                    max_length)
    if target_truncated:
        log.warning("%d of %d targets are longer than max_target_length %d and were truncated (EOS kept)",
                    target_truncated, len(rows), max_target_length)
    return result


def _cache_file(texts, tokenizer, is_encoder_decoder, max_length, max_target_length, separator) -> str:
    import hashlib

    from pipeline.cache import cache_root

    identity = json.dumps([FORMAT_VERSION, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                           len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           is_encoder_decoder, max_length, max_target_length, separator, texts], sort_keys=True)
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
