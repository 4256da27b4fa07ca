"""Task registry, rendering of real and hub-schema rows, synthetic and custom tasks, loading errors (no model).

Tests that read the shipped task files skip when they are absent (`needs_task_data`); the hub code path is
tested in test_hub_loading.py, bad rows and WSC spans in test_bad_rows.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SHIPPED_DATA as DATA_DIR
from conftest import needs_task_data
from support import raises_one_line

from pipeline.errors import PipelineError
from pipeline.tasks import (
    custom_task,
    get_task,
    list_tasks,
    load_raw_split,
    load_task_splits,
    resolve_data_dir,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# First row of the first shipped split of each task, rendered. Strings are written out literally on purpose.
SHIPPED = {
    "mnli": (
        "train",
        "premise: Our hearts are particularly heavy this year as we look back at those we've lost, the Globe "
        "writes lovingly. hypothesis: We are especially sad this year because we lost a lot of people.",
        "0",
    ),
    "qqp": (
        "train",
        "question1: How do I get inside University College London being an Indian? question2: Which is better, "
        "masters in computer science at Arizona State University or University College London for a foreigner "
        "(Indian National)?",
        "0",
    ),
    "qnli": (
        "train",
        "question: What sector has expanded radiply by selling outsourcing services to North America and Europe? "
        "sentence: The IT sector has been stimulated by new Egyptian entrepreneurs with government "
        "encouragement.[citation needed]",
        "1",
    ),
    # SST-2 keeps the trailing space of the GLUE text (verbatim).
    "sst2": ("train", "sentence: hide new secretions from the parental units ", "0"),
    "stsb": ("train", "sentence1: A plane is taking off. sentence2: An air plane is taking off.", "5.0"),
    "mrpc": (
        "train",
        'sentence1: Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his '
        'evidence . sentence2: Referring to him as only " the witness " , Amrozi accused his brother of '
        "deliberately distorting his evidence .",
        "1",
    ),
    "rte": (
        "train",
        "sentence1: No Weapons of Mass Destruction Found in Iraq Yet. sentence2: Weapons of Mass Destruction Found "
        "in Iraq.",
        "1",
    ),
    "cola": ("train", "sentence: Our friends won't buy this analysis, let alone the next one we propose.", "1"),
    "boolq": (
        "validation",
        "question: does ethanol take more energy make that produces passage: Ethanol fuel -- All biomass goes through "
        "at least some of these steps: it needs to be grown, collected, dried, fermented, distilled, and burned. All of "
        "these steps require resources and an infrastructure. The total amount of energy input into the process "
        "compared to the energy released by burning the resulting ethanol fuel is known as the energy balance (or "
        "``energy returned on energy invested''). Figures compiled in a 2007 report by National Geographic Magazine "
        "point to modest results for corn ethanol produced in the US: one unit of fossil-fuel energy is required to "
        "create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane ethanol produced in Brazil "
        "is more favorable, with one unit of fossil-fuel energy required to create 8 from the ethanol. Energy balance "
        "estimates are not easily produced, thus numerous such reports have been generated that are contradictory. For "
        "instance, a separate survey reports that production of ethanol from sugarcane, which requires a tropical "
        "climate to grow productively, returns from 8 to 9 units of energy for each unit expended, as compared to corn, "
        "which only returns about 1.34 units of fuel energy for each unit of energy expended. A 2006 University of "
        "California Berkeley study, after analyzing six separate studies, concluded that producing ethanol from corn "
        "uses much less petroleum than producing gasoline.",
        "0",
    ),
    "cb": (
        "train",
        "premise: It was a complex language. Not written down but handed down. One might say it was peeled down. "
        "hypothesis: the language was peeled down",
        "0",
    ),
    # the authors' COPA template: premise, choice1, choice2 (no question)
    "copa": (
        "train",
        "premise: My body cast a shadow over the grass. choice1: The sun was rising. choice2: The grass was cut.",
        "0",
    ),
    # hub label "neutral" -> "1"
    "scitail": (
        "test",
        "premise: Based on the list provided of the uses of substances 1-7, estimate the pH of each unknown and "
        "record the number in the data table in the estimated pH column. hypothesis: If a substance has a ph "
        "value greater than 7,that indicates that it is base.",
        "1",
    ),
    "paws": (
        "validation",
        "sentence1: Bradd Crellin represented BARLA Cumbria on a tour of Australia with 6 other players "
        "representing Britain , also on a tour of Australia . sentence2: Bradd Crellin also represented "
        "BARLA Great Britain on a tour through Australia on a tour through Australia with 6 other players "
        "representing Cumbria .",
        "0",
    ),
}

# Tasks without shipped data: rows written in the hub schema (column names and label encodings of the hub).
MRQA_ROW = {
    "subset": "NaturalQuestionsShort",
    "qid": "q1",
    "question": "when was the eiffel tower built",
    "context": "<P> The Eiffel Tower was built from 1887 to 1889 . </P>",
    "answers": ["1887 to 1889", "1889"],
    "context_tokens": {"tokens": ["<P>"], "offsets": [0]},
}
HUB_ROWS = {
    "multirc": (
        {
            "paragraph": "<b>Sent 1: </b>Sam ate an apple.<br><b>Sent 2: </b>He was hungry.",
            "question": "What did Sam eat?",
            "answer": "An apple",
            "idx": {"paragraph": 0, "question": 1, "answer": 2},
            "label": 1,
        },
        # markup removed like the authors (<br> -> space, <b> tags dropped), fields in their order
        {
            "source": "question: What did Sam eat? answer: An apple paragraph: Sent 1: Sam ate an apple. "
            "Sent 2: He was hungry.",
            "target": "1",
        },
    ),
    "wic": (
        {
            "word": "place",
            "sentence1": "Do you want to come over to my place later?",
            "sentence2": "A political system with no place for the less prominent groups.",
            "start1": 31,
            "start2": 27,
            "end1": 36,
            "end2": 32,
            "idx": 0,
            "label": 0,
        },
        {
            "source": "sentence1: Do you want to come over to my place later? sentence2: A political system with no "
            "place for the less prominent groups. word: place",
            "target": "0",
        },
    ),
    "wsc": (
        {
            "text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
            "more truthful.",
            "span1_index": 0,
            "span2_index": 13,
            "span1_text": "Mark",
            "span2_text": "He",
            "idx": 0,
            "label": 1,
        },
        {
            "source": "text: * Mark * told Pete many lies about himself, which Pete included in his book. # He # should "
            "have been more truthful.",
            "target": "1",
        },
    ),
    "nq": (
        MRQA_ROW,
        {
            "source": "question: when was the eiffel tower built context: <P> The Eiffel Tower was built from "
            "1887 to 1889 . </P>",
            "target": "1887 to 1889",
            "answers": ["1887 to 1889", "1889"],
        },
    ),
    "hotpotqa": (
        {**MRQA_ROW, "subset": "HotpotQA", "question": "Who?", "context": "Ann did.", "answers": ["Ann"]},
        {"source": "question: Who? context: Ann did.", "target": "Ann", "answers": ["Ann"]},
    ),
    "searchqa": (
        {**MRQA_ROW, "subset": "SearchQA", "question": "Q", "context": "C", "answers": ["A", "B"]},
        {"source": "question: Q context: C", "target": "A", "answers": ["A", "B"]},
    ),
    "newsqa": (
        {**MRQA_ROW, "subset": "NewsQA", "question": "Q2", "context": "C2", "answers": ["A2"]},
        {"source": "question: Q2 context: C2", "target": "A2", "answers": ["A2"]},
    ),
    # option1 and option2 (not option1 twice) under the authors' slot names option0/option1; answer "2" -> "1"
    "winogrande": (
        {
            "sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised "
            "eating intestine.",
            "option1": "Ian",
            "option2": "Dennis",
            "answer": "2",
        },
        {
            "source": "sentence: Ian volunteered to eat Dennis's menudo after already having a bowl because _ "
            "despised eating intestine. option0: Ian option1: Dennis",
            "target": "1",
        },
    ),
    # the authors write Yelp's `text` column as "sentence:"
    "yelp": (
        {"text": "Great tacos, friendly staff.", "label": 1},
        {"source": "sentence: Great tacos, friendly staff.", "target": "1"},
    ),
}


def test_every_registered_task_is_checked_here():
    assert set(SHIPPED) | set(HUB_ROWS) == set(list_tasks(paper_only=True))
    assert len(list_tasks(paper_only=True)) == 22
    generated = {n for n in list_tasks() if n.startswith(("syn-", "stories-"))}
    assert set(list_tasks()) - set(list_tasks(paper_only=True)) == generated
    assert all(get_task(n).generate is not None and get_task(n).hub_path is None for n in generated)


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_task_data(name)) for name in sorted(SHIPPED)])
def test_first_shipped_row_renders_exactly(name):
    split, source, target = SHIPPED[name]
    rows = load_raw_split(name, split, DATA_DIR)
    assert get_task(name).render(rows[0]) == {"source": source, "target": target}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_hub_schema_row_renders_exactly(name):
    row, expected = HUB_ROWS[name]
    assert get_task(name).render(row) == expected


def test_wsc_marks_when_pronoun_comes_first():
    row = {
        "text": "This is a test sentence .",
        "span1_text": "test",
        "span1_index": 3,
        "span2_text": "This",
        "span2_index": 0,
        "label": 0,
        "idx": 0,
    }
    assert get_task("wsc").render(row)["source"] == "text: # This # is a * test * sentence ."


def test_wsc_span_not_at_its_index_is_refused():
    row = {
        "text": "Mark told Pete.",
        "span1_text": "Pete",
        "span1_index": 0,
        "span2_text": "Mark",
        "span2_index": 0,
        "label": 0,
    }
    raises_one_line("'Pete' is not at word 0", get_task("wsc").render, row)


def test_stsb_targets_round_to_one_decimal():
    task = get_task("stsb")
    row = {"sentence1": "a", "sentence2": "b"}
    assert [task.render({**row, "label": x})["target"] for x in (3.333, 2.46666666666667, 0.0, 4.75)] == [
        "3.3",
        "2.5",
        "0.0",
        "4.8",
    ]
    raises_one_line("outside the score range", task.render, {**row, "label": 7.5})


def test_registry_metadata_follows_the_paper():
    hub = {name: (get_task(name).hub_path, get_task(name).hub_config) for name in list_tasks(paper_only=True)}
    assert hub["wsc"] == ("aps/super_glue", "wsc.fixed")
    assert hub["rte"] == ("nyu-mll/glue", "rte") and hub["boolq"] == ("aps/super_glue", "boolq")
    assert hub["paws"] == ("google-research-datasets/paws", "labeled_final")
    assert hub["scitail"] == ("allenai/scitail", "tsv_format")
    assert hub["winogrande"] == ("allenai/winogrande", "winogrande_xl")
    assert hub["yelp"] == ("fancyzhx/yelp_polarity", "plain_text")
    assert hub["nq"] == ("mrqa-workshop/mrqa", "plain_text")
    assert get_task("nq").row_filter == ("subset", "NaturalQuestionsShort")
    rules = {name: get_task(name).split_rule for name in list_tasks(paper_only=True)}
    assert {n for n, r in rules.items() if r == "small"} == {
        "cola",
        "rte",
        "mrpc",
        "stsb",
        "boolq",
        "cb",
        "multirc",
        "wic",
        "wsc",
        "copa",
        "scitail",
    }
    assert {n for n, r in rules.items() if r == "large"} == {
        "qqp",
        "qnli",
        "sst2",
        "yelp",
        "winogrande",
        "nq",
        "hotpotqa",
        "searchqa",
        "newsqa",
    }
    assert rules["mnli"] == "mnli" and rules["paws"] == "original"
    main = {name: get_task(name).metrics[0] for name in list_tasks(paper_only=True)}
    assert main["cola"] == "matthews_corrcoef" and main["stsb"] == "pearson" and main["multirc"] == "f1"
    assert main["nq"] == "squad_f1" and main["rte"] == "accuracy" and get_task("cb").metrics == ("accuracy", "macro_f1")
    assert get_task("mnli").labels == ("0", "1", "2") and get_task("stsb").labels is None
    assert get_task("stsb").kind == "regression" and get_task("newsqa").kind == "qa" and get_task("nq").labels is None


def test_selection_metric_is_the_authors_and_defaults_to_the_headline():
    # The authors' metric_for_best_model is TASK_TO_METRICS[task][0]: f1_multiclass for CB, em for MRQA.
    selection = {name: get_task(name).selection_metric for name in list_tasks(paper_only=True)}
    assert selection["cb"] == "macro_f1" and get_task("cb").metrics[0] == "accuracy"
    assert {selection[n] for n in ("nq", "hotpotqa", "searchqa", "newsqa")} == {"squad_em"}
    assert get_task("nq").metrics[:2] == ("squad_f1", "squad_em")
    others = set(selection) - {"cb", "nq", "hotpotqa", "searchqa", "newsqa"}
    assert all(selection[n] == get_task(n).metrics[0] for n in others)
    with pytest.raises(PipelineError, match="selection_metric 'f1' must be one of its metrics accuracy"):
        replace(get_task("rte"), selection_metric="f1")


def test_yelp_trains_on_the_first_100k_rows_after_holding_out_validation():
    from pipeline.tasks.splits import apply_split_rule, seeded_permutation

    assert get_task("yelp").train_limit == 100_000 and get_task("yelp").eval_split == "test"
    rows = [{"id": i} for i in range(1_030)]
    small = replace(get_task("yelp"), train_limit=20)  # the same rule, scaled down
    splits = apply_split_rule(small, ("train", "validation"), lambda split: rows)
    order = seeded_permutation(1_030, 42)
    assert [r["id"] for r in splits["validation"]] == order[:1000]
    assert [r["id"] for r in splits["train"]] == order[1000:1020]  # the authors' select(range(N)) after the split


# Synthetic tasks (the quickstart's) are registered tasks -------------------------------------------------


def test_synthetic_tasks_load_like_any_task():
    task = get_task("syn-target-food")
    assert task.kind == "classification" and task.labels == ("0", "1") and task.hub_path is None
    splits = load_task_splits("syn-target-food", DATA_DIR / "no-such-folder")  # generated: no data folder needed
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "validation": 200, "test": 200}
    assert splits["test"] == load_task_splits(task, splits=("test",))["test"]  # deterministic
    assert {r["target"] for r in splits["train"]} == {"0", "1"}
    assert all(r["source"].startswith("sentence: ") for r in splits["train"])
    warm = load_task_splits("syn-warm-animal", splits=("train",))["train"]
    assert all(r["source"].startswith("rule: animal sentence: ") for r in warm)
    provenance = {}
    load_task_splits(task, splits=("test",), provenance=provenance)
    assert provenance["test"]["source"] == "generated" and provenance["test"]["rows"] == 200


def test_synthetic_task_names_cannot_be_reused_by_custom_tasks():
    raises_one_line(
        "is a built-in task",
        custom_task,
        {
            "name": "syn-target-food",
            "data_files": {"train": "t.csv"},
            "input_columns": ["x"],
            "label_column": "y",
            "metric": "accuracy",
        },
    )


# Custom tasks -------------------------------------------------------------------------------------------


def write_reviews_csv(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    header = "review_id,headline,body,stars\n"
    train = header + "".join(f'{i},"Title {i}","Body, with comma {i}",{"pos" if i % 2 else "neg"}\n' for i in range(6))
    dev = header + "".join(f"{100 + i},T{i},B{i},{'pos' if i % 3 else 'neg'}\n" for i in range(7))
    (folder / "train.csv").write_text(train, encoding="utf-8")
    (folder / "dev.csv").write_text(dev, encoding="utf-8")
    return {"train": str(folder / "train.csv"), "validation": str(folder / "dev.csv")}


def test_custom_task_from_csv_with_template_and_label_words(tmp_path):
    files = write_reviews_csv(tmp_path / "reviews")
    task = custom_task(
        {
            "name": "reviews",
            "data_files": files,
            "input_columns": ["headline", "body"],
            "template": "review: {headline} | {body}",
            "label_column": "stars",
            "label_words": {"neg": "0", "pos": "1"},
            "metric": "accuracy",
        }
    )
    assert task.labels == ("0", "1") and task.kind == "classification" and task.split_rule == "small"
    rows = load_raw_split(task, "train")
    assert task.render(rows[1]) == {"source": "review: Title 1 | Body, with comma 1", "target": "1"}
    splits = load_task_splits(task)
    # small rule: train = train (6 rows); the 7 validation rows split 3 (validation) / 4 (test)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 3, "test": 4}
    assert splits["train"][0] == {"id": 0, "source": "review: Title 0 | Body, with comma 0", "target": "0"}


def test_custom_task_default_joining_and_raw_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Is it?", "ctx": "Yes.", "y": 1, "id": "a"}])
    task = custom_task(
        {
            "name": "mine",
            "data_files": {"train": str(path)},
            "input_columns": ["q", "ctx"],
            "label_column": "y",
            "metric": "f1",
            "split_rule": "original",
        }
    )
    assert task.labels is None
    assert load_task_splits(task, splits=("train",))["train"] == [
        {"id": "a", "source": "q: Is it? ctx: Yes.", "target": "1"}
    ]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"metric": "bleu"}, "metric 'bleu'"),
        ({"template": "x: {missing}"}, "template uses missing"),
        ({"template": "x: {}"}, "must name its columns"),
        ({"split_rule": "mnli"}, "split_rule 'mnli'"),
        ({"data_files": {"train": "x.txt"}}, "must end in .jsonl"),
        ({"data_files": {"dev": "x.csv"}}, "split 'dev'"),
        ({"name": "rte"}, "is a built-in task"),
    ],
)
def test_custom_task_spec_errors_name_the_problem(spec, fragment):
    base = {
        "name": "mine",
        "data_files": {"train": "t.csv"},
        "input_columns": ["text"],
        "label_column": "label",
        "metric": "accuracy",
    }
    raises_one_line(fragment, custom_task, {**base, **spec})


def test_custom_task_missing_required_key():
    raises_one_line(
        "lacks label_column, metric",
        custom_task,
        {"name": "m", "data_files": {"train": "t.csv"}, "input_columns": ["a"]},
    )


# Loading and its errors ---------------------------------------------------------------------------------


def test_unknown_task_names_the_known_ones():
    message = raises_one_line("unknown task 'glue-rte'", get_task, "glue-rte")
    assert "rte" in message and "winogrande" in message


def test_missing_split_file(tmp_path):
    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}])
    raises_one_line(f"{tmp_path / 'rte' / 'validation'}", load_raw_split, "rte", "validation", tmp_path)
    raises_one_line("no 'validation' data for task 'rte'", load_task_splits, "rte", tmp_path)


def test_data_dir_falls_back_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path and resolve_data_dir("elsewhere") == Path("elsewhere")
    write_jsonl(tmp_path / "cola" / "train.jsonl", [{"sentence": "Hi.", "label": 1, "idx": 7}])
    assert load_raw_split("cola", "train") == [{"sentence": "Hi.", "label": 1, "idx": 7}]


def test_missing_column_is_named(tmp_path):
    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"sentence1": "a", "label": 0, "idx": 0}])
    raises_one_line("lacks column(s) sentence2", load_raw_split, "rte", "train", tmp_path)


def test_label_outside_label_set_names_the_row(tmp_path):
    rows = [
        {"premise": "p", "hypothesis": "h", "label": 0, "idx": 0},
        {"premise": "p", "hypothesis": "h", "label": 3, "idx": 41},
    ]
    write_jsonl(tmp_path / "cb" / "train.jsonl", rows)
    message = raises_one_line("row 2 (id 41)", load_raw_split, "cb", "train", tmp_path)
    assert "label 3" in message and "0, 1, 2" in message


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text("\n", encoding="utf-8")
    raises_one_line("has no rows", load_raw_split, "sst2", "train", tmp_path)


def test_corrupt_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rte" / "train.jsonl"
    write_jsonl(path, [{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"sentence1": "broken\n')
    raises_one_line(f"{path} line 2 is not valid JSON", load_raw_split, "rte", "train", tmp_path)


def test_parquet_and_csv_files_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "scitail"
    folder.mkdir()
    pq.write_table(
        pa.table({"premise": ["p"], "hypothesis": ["h"], "label": ["entails"]}), folder / "validation.parquet"
    )
    (folder / "train.csv").write_text("premise,hypothesis,label\nP,H,neutral\n", encoding="utf-8")
    assert get_task("scitail").render(load_raw_split("scitail", "validation", tmp_path)[0])["target"] == "0"
    assert get_task("scitail").render(load_raw_split("scitail", "train", tmp_path)[0]) == {
        "source": "premise: P hypothesis: H",
        "target": "1",
    }


def test_mrqa_local_file_keeps_only_its_subset(tmp_path):
    rows = [{**MRQA_ROW, "qid": "n1"}, {**MRQA_ROW, "qid": "h1", "subset": "HotpotQA"}, {**MRQA_ROW, "qid": "n2"}]
    write_jsonl(tmp_path / "nq" / "validation.jsonl", rows)
    assert [r["qid"] for r in load_raw_split("nq", "validation", tmp_path)] == ["n1", "n2"]
    write_jsonl(tmp_path / "newsqa" / "validation.jsonl", rows)
    raises_one_line("subset=NewsQA", load_raw_split, "newsqa", "validation", tmp_path)


def test_mnli_accepts_split_names_and_validation_matched_alias(tmp_path):
    row = {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}
    write_jsonl(tmp_path / "mnli" / "train.jsonl", [row] * 3)
    write_jsonl(tmp_path / "mnli" / "validation_matched.jsonl", [{**row, "premise": "matched"}])
    write_jsonl(tmp_path / "mnli" / "validation.jsonl", [{**row, "premise": "plain"}])
    write_jsonl(tmp_path / "mnli" / "validation_mismatched.jsonl", [{**row, "premise": "mismatched"}] * 2)
    splits = load_task_splits("mnli", tmp_path)
    assert splits["test"][0]["source"] == "premise: matched hypothesis: h"  # the explicit name wins
    assert splits["validation"][0]["source"] == "premise: mismatched hypothesis: h"
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "validation": 2, "test": 1}
