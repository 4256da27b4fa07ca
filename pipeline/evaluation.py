"""Evaluation: greedy generation (every task) or label scoring (classification), synced across ranks.

Rows are split over ranks (rank r takes rows r, r + world, ...); every rank runs the same number of batches
(short ranks repeat a row and drop its output). Under ZeRO-3 the model is gathered once per evaluation when it fits
in free memory (`engine.whole_for_inference`): each rank then generates on its own. Otherwise each forward is a
collective (every layer gathered for every token) and `generate` runs with `synced_gpus=True` on several ranks, or it
deadlocks. Predictions are gathered and put back in row order on every rank, then scored with the task's metrics
(`pipeline.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline import distributed, engine, logs
from pipeline.data import collate, tokenize
from pipeline.errors import PipelineError
from pipeline.metrics import compute_metrics

MODES = ("generate", "score")


def _my_batches(n: int, batch_size: int) -> tuple[list[list[int]], int]:
    """(this rank's batches of row indices, how many rows are really its own).

    Every rank gets the same number of batches (under ZeRO-3's per-layer path each forward is a collective); a rank
    with fewer rows gets extra one-row batches repeating a row, whose outputs are dropped. Batches are never padded to
    `batch_size`: generating for repeated rows cost one rank 28% of 100 rows in batches of 32 (#24).
    """
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, n, world))
    batches = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    own = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return own + [[mine[-1] if mine else 0]] * (batches - len(own)), len(mine)


def _device(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def generate_predictions(
    module, tokenized: list[dict], tokenizer, is_encoder_decoder: bool, batch_size: int = 32, max_new_tokens: int = 20
) -> list[str]:
    """Greedy decoding of every row, in row order, on every rank."""
    batches, count = _my_batches(len(tokenized), batch_size)
    texts: list[str] = []
    with engine.whole_for_inference(module) as whole:
        synced = distributed.world_size() > 1 and not whole  # sharded: every rank steps until all are done
        for indices in logs.progress(batches, "evaluation (generation)", len(tokenized)):
            batch = collate(
                [tokenized[i] for i in indices], tokenizer.pad_token_id, is_encoder_decoder, for_generation=True
            )
            batch = {k: v.to(_device(module)) for k, v in batch.items()}
            out = module.generate(**batch, max_new_tokens=max_new_tokens, synced_gpus=synced)
            texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return _in_row_order(texts[:count], len(tokenized))


@torch.no_grad()
def score_predictions(
    module, tokenized_by_label: dict[str, list[dict]], tokenizer, is_encoder_decoder: bool, batch_size: int = 32
) -> list[str]:
    """For each row, the label string with the highest total log-likelihood (never an invalid output).

    `tokenized_by_label[label]` holds every row tokenized with that label as its target.
    """
    labels = list(tokenized_by_label)
    n = len(next(iter(tokenized_by_label.values())))
    batches, count = _my_batches(n, batch_size)
    best: list[str] = []
    with engine.whole_for_inference(module):
        for indices in logs.progress(batches, "evaluation (label scores)", n):
            scores = []
            for label in labels:
                rows = [tokenized_by_label[label][i] for i in indices]
                batch = collate(rows, tokenizer.pad_token_id, is_encoder_decoder)
                batch = {k: v.to(_device(module)) for k, v in batch.items()}
                scores.append(_sequence_log_likelihood(module, batch))
            winners = torch.stack(scores, dim=1).argmax(dim=1).tolist()
            best += [labels[w] for w in winners]
    return _in_row_order(best[:count], n)


def _sequence_log_likelihood(module, batch: dict) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities per row: [batch]."""
    logits = module(**batch).logits.float()
    labels = batch["labels"]
    if not module.is_encoder_decoder:  # decoder-only: logits at t predict token t + 1; the prompt comes first
        m = logits.shape[1] - labels.shape[1]
        logits, labels = logits[:, m:-1], labels[:, 1:]
    mask = labels.ne(-100)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def _in_row_order(mine: list, n: int) -> list:
    """Gather every rank's outputs (rank r holds rows r, r + world, ...) into row order."""
    world = distributed.world_size()
    parts = distributed.gather_objects([mine])
    ordered = [None] * n
    for rank, part in enumerate(parts):
        for j, value in enumerate(part):
            ordered[rank + j * world] = value
    return ordered


@dataclass
class Evaluator:
    """Validation during training and test at the best step, for one task.

    `validate` returns the metrics with `score` = the task's selection metric (higher is better; the first reported
    metric unless the task names another, e.g. CB selects on macro-F1); `test` the same on the test rows. `mode` is "generate" (greedy decoding, invalid outputs counted) or "score" (rank the label
    strings by likelihood; classification only).
    """

    task: object
    validation_rows: list[dict]
    test_rows: list[dict]
    tokenizer: object
    is_encoder_decoder: bool
    max_length: int
    mode: str = "generate"
    batch_size: int = 32
    max_new_tokens: int = 20

    def __post_init__(self):
        if self.mode not in MODES:
            raise PipelineError(f"eval mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "score" and not getattr(self.task, "labels", None):
            raise PipelineError(f"task {self.task.name!r} has no label set: eval mode 'score' needs one; use generate")
        self._cache: dict[int, tuple[list, object]] = {}  # id(rows) -> (rows, their tokens)

    @property
    def _separator(self) -> dict:
        separator = getattr(self.task, "separator", None)
        return {"separator": separator} if separator is not None else {}

    def _tokenized(self, rows: list[dict]):
        """The tokens of `rows`, computed once per list. The cache holds the list itself: an id is unique only
        while its object lives, so a list made later at a freed list's address cannot get the old tokens."""
        key = id(rows)
        if key not in self._cache or self._cache[key][0] is not rows:
            if self.mode == "score":
                tokens = {
                    label: tokenize(
                        [{**r, "target": label} for r in rows],
                        self.tokenizer,
                        self.is_encoder_decoder,
                        self.max_length,
                        **self._separator,
                    )
                    for label in self.task.labels
                }
            else:
                tokens = tokenize(rows, self.tokenizer, self.is_encoder_decoder, self.max_length, **self._separator)
            self._cache[key] = (rows, tokens)
        return self._cache[key][1]

    def predictions(self, module, rows: list[dict]) -> list[str]:
        tokenized = self._tokenized(rows)
        if self.mode == "score":
            return score_predictions(module, tokenized, self.tokenizer, self.is_encoder_decoder, self.batch_size)
        return generate_predictions(
            module, tokenized, self.tokenizer, self.is_encoder_decoder, self.batch_size, self.max_new_tokens
        )

    def metrics(self, module, rows: list[dict]) -> dict:
        return self.metrics_from(self.predictions(module, rows), rows)

    def metrics_from(self, predictions: list[str], rows: list[dict]) -> dict:
        answers = [r["answers"] for r in rows] if rows and "answers" in rows[0] else None
        metrics = compute_metrics(self.task, predictions, [r["target"] for r in rows], answers)
        selection = getattr(self.task, "selection_metric", None) or self.task.metrics[0]
        return {**metrics, "score": metrics[selection], "n": len(rows)}

    def validate(self, module, step: int) -> dict:
        return self.metrics(module, self.validation_rows)

    def test(self, module) -> dict:
        return self.metrics(module, self.test_rows) if self.test_rows else {}


class MixtureEvaluator:
    """Evaluation over several tasks (a source mixture): `score` is the mean of their selection scores; the other
    metrics are reported per task as `<task>.<metric>`."""

    def __init__(self, evaluators: dict[str, Evaluator]):
        self.evaluators = evaluators

    def _combine(self, per_task: dict[str, dict]) -> dict:
        flat = {f"{name}.{k}": v for name, metrics in per_task.items() for k, v in metrics.items()}
        scores = [m["score"] for m in per_task.values() if "score" in m]
        return {**flat, "score": sum(scores) / len(scores)} if scores else flat

    def validate(self, module, step: int) -> dict:
        return self._combine({n: e.validate(module, step) for n, e in self.evaluators.items()})

    def test(self, module) -> dict:
        return self._combine({n: e.test(module) for n, e in self.evaluators.items()})
