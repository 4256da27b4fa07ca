"""From text rows to padded tensors: tokenization, collation with dynamic padding, and the training order.

Rows are dicts with `source` and `target` text (the task registry renders them; `read_source_target` reads a
plain JSONL file of that shape), or a memory-mapped `datasets.Dataset` with those columns (`pipeline.tasks.tables`:
what a training job passes, so that no rank holds a large split as Python objects). Tokenization goes through
`datasets.map` into a cache file; training reads its rows from that file a batch at a time (`rows_at`) and groups
them by its `length` column. Batches are padded to their longest input (dynamic padding, the fast default) or to
`s` (`pad_to_max_length`, the authors' setting); DePT gives the same loss either way because its offset follows
each token's position within its own sequence.

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

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.tasks.tables import is_table

log = logging.getLogger(__name__)
IGNORE = -100
# The authors' separator between source and target for decoder-only models (ZhengxiangShi/DePT train.py,
# decoder_preprocess_function: f"{source} Label : "). T5 needs none: the target goes to the decoder.
DECODER_SEPARATOR = " Label : "
FORMAT_VERSION = 2  # bump when the token layout changes: the tokenization cache keys on it
STORED_COLUMNS = 2  # bump when the columns stored next to the token ids change (2: `length`)


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


def source_target_table(path: str | Path):
    """`read_source_target` as a memory-mapped `datasets.Dataset` (`id`, `source`, `target`; other columns are not
    kept), written once per file content to the cache in one streaming pass."""
    from pipeline.tasks import tables
    from pipeline.tasks.readers import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data file {path} does not exist: pass a JSONL file with source/target columns")
    key = tables.digest("source_target", tables.TABLE_VERSION, tables.file_digest(path))
    target_path = tables.cache_dir("rendered") / f"file-{key}.arrow"

    def build(target: Path) -> None:
        import pyarrow as pa

        with tables.RowWriter(
            target, key, ["id", "source", "target"], {"source": pa.string(), "target": pa.string()}
        ) as writer:
            for number, row in enumerate(iter_jsonl(path), start=1):
                if not isinstance(row.get("source"), str) or not isinstance(row.get("target"), str):
                    raise PipelineError(f"{path} row {number} needs string 'source' and 'target' fields")
                writer.add({"id": row.get("id", number - 1), "source": row["source"], "target": row["target"]})
            if not writer.rows:
                raise PipelineError(f"{path} holds no examples")
            writer.commit()

    tables.build_once(target_path, build)
    return tables.open_table(target_path)


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else unk, else EOS (LLaMA ships without a pad token).

    Pads are masked out of attention and labels, so any id works; unk keeps EOS free of a second meaning.
    """
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise PipelineError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, unk or eos token: "
        "set tokenizer.pad_token before training"
    )


def split_separator(separator: str) -> tuple[str, str]:
    """(the separator without its trailing whitespace, that whitespace): the prompt ends with the first part and
    the target is tokenized with the second in front, so a SentencePiece target gets its natural leading-space
    pieces ("positive" -> "\u2581positive") and prompt + target is exactly the tokenization of the whole text."""
    core = separator.rstrip()
    return core, separator[len(core) :]


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


def tokenize(
    rows,
    tokenizer,
    is_encoder_decoder: bool,
    max_length: int,
    max_target_length: int = 32,
    separator: str = DECODER_SEPARATOR,
) -> list[dict]:
    """Token ids per row as a list of dicts `{input_ids, labels, prompt_ids}` (see `tokenize_table`, which this
    reads back): for small row sets (evaluation, inference, tests)."""
    table = tokenize_table(rows, tokenizer, is_encoder_decoder, max_length, max_target_length, separator)
    return table.remove_columns(["length"]).to_list()


def tokenize_table(
    rows,
    tokenizer,
    is_encoder_decoder: bool,
    max_length: int,
    max_target_length: int = 32,
    separator: str = DECODER_SEPARATOR,
):
    """Token ids per row: `input_ids` (<= max_length), `labels`, and `prompt_ids` (what generation starts from),
    as a memory-mapped `datasets.Dataset` read from its cache file, with a `length` column (len(input_ids), for
    length-grouped batches). `rows` is a list of `{source, target}` dicts or a `datasets.Dataset` with those
    columns (`pipeline.tasks.tables`): a table is read batch by batch and never becomes a list.

    Encoder-decoder (T5): `input_ids` = the source with its closing EOS, `labels` = the target with its EOS (both
    keep the EOS when truncated). Decoder-only (LLaMA): the authors' sequence

        input_ids  = [BOS] source separator target [EOS]
        labels     = -100 over [BOS] source separator, then target [EOS]
        prompt_ids = [BOS] source separator          (greedy generation starts here and should stop at EOS)

    with `separator` " Label : " by default (the authors' LLaMA code). The target is tokenized without special
    tokens (no second BOS) after the separator's trailing whitespace, and EOS is appended so the model learns to
    stop. A long source is truncated from its end; the separator and the target are kept.
    Truncation never raises unless s cannot hold the separator and target at all; it is logged as a warning.

    Runs through `datasets.map`, cached on disk (`pipeline.cache`, tokenized/) keyed by the rows (a list: its
    texts; a table: its content fingerprint), the tokenizer, the lengths and the separator, so every later stage,
    seed and rank reuses the work (`training_rows` has one rank per node write it while the others wait).
    """
    import datasets

    if not len(rows):
        raise PipelineError("no examples to tokenize: the data is empty after filtering")
    if max_target_length < 1:
        raise PipelineError(f"max_target_length must be at least 1, got {max_target_length}")
    if is_table(rows):
        missing = [c for c in ("source", "target") if c not in rows.column_names]
        if missing:
            raise PipelineError(f"rows to tokenize lack column(s) {', '.join(missing)}: they need source and target")
        table = rows.select_columns(["source", "target"])
        content = {"table": rows._fingerprint, "rows": len(rows)}
    else:
        content = [{"source": r["source"], "target": r["target"]} for r in rows]
        table = datasets.Dataset.from_list(content)
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
                    raise PipelineError(
                        f"max_length {max_length} leaves no room for the source next to the "
                        f"{tail}-token separator {separator!r} and a {len(tgt)}-token target: "
                        "raise max_length"
                    )
                prompt = prompt[: room - tail] + prompt[len(prompt) - tail :]
            out["truncated"].append(truncated)
            out["input_ids"].append(prompt + tgt)
            out["labels"].append([IGNORE] * len(prompt) + tgt)
            out["prompt_ids"].append(prompt)
        return out

    encode = encode_seq2seq if is_encoder_decoder else encode_decoder

    def encode_stored(batch):  # the sequences above, plus the length column the training order groups by
        out = encode(batch)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    cache, fingerprint = _cache_file(content, tokenizer, is_encoder_decoder, max_length, max_target_length, separator)
    encoded = table.map(
        encode_stored,
        batched=True,
        remove_columns=["source", "target"],
        cache_file_name=cache,
        load_from_cache_file=True,
        new_fingerprint=fingerprint,
        desc="tokenize",
    )
    import pyarrow.compute as pc

    truncated = pc.sum(encoded.data.column("truncated")).as_py() or 0
    target_truncated = pc.sum(encoded.data.column("target_truncated")).as_py() or 0
    if truncated:
        log.warning(
            "%d of %d inputs are longer than max_length s=%d and were truncated", truncated, len(rows), max_length
        )
    if target_truncated:
        log.warning(
            "%d of %d targets are longer than max_target_length %d and were truncated (EOS kept)",
            target_truncated,
            len(rows),
            max_target_length,
        )
    return encoded.remove_columns(["truncated", "target_truncated"])


def _cache_file(content, tokenizer, is_encoder_decoder, max_length, max_target_length, separator) -> tuple[str, str]:
    """(the cache file of a tokenization, its fingerprint): a digest of everything the token ids depend on."""
    import hashlib

    from pipeline.cache import cache_root

    identity = json.dumps(
        [
            FORMAT_VERSION,
            STORED_COLUMNS,
            type(tokenizer).__name__,
            getattr(tokenizer, "name_or_path", ""),
            len(tokenizer),
            tokenizer.pad_token_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            is_encoder_decoder,
            max_length,
            max_target_length,
            separator,
            content,
        ],
        sort_keys=True,
    )
    folder = cache_root() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return str(folder / f"{name}.arrow"), name[:16]


def local_rank_first(prepare):
    """`prepare()` on every rank, each node's LOCAL_RANK 0 first: it writes the content-keyed caches (rendered rows,
    mixtures, token ids) while the other ranks wait, and they then call `prepare()` and find the caches written, so
    the work is done once per node. Collective when a process group of several ranks is up (a failure on a first
    rank is raised on every rank, with its message); a plain call otherwise."""
    if distributed.world_size() == 1:
        return prepare()
    first = distributed.local_rank() == 0
    result, failure = None, None
    if first:
        try:
            result = prepare()
        except Exception as err:  # noqa: BLE001  (every rank must reach the collective below, then raise)
            failure = err
    mine = [f"rank {distributed.rank()}: {str(failure).splitlines()[0] if str(failure) else type(failure).__name__}"]
    failures = distributed.gather_objects(mine if failure is not None else [])
    if failure is not None:
        raise failure
    if failures:
        raise PipelineError(f"preparing the data failed on {failures[0]}")
    return result if first else prepare()


def training_rows(
    rows,
    tokenizer,
    is_encoder_decoder: bool,
    max_length: int,
    max_target_length: int = 32,
    separator: str = DECODER_SEPARATOR,
):
    """The training rows tokenized (`tokenize_table`): a memory-mapped table, tokenized once per node (LOCAL_RANK
    0 writes the cache file, the other ranks wait and then open it)."""
    return local_rank_first(
        lambda: tokenize_table(rows, tokenizer, is_encoder_decoder, max_length, max_target_length, separator)
    )


def rows_at(rows, ids) -> list[dict]:
    """The rows at `ids` (in that order) as dicts, from a list or from a table (one batched read)."""
    ids = [int(i) for i in ids]
    if not is_table(rows):
        return [rows[i] for i in ids]
    if not ids:
        return []
    batch = rows[ids]
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]


def row_lengths(rows) -> list[int]:
    """len(input_ids) of every tokenized row: a table's `length` column (read without the token ids)."""
    if is_table(rows) and "length" in rows.column_names:
        return rows.with_format("arrow")["length"].to_pylist()
    return [len(r["input_ids"]) for r in rows]


def pad(sequences: list[list[int]], value: int, length: int, left: bool) -> torch.Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = seq[:length]
        if left:
            out[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(
    examples: list[dict], pad_id: int, is_encoder_decoder: bool, pad_to: int | None = None, for_generation: bool = False
) -> dict[str, torch.Tensor]:
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
        grouped += sorted(order[start : start + chunk], key=lambda i: -lengths[i])
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


_LAST_ORDER: list = []  # [(n, seed, epoch, batch_size), lengths, order]: the epoch being trained


def _current_epoch_order(n: int, seed: int, epoch: int, lengths, batch_size: int) -> list[int]:
    """`epoch_order`, computed once per epoch rather than once per step (560,000 rows take ~0.5 s to order)."""
    key = (n, seed, epoch, batch_size)
    if _LAST_ORDER and _LAST_ORDER[0] == key and _LAST_ORDER[1] is lengths:
        return _LAST_ORDER[2]
    order = epoch_order(n, seed, epoch, lengths, batch_size)
    _LAST_ORDER[:] = [key, lengths, order]
    return order


def global_batch(n: int, batch_size: int, step: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """Row indices of the global batch taken at optimizer step `step` (epochs wrap around)."""
    per_epoch = max(n // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    order = _current_epoch_order(n, seed, epoch, lengths, batch_size)
    if n < batch_size:  # tiny data (k-shot): repeat the epoch to fill a batch
        order = order * (batch_size // n + 1)
    return order[within * batch_size : (within + 1) * batch_size]
