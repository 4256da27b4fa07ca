"""Evaluation's own logic, without a model: the per-list token cache of an Evaluator (generation and scoring run
in tests/test_inference.py, tests/test_train.py and the recipe runs)."""

from __future__ import annotations

from pipeline.backbone import load_tokenizer
from pipeline.evaluation import Evaluator
from pipeline.tasks import get_task


def _rows(word: str) -> list[dict]:
    return [{"id": i, "source": f"{word} {i}", "target": "yes"} for i in range(3)]


def test_the_token_cache_never_hands_a_list_the_tokens_of_another():
    """The cache is keyed by the list's id, which Python gives to a new list once the old one is freed: an entry
    whose list is not this one (what a freed list's entry would be) is recomputed, and the same list is tokenized
    once."""
    evaluator = Evaluator(get_task("syn-target-food"), [], [], load_tokenizer("random:tiny-t5"), True, 32)
    apples, bananas = _rows("apple"), _rows("banana")
    apple_tokens = evaluator._tokenized(apples)
    assert evaluator._tokenized(apples) is apple_tokens  # computed once per list
    evaluator._cache[id(bananas)] = (list(apples), apple_tokens)  # a freed list's entry at this address
    banana_tokens = evaluator._tokenized(bananas)
    assert banana_tokens != apple_tokens and banana_tokens == evaluator._tokenized(list(bananas))
