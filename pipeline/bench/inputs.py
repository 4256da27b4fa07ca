"""What the benchmark feeds the backbone: task rows tokenized to s, and each configuration's batch tensors."""

from __future__ import annotations

import os
import random
import statistics
from dataclasses import dataclass

import torch

from pipeline.backbone import Backbone, load_tokenizer
from pipeline.bench.settings import DATA_TOKENIZER, TASK_OF_LENGTHS, BenchArgs, data_folder
from pipeline.bench.variants import Variant
from pipeline.data import IGNORE, collate, global_batch, tokenize
from pipeline.errors import PipelineError
from pipeline.tasks import get_task, load_raw_split
from pipeline.tokenizer import data_tokenizer, words

FILLER_ID = 5  # token id of the extra inputs of bare rows (their content does not change the work)


def tokenized_rows(args: BenchArgs, backbone: Backbone, world: int) -> tuple[list[dict], dict]:
    """Rendered rows of the chosen task, tokenized to s, with a description of their length distribution."""
    if args.batch_size % world:
        raise PipelineError(f"batch_size {args.batch_size} is not divisible by the {world} ranks")
    texts, where = _texts(args)
    tokenizer = _tokenizer(args, backbone)
    rows = tokenize(texts, tokenizer, backbone.is_encoder_decoder, args.max_length, max_target_length=8)
    if args.tokenizer:  # another tokenizer's ids, folded into this backbone's vocabulary
        vocab = backbone.model.get_input_embeddings().num_embeddings
        for row in rows:
            for key in ("input_ids", "labels", "prompt_ids"):
                row[key] = [t % vocab if t >= 0 else t for t in row[key]]
    return rows, _length_info(args, rows, where)


def _texts(args: BenchArgs) -> tuple[list[dict], str]:
    """Source/target texts of the task's train (else validation) split; synthetic ones for `padded` without data
    (every input is padded to s there, so only the length cap matters)."""
    task_name, folder = TASK_OF_LENGTHS[args.lengths], data_folder(args.data_dir)
    errors = []
    for split in ("train", "validation"):
        try:
            raw = load_raw_split(task_name, split, folder)
        except PipelineError as err:
            errors.append(str(err))
            continue
        task = get_task(task_name)
        return [task.render(row) for row in raw], f"{task_name} {split} ({len(raw)} rows, {folder or 'hub'})"
    if args.lengths != "padded":
        raise PipelineError(f"no {task_name} data for --lengths {args.lengths}: {errors[-1]}")
    rng, vocab = random.Random(args.seed), words()
    texts = [
        {"source": " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120))), "target": "1"}
        for _ in range(max(256, args.batch_size * 4))
    ]
    return texts, "synthetic rows (no RTE data found); every input is padded to s"


def _tokenizer(args: BenchArgs, backbone: Backbone):
    if args.tokenizer == DATA_TOKENIZER:
        folder = data_folder(args.data_dir)
        if folder is None:
            raise PipelineError(
                f"--tokenizer {DATA_TOKENIZER} trains on the task data: pass --data_dir or set $DEPT_DATA_DIR"
            )
        return data_tokenizer(folder, 32000, os.environ.get("DEPT_CACHE"))
    if args.tokenizer:
        return load_tokenizer(args.tokenizer, os.environ.get("DEPT_CACHE"))
    return backbone.tokenizer


def _length_info(args: BenchArgs, rows: list[dict], where: str) -> dict:
    lens = sorted(len(r["input_ids"]) for r in rows)
    n = len(lens)
    return {
        "source": where,
        "tokenizer": args.tokenizer or f"{args.model}'s own",
        "rows": n,
        "median": lens[n // 2],
        "p90": lens[min(n - 1, int(0.9 * n))],
        "max": lens[-1],
        "at_s_fraction": sum(x >= args.max_length for x in lens) / n,
        "batches_per_epoch": max(n // args.batch_size, 1),
    }


@dataclass
class Batches:
    """This rank's share of the epoch order, as each configuration's tensors (the layout of `dept train`)."""

    rows: list[dict]
    args: BenchArgs
    rank: int
    world: int
    pad_id: int
    is_encoder_decoder: bool
    device: torch.device

    def __post_init__(self):
        # --group_by_length: the epoch order sorts chunks of batches by length (as `dept train` does)
        self.lengths = [len(r["input_ids"]) for r in self.rows] if self.args.group_by_length else None

    def parts(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches of global batch `step`."""
        args = self.args
        ids = global_batch(len(self.rows), args.batch_size, step, args.seed, self.lengths)
        micro = args.batch_size // (self.world * args.grad_accum)
        firsts = [(a * self.world + self.rank) * micro for a in range(args.grad_accum)]
        return [ids[first : first + micro] for first in firsts]

    def tensors(self, parts: list[list[int]], variant: Variant, generation: bool = False):
        """(batches on the device, real source tokens, mean input width seen by the backbone)."""
        made = [self._batch(ids, variant, generation) for ids in parts]
        batches = [{k: t.to(self.device) for k, t in batch.items()} for batch, _, _ in made]
        return batches, sum(real for _, real, _ in made), statistics.fmean(width for _, _, width in made)

    def _batch(self, ids: list[int], variant: Variant, generation: bool):
        """Rows `ids` padded as the variant pads; bare rows get m extra real inputs (mask 1, label -100), so the
        backbone sees exactly the tensor shape the prompt methods give it."""
        batch = collate(
            [self.rows[i] for i in ids], self.pad_id, self.is_encoder_decoder, variant.pad_to, for_generation=generation
        )
        real = int(batch["attention_mask"].sum())
        if variant.kind == "bare" and variant.m:
            b, m = batch["input_ids"].shape[0], variant.m
            batch["input_ids"] = torch.cat([torch.full((b, m), FILLER_ID, dtype=torch.long), batch["input_ids"]], 1)
            batch["attention_mask"] = torch.cat([torch.ones(b, m, dtype=torch.long), batch["attention_mask"]], 1)
            if not self.is_encoder_decoder and "labels" in batch:
                batch["labels"] = torch.cat([torch.full((b, m), IGNORE, dtype=torch.long), batch["labels"]], 1)
        width = batch["input_ids"].shape[1] + (variant.m if variant.kind != "bare" else 0)
        return batch, real, width
