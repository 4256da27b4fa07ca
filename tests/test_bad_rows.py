"""WSC span marking on real-data quirks, and the bad-row policy every task shares (no model, no data files).

The WSC rows are written here in the hub schema of SuperGLUE `wsc.fixed` (no WSC file is shipped), with the two
quirks of the real data: a span whose case differs from the text at its index, and a pronoun inside the noun span.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from support import raises_one_line

from pipeline.errors import PipelineError
from pipeline.tasks import get_task, load_raw_split, load_task_splits

# Hub schema of aps/super_glue wsc.fixed: text, span1_index, span2_index, span1_text, span2_text, idx, label.
MARK = {
    "text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
    "truthful.",
    "span1_index": 0,
    "span2_index": 13,
    "span1_text": "Mark",
    "span2_text": "He",
    "idx": 0,
    "label": 0,
}
LOWER_CASE_SPAN = {
    "text": "The lawyer asked the witness a question, but he was reluctant to repeat it.",
    "span1_index": 0,
    "span2_index": 8,
    "span1_text": "the lawyer",
    "span2_text": "he",
    "idx": 1,
    "label": 1,
}
NESTED = {
    "text": "Sid and Tim explained the plan to their mothers before dinner.",
    "span1_index": 7,
    "span2_index": 7,
    "span1_text": "their mothers",
    "span2_text": "their",
    "idx": 2,
    "label": 0,
}
METACHARACTERS = {
    "text": "Mr. (Tom) Cruz met Ann. He smiled.",
    "span1_index": 0,
    "span2_index": 5,
    "span1_text": "Mr. (Tom) Cruz",
    "span2_text": "He",
    "idx": 3,
    "label": 1,
}
NOT_AT_INDEX = {
    "text": "Joan made sure to thank Susan for all the help she had given.",
    "span1_index": 2,
    "span2_index": 10,
    "span1_text": "Susan",
    "span2_text": "she",
    "idx": 4,
    "label": 1,
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_wsc_span_in_another_case_is_marked_keeping_the_texts_spelling():
    assert get_task("wsc").render(LOWER_CASE_SPAN)["source"] == (
        "text: * The lawyer * asked the witness a question, but # he # was reluctant to repeat it."
    )
    assert get_task("wsc").render(MARK)["source"] == (
        "text: * Mark * told Pete many lies about himself, which Pete included in his book. # He # should have "
        "been more truthful."
    )


def test_wsc_pronoun_inside_the_noun_span_nests_its_marks():
    source = get_task("wsc").render(NESTED)["source"]
    assert source == "text: Sid and Tim explained the plan to * # their # mothers * before dinner."
    # Also when the pronoun ends the noun span, and when the spans are one and the same word.
    inner_end = {
        **NESTED,
        "text": "They met the mothers of them all.",
        "span1_index": 2,
        "span2_index": 5,
        "span1_text": "the mothers of them",
        "span2_text": "them",
    }
    assert get_task("wsc").render(inner_end)["source"] == "text: They met * the mothers of # them # * all."
    same = {**NESTED, "span1_text": "their", "span2_text": "their"}
    assert get_task("wsc").render(same)["source"] == (
        "text: Sid and Tim explained the plan to * # their # * mothers before dinner."
    )


def test_wsc_spans_with_regex_metacharacters_are_matched_literally():
    assert get_task("wsc").render(METACHARACTERS)["source"] == "text: * Mr. (Tom) Cruz * met Ann. # He # smiled."


def test_wsc_rows_that_cannot_be_marked_are_refused_one_line():
    raises_one_line("'Susan' is not at word 2", get_task("wsc").render, NOT_AT_INDEX)
    crossing = {
        **NESTED,
        "span1_text": "plan to their",
        "span1_index": 5,
        "span2_text": "their mothers",
        "span2_index": 7,
    }
    raises_one_line("overlap without nesting", get_task("wsc").render, crossing)


def wsc_split(n_good: int, bad: list[dict]) -> list[dict]:
    good = [MARK, LOWER_CASE_SPAN, NESTED, METACHARACTERS]
    rows = [{**good[i % len(good)], "idx": 100 + i} for i in range(n_good)]
    for position, row in enumerate(bad):
        rows.insert(7 * (position + 1), row)  # spread through the split
    return rows


def test_a_few_bad_rows_are_skipped_counted_and_named(tmp_path, caplog):
    bad = [{**NOT_AT_INDEX, "idx": 9001}]
    write_jsonl(tmp_path / "wsc" / "train.jsonl", wsc_split(200, bad))  # 1 of 201 rows: under 1%
    provenance = {}
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.loading"):
        train = load_task_splits("wsc", tmp_path, splits=("train",), provenance=provenance)["train"]
    assert len(train) == 200 and 9001 not in {r["id"] for r in train}
    assert provenance["train"]["skipped"] == [9001] and provenance["train"]["rows"] == 200
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "skipped 1 of 201 rows" in warning and "9001" in warning and "'Susan' is not at word 2" in warning
    # The raw rows follow the same policy.
    assert len(load_raw_split("wsc", "train", tmp_path)) == 200


def test_bad_rows_at_the_tolerance_stop_the_split_with_one_line(tmp_path):
    bad = [{**NOT_AT_INDEX, "idx": 9001}, {**MARK, "idx": 9002, "span2_index": 99}]
    write_jsonl(tmp_path / "wsc" / "train.jsonl", wsc_split(98, bad))  # 2 of 100 rows: 2%
    message = raises_one_line(
        "2 of 100 rows (2.0%) cannot be rendered for task 'wsc'", load_task_splits, "wsc", tmp_path, splits=("train",)
    )
    assert "bad_row_tolerance of 1.0%" in message and "(id 9001)" in message and "fix the data" in message


def test_every_task_shares_the_policy_and_can_set_its_own_tolerance(tmp_path):
    rows = [{"sentence1": f"s{i}", "sentence2": "t", "label": i % 2, "idx": i} for i in range(150)]
    rows[60] = {**rows[60], "label": 7}  # outside RTE's label set
    write_jsonl(tmp_path / "rte" / "train.jsonl", rows)
    assert [r["idx"] for r in load_raw_split("rte", "train", tmp_path)] == [i for i in range(150) if i != 60]
    strict = replace(get_task("rte"), bad_row_tolerance=0.0)
    raises_one_line("row 61 (id 60): label 7", load_raw_split, strict, "train", tmp_path)
    with pytest.raises(PipelineError, match="bad_row_tolerance must be a fraction"):
        replace(get_task("rte"), bad_row_tolerance=1.5)
