"""Evaluation's own logic, without a model: the per-list token cache of an Evaluator (generation and scoring run
in tests/test_inference.py, tests/test_train.py and the recipe runs)."""

from __future__ import annotations

import gc

from pipeline.backbone import load_tokenizer
from pipeline.evaluation import Evaluator
from pipeline.tasks import get_task


def _rows(word: str) -> list[dict]:
    return [{"id": i, "source": f"{word} {i}", "target": "yes"} for i in range(3)]


def test_the_token_cache_never_hands_a_new_list_the_tokens_of_a_freed_one():
    """The cache is keyed by the list's id, which Python reuses once a list is freed: a later list at the same
    address must be tokenized afresh, and the same list is tokenized once."""
    tokenizer = load_tokenizer("random:tiny-t5")
    evaluator = Evaluator(get_task("syn-target-food"), [], [], tokenizer, True, 32, mode="generate")
    first = _rows("apple")
    tokens = evaluator._tokenized(first)
    assert evaluator._tokenized(first) is tokens  # computed once per list
    old_id = id(first)
    del first
    gc.collect()
    kept = []
    for _ in range(1000):  # CPython soon hands the freed address to a new list
        second = _rows("banana")
        if id(second) == old_id:
            break
        kept.append(second)  # held, so the next try gets another address
    assert id(second) == old_id, "no list reused the freed address: the check below would prove nothing"
    fresh = evaluator._tokenized(second)
    assert fresh != tokens and fresh == evaluator._tokenized(list(second))  # banana's tokens, not apple's
