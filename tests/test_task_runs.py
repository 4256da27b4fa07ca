"""Real tasks end to end: tiny backbones train on shipped RTE on 2 CPU ranks, pick a best step on validation,
report test metrics; predict and evaluate reuse the adapter; a custom CSV task trains; bad input is refused."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import needs_task_data, read_results, run
from support import train_argv

pytestmark = pytest.mark.slow


def rte_args(model_dir, out, mode, *extra):
    return train_argv(
        str(model_dir),
        str(out),
        *extra,
        task="rte",
        max_length="96",
        batch_size="8",
        steps="24",
        warmup_steps="4",
        eval_every="8",
        eval_mode=mode,
        max_eval_rows="24",
        lr_lowrank="0.01",
    )


@needs_task_data("rte")
@pytest.mark.parametrize("arch,mode", [("t5", "generate"), ("llama", "score")])  # LLaMA generation: test_real_backbone
def test_tiny_backbone_trains_on_rte_on_two_ranks(arch, mode, tiny_models, tmp_path):
    run(rte_args(tiny_models[arch], tmp_path / "run", mode), nproc=2, launcher="deepspeed")
    result = read_results(tmp_path / "run")
    assert result["world_size"] == 2 and result["tasks"] == ["rte"]
    assert [e["step"] for e in result["evals"]] == [8, 16, 24]
    best = max(result["evals"], key=lambda e: e["score"])
    assert result["best_step"] == best["step"] and result["best_validation"] == best["score"]
    assert set(result["test"]) >= {"accuracy", "invalid", "score", "n"} and result["test"]["n"] == 24
    assert 0 <= result["test"]["accuracy"] <= 100
    if mode == "score":
        assert result["test"]["invalid"] == 0  # ranking label strings never produces an invalid output
    assert (tmp_path / "run" / "best_adapter" / "adapter_model.safetensors").exists()
    assert result["data_sizes"]["rte"]["train"] == 2490


@needs_task_data("rte")
def test_predict_and_evaluate_reuse_the_adapter(tiny_models, tmp_path):
    model = tiny_models["t5"]
    run(rte_args(model, tmp_path / "run", "score"), nproc=2, launcher="deepspeed")
    rows = tmp_path / "rows.jsonl"
    from pipeline.tasks import load_raw_split

    raw = load_raw_split("rte", "validation")[:10]
    rows.write_text("".join(json.dumps(r) + "\n" for r in raw))
    out = tmp_path / "preds.jsonl"
    run(
        [
            "predict",
            "--model",
            str(model),
            "--adapter",
            str(tmp_path / "run" / "best_adapter"),
            "--data",
            str(rows),
            "--task",
            "rte",
            "--output",
            str(out),
            "--mode",
            "score",
        ],
        nproc=2,
        launcher="deepspeed",
    )
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["idx"] for r in raw]
    assert all(p["prediction"] in ("0", "1") and p["label"] == str(r["label"]) for p, r in zip(preds, raw))
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(100 * sum(p["prediction"] == p["label"] for p in preds) / 10)

    shown = run(
        [
            "evaluate",
            "--model",
            str(model),
            "--adapter",
            str(tmp_path / "run" / "best_adapter"),
            "--task",
            "rte",
            "--split",
            "test",
            "--mode",
            "score",
            "--max_rows",
            "24",
        ]
    )
    evaluated = json.loads(shown.stdout[shown.stdout.index("{") :])
    assert evaluated["accuracy"] == pytest.approx(read_results(tmp_path / "run")["test"]["accuracy"])


def test_custom_csv_task_declared_in_a_recipe_trains_and_evaluates(tiny_models, tmp_path):
    import yaml

    for split, n in (("train", 40), ("validation", 12)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["review_text", "stars"])
            writer.writeheader()
            for i in range(n):
                writer.writerow(
                    {
                        "review_text": ("great fun film" if i % 2 else "awful boring film") + f" {i}",
                        "stars": 5 if i % 2 else 1,
                    }
                )
    task = {
        "name": "stars",
        "data_files": {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "validation.csv")},
        "input_columns": ["review_text"],
        "label_column": "stars",
        "label_words": {1: "negative", 5: "positive"},
        "template": "review: {review_text}",
        "metric": "accuracy",
    }
    recipe = {
        "name": "custom",
        "model": str(tiny_models["t5"]),
        "output_dir": str(tmp_path / "out"),
        "dept": {"num_virtual_tokens": 4, "r": 2, "max_length": 32},
        "train": {"batch_size": 8, "steps": 8, "warmup_steps": 2},
        "data": {"eval_mode": "score"},
        "tracking": {"enabled": False},
        "stages": [{"name": "stars", "tasks": [task]}],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run(["run", str(tmp_path / "recipe.yaml")])
    result = read_results(tmp_path / "out" / "stars")
    assert result["tasks"] == ["stars"] and result["test"]["n"] == 6 and result["validation"]["n"] == 6
    assert set(result["test"]) >= {"accuracy", "invalid"}
