"""Evaluation's own logic, without a model: the per-list token cache of an Evaluator and how rows split into batches
over ranks (generation and scoring run in tests/test_inference.py, tests/test_train.py and the recipe runs)."""

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


def test_each_rank_generates_its_own_rows_and_only_a_short_rank_repeats_one(monkeypatch):
    """Every rank runs the same number of batches (ZeRO-3's per-layer path makes each forward a collective), but no
    batch is padded to the batch size: one rank generating 100 rows in batches of 32 generated 128 before #24."""
    from pipeline import distributed
    from pipeline.evaluation import _my_batches

    def on(rank: int, world: int, n: int, batch_size: int):
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        return _my_batches(n, batch_size)

    batches, count = on(0, 1, 100, 32)
    assert [len(b) for b in batches] == [32, 32, 32, 4] and count == 100 and sum(batches, []) == list(range(100))
    assert on(0, 2, 65, 32) == ([list(range(0, 64, 2)), [64]], 33)
    assert on(1, 2, 65, 32) == ([list(range(1, 64, 2)), [63]], 32)  # a second batch of one repeated row
    assert on(1, 2, 1, 32) == ([[0]], 0)  # no row of its own: it still runs the one batch
    assert on(0, 1, 0, 32) == ([], 0)
