"""Metrics agree with scikit-learn/scipy on fixed predictions; SQuAD EM/F1 on hand-checked cases (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.metrics import compute_metrics
from pipeline.tasks import custom_task, get_task

RNG = np.random.default_rng(1234)
REFS_3 = [str(v) for v in RNG.integers(0, 3, 300)]
PREDS_3 = [r if RNG.random() < 0.6 else str(RNG.integers(0, 3)) for r in REFS_3]
REFS_2 = [str(v) for v in RNG.integers(0, 2, 301)]
PREDS_2 = [r if RNG.random() < 0.7 else str(1 - int(r)) for r in REFS_2]
# Scores on a 0..5 grid of 0.2 so both sides have many ties (Spearman's average ranks are exercised).
SCORES = np.round(RNG.integers(0, 26, 200) * 0.2, 1)
GUESSES = np.round(np.clip(SCORES + RNG.normal(0, 1, 200), 0, 5) * 5) / 5


def test_classification_metrics_match_sklearn():
    assert metrics.accuracy(PREDS_3, REFS_3) == pytest.approx(skm.accuracy_score(REFS_3, PREDS_3))
    assert metrics.f1(PREDS_2, REFS_2) == pytest.approx(skm.f1_score(REFS_2, PREDS_2, pos_label="1"))
    assert metrics.macro_f1(PREDS_3, REFS_3) == pytest.approx(skm.f1_score(REFS_3, PREDS_3, average="macro"))
    assert metrics.matthews_corrcoef(PREDS_3, REFS_3) == pytest.approx(skm.matthews_corrcoef(REFS_3, PREDS_3))
    assert metrics.matthews_corrcoef(PREDS_2, REFS_2) == pytest.approx(skm.matthews_corrcoef(REFS_2, PREDS_2))


def test_edge_cases_match_sklearn():
    refs, preds = ["0", "0", "1", "2"], ["0", "0", "0", "<invalid>"]
    labels = ["0", "1", "2", "3"]  # "3" never occurs: its F1 is 0, as scikit-learn reports it
    assert metrics.macro_f1(preds, refs, labels) == pytest.approx(
        skm.f1_score(refs, preds, labels=labels, average="macro", zero_division=0)
    )
    assert metrics.matthews_corrcoef(preds, refs) == pytest.approx(skm.matthews_corrcoef(refs, preds))
    assert (
        metrics.matthews_corrcoef(["1"] * 4, ["0", "1", "0", "1"])
        == skm.matthews_corrcoef(["0", "1", "0", "1"], ["1"] * 4)
        == 0.0
    )
    assert metrics.f1(["0", "0"], ["0", "0"]) == 0.0


def test_correlations_match_scipy():
    assert metrics.pearson(GUESSES, SCORES) == pytest.approx(stats.pearsonr(SCORES, GUESSES)[0])
    assert metrics.spearman(GUESSES, SCORES) == pytest.approx(stats.spearmanr(SCORES, GUESSES)[0])
    assert (
        metrics.average_ranks([3, 1, 3, 2, 3]).tolist() == stats.rankdata([3, 1, 3, 2, 3]).tolist() == [4, 1, 4, 2, 4]
    )
    assert metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # undefined: reported as no correlation


def test_squad_normalisation_and_scores_hand_checked():
    assert metrics.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.exact_match("the Eiffel Tower.", "Eiffel Tower") == 1.0
    # pred tokens {eiffel, tower, in, paris}, gold {eiffel, tower}: P = 2/4, R = 2/2, F1 = 2/3
    assert metrics.token_f1("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert metrics.token_f1("nothing shared", "Eiffel Tower") == 0.0
    predictions = ["1889", "Paris France", "blue"]
    answers = [["in 1889", "1889"], ["Paris"], ["red"]]
    assert metrics.squad_em(predictions, answers) == pytest.approx(1 / 3)  # max over golds: 1, 0, 0
    assert metrics.squad_f1(predictions, answers) == pytest.approx((1 + 2 / 3 + 0) / 3)  # 1, F1(P=1/2, R=1), 0


def test_compute_metrics_counts_invalid_as_wrong():
    result = compute_metrics(get_task("rte"), ["0", " 1", "yes", "1"], ["0", "1", "1", "0"])
    assert result == {"accuracy": 50.0, "invalid": 1}
    # MRPC: the invalid prediction on a negative row becomes "1" (a false positive), as the authors do.
    result = compute_metrics(get_task("mrpc"), ["1", "maybe", "0", "1"], ["1", "0", "0", "1"])
    assert result["f1"] == pytest.approx(100 * skm.f1_score(["1", "0", "0", "1"], ["1", "1", "0", "1"], pos_label="1"))
    assert result["accuracy"] == 75.0 and result["invalid"] == 1
    cb_refs, cb_preds = ["0", "1", "2", "2", "1"], ["0", "1", "2", "entailment", "0"]
    result = compute_metrics(get_task("cb"), cb_preds, cb_refs)
    expected = skm.f1_score(cb_refs, ["0", "1", "2", "<invalid>", "0"], labels=["0", "1", "2"], average="macro")
    assert result == {"accuracy": 60.0, "macro_f1": pytest.approx(100 * expected), "invalid": 1}


def test_matthews_treats_invalid_generations_as_their_own_classes():
    """CoLA: scikit-learn on the raw (stripped) generations, as the authors call it; F1 keeps the opposite rule."""
    refs = ["0", "1", "1", "0", "1", "0", "1", "1"]
    preds = ["0", "1", "", "0", " yes ", "1", "maybe", "1"]
    raw = [p.strip() for p in preds]
    result = compute_metrics(get_task("cola"), preds, refs)
    assert result["invalid"] == 3
    assert result["matthews_corrcoef"] == pytest.approx(100 * skm.matthews_corrcoef(refs, raw))
    # Not the opposite-label value: on these rows the two rules give different correlations.
    opposite = ["0", "1", "0", "0", "0", "1", "0", "1"]
    assert result["matthews_corrcoef"] != pytest.approx(100 * skm.matthews_corrcoef(refs, opposite))
    # Binary F1 of MRPC on the same rows still turns each invalid prediction into the wrong label.
    mrpc = compute_metrics(get_task("mrpc"), preds, refs)
    assert mrpc["f1"] == pytest.approx(100 * skm.f1_score(refs, opposite, pos_label="1"))
    assert mrpc["accuracy"] == pytest.approx(100 * skm.accuracy_score(refs, raw))


def test_compute_metrics_regression_maps_invalid_to_the_far_end():
    refs = ["0.4", "4.8", "2.0", "1.0", "3.4"]
    preds = ["0.6", "4.0", "two", "1.2", "nan"]
    # references span 0.4..4.8: "two" (ref 2.0) -> 4.8, the farther end; "nan" (ref 3.4) -> 0.4
    mapped = [0.6, 4.0, 4.8, 1.2, 0.4]
    truth = [float(r) for r in refs]
    result = compute_metrics(get_task("stsb"), preds, refs)
    assert result["invalid"] == 2
    assert result["pearson"] == pytest.approx(100 * stats.pearsonr(truth, mapped)[0])
    assert result["spearman"] == pytest.approx(100 * stats.spearmanr(truth, mapped)[0])


def test_compute_metrics_qa_uses_all_gold_answers_and_offers_the_authors_first_gold_scores():
    task = get_task("nq")
    answers = [["in 1889", "1889"], ["Paris"]]
    result = compute_metrics(task, ["1889", "the Paris"], ["in 1889", "Paris"], answers=answers)
    # first example: "1889" matches the second gold only; the authors' first-gold scores see "in 1889"
    assert result == {
        "squad_f1": 100.0,
        "squad_em": 100.0,
        "squad_f1_first": pytest.approx(100 * (2 / 3 + 1) / 2),
        "squad_em_first": 50.0,
        "invalid": 0,
    }
    alone = compute_metrics(task, ["1889"], ["in 1889"])  # without answers only the reference counts
    assert alone["squad_em"] == alone["squad_em_first"] == 0.0


def test_custom_classification_without_label_words_uses_the_reference_classes():
    task = custom_task(
        {
            "name": "mine",
            "data_files": {"train": "t.csv"},
            "input_columns": ["x"],
            "label_column": "y",
            "metric": "accuracy",
        }
    )
    assert compute_metrics(task, ["pos", "neg", "meh"], ["pos", "pos", "neg"]) == {
        "accuracy": pytest.approx(100 / 3),
        "invalid": 1,
    }


def test_bad_metric_inputs():
    with pytest.raises(PipelineError, match="3 predictions for 2 references"):
        compute_metrics(get_task("rte"), ["0", "1", "0"], ["0", "1"])
    with pytest.raises(PipelineError, match="evaluation set is empty"):
        metrics.accuracy([], [])
    with pytest.raises(PipelineError, match="no gold answer"):
        metrics.squad_f1(["x"], [[]])
