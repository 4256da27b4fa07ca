"""The catalogue of bad inputs: every command refuses them with one clear line on stderr (what was wrong and how
to fix it), exit status 2, no traceback, and no partial output.

Each case runs the CLI's `main` in-process (a one-rank process group: no subprocess per case); a few run the
installed `dept` console script in a subprocess too, as a user would. Cases that need a trained adapter share one
tiny run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import missing_task_data, run, why_missing, write_toy_task
from support import train_argv

from pipeline.cli import main

pytestmark = pytest.mark.usefixtures("one_process_group")

CATALOGUE: dict[str, tuple] = {}


def case(name: str, expected: str, makes: str | None = "out", data: tuple[str, ...] = ()):
    """Register a bad-input case: a function (ctx) -> CLI args; `expected` must appear in the one error line;
    `makes` names the path (relative to the case's tmp dir) that must not exist afterwards; `data` the shipped task
    folders it reads (skipped with the reason where they are absent)."""

    def register(build):
        CATALOGUE[name] = (build, expected, makes, data)
        return build

    return register


def train(ctx, *extra, data=None):
    return train_argv(
        str(ctx["model"]),
        str(ctx["tmp"] / "out"),
        *extra,
        train_file=str(data or ctx["data"]),
        batch_size="4",
        steps="2",
        warmup_steps="1",
    )


def task_train(ctx, *extra):
    return train_argv(str(ctx["model"]), str(ctx["tmp"] / "out"), *extra, batch_size="4", steps="2", warmup_steps="1")


# -- models, DePT shapes, configs --------------------------------------------------------------------------
case("unknown model path", "does not exist: pass a hub name, a local model directory, a shipped model (stories260K)")(
    lambda c: [*train(c)[:2], "./no/such/model", *train(c)[3:]]
)
case("unknown hub model name", "not reachable on the hub")(
    lambda c: [*train(c)[:2], "no-such-org/no-such-model", *train(c)[3:]]
)
case("unknown random preset", "unknown random preset")(lambda c: [*train(c)[:2], "random:t5-huge", *train(c)[3:]])
case("negative m", "--num_virtual_tokens: must be at least 0")(lambda c: train(c, "--num_virtual_tokens", "-1"))
case("r beyond min(s, d)", "exceeds min(s=16")(lambda c: train(c, "--lora_rank", "40"))
case("m = 0 and r = 0", "nothing to train")(lambda c: train(c, "--num_virtual_tokens", "0", "--lora_rank", "0"))
case("budget cannot be met", "budget cannot be met")(lambda c: train(c, "--lora_rank", "none", "--budget_tokens", "2"))
case("s out of range", "--max_length: must be at least 1")(lambda c: train(c, "--max_length", "0"))
case("unknown method", "'adapter' is not one of dept, pt, lora, finetune")(lambda c: train(c, "--method", "adapter"))
case("unknown prompt init", "'WORDS' is not one of TEXT, VOCAB, RANDOM")(lambda c: train(c, "--prompt_init", "WORDS"))
case("missing DeepSpeed config", "DeepSpeed config")(lambda c: train(c, "--ds_config", str(c["tmp"] / "nope.json")))
case("DeepSpeed config not JSON", "is not valid JSON")(lambda c: train(c, "--ds_config", str(c["bad_json"])))
case("batch size zero", "--batch_size: must be at least 1")(lambda c: train(c, "--batch_size", "0"))
case("bad on_nonfinite", "'ignore' is not one of stop, skip")(lambda c: train(c, "--on_nonfinite", "ignore"))
case("bad eval mode", "'beam' is not one of generate, score")(
    lambda c: task_train(c, "--task", "rte", "--eval_mode", "beam")
)

case("typo'd flag", "unknown flag --learning_rate")(lambda c: train(c, "--learning_rate", "1e-4"))
case("steps not a number", "--steps: expected an integer, got 'ten'")(lambda c: train(c, "--steps", "ten"))
case("negative learning rate", "--lr_prompt: must be at least 0")(lambda c: train(c, "--lr_prompt", "-1"))
case("warmup never ends", "warmup_steps 500 >= steps 30")(lambda c: train(c, "--steps", "30", "--warmup_steps", "500"))
case("batch not divisible by accumulation", "batch_size 4 is not divisible by grad_accum 3")(
    lambda c: train(c, "--grad_accum", "3")
)
case("unknown shipped DeepSpeed config", "neither a shipped DeepSpeed config")(
    lambda c: train(c, "--ds_config", "zero9")
)
case("misspelt shipped DeepSpeed config", "'zero3_cpuu' (did you mean 'zero3_cpu'?)")(
    lambda c: train(c, "--ds_config", "zero3_cpuu")
)
case("DeepSpeed config not ZeRO-3", "ZeRO stage 2")(lambda c: train(c, "--ds_config", str(c["zero2"])))

# -- data ----------------------------------------------------------------------------------------------
case("no data source", "a job needs data: --task NAME")(lambda c: task_train(c))
case("two data sources", "give tasks (--task / --custom_task) or train_file, not both")(
    lambda c: task_train(c, "--task", "rte", "--train_file", str(c["data"]))
)
case("missing train file", "does not exist")(lambda c: train(c, data=str(c["tmp"] / "nope.jsonl")))
case("corrupt JSONL line", "line 3")(lambda c: train(c, data=str(c["corrupt"])))
case("missing split file", "validation")(lambda c: task_train(c, "--task", "qqp"))  # shipped QQP has no validation
case("empty data", "no rows")(lambda c: task_train(c, "--custom_task", str(c["custom_empty"])))
case("unknown task", "unknown task 'rtee' (did you mean 'rte'?)")(lambda c: task_train(c, "--task", "rtee"))
case("misspelt shipped model", "(did you mean 'stories260K'?)")(lambda c: [*train(c)[:2], "Stories260k", *train(c)[3:]])
case("k larger than a class allows", "but the data has only", data=("cb",))(
    lambda c: task_train(c, "--task", "cb", "--k", "999")
)
case("k smaller than the classes", "smaller than the 3 classes", data=("cb",))(
    lambda c: task_train(c, "--task", "cb", "--k", "2")
)
case("custom task: missing column", "review")(lambda c: task_train(c, "--custom_task", str(c["custom_missing_column"])))
case("custom task: label outside the set", "label")(
    lambda c: task_train(c, "--custom_task", str(c["custom_bad_label"]))
)
case("custom task file not a mapping", "must hold a mapping")(
    lambda c: task_train(c, "--custom_task", str(c["not_mapping"]))
)
case("custom task: unknown key", "unknown")(lambda c: task_train(c, "--custom_task", str(c["custom_unknown_key"])))

# -- adapters ------------------------------------------------------------------------------------------
case("init adapter missing", "does not exist")(lambda c: train(c, "--init_adapter", str(c["tmp"] / "none")))
case("init adapter m/r mismatch", "has num_virtual_tokens=4 but 6 was given")(
    lambda c: train(c, "--num_virtual_tokens", "6", "--init_adapter", str(c["adapter"]))
)
case("init adapter s mismatch", "has max_length s=16 (rows of A) but 12 was given")(
    lambda c: train(c, "--max_length", "12", "--init_adapter", str(c["adapter"]))
)
case("init adapter tampered", "checksum")(lambda c: train(c, "--init_adapter", str(c["tampered"])))
case("finished run without --overwrite", "already holds a finished job", makes=None)(
    lambda c: train(c)[:4] + [str(c["finished"])] + train(c)[5:]
)
case("predict: adapter missing", "does not exist", makes="preds.jsonl")(
    lambda c: [
        "predict",
        "--model",
        str(c["model"]),
        "--adapter",
        str(c["tmp"] / "none"),
        "--data",
        str(c["data"]),
        "--output",
        str(c["tmp"] / "preds.jsonl"),
    ]
)
case("predict: no source column", "no 'source' column", makes="preds.jsonl")(
    lambda c: [
        "predict",
        "--model",
        str(c["model"]),
        "--adapter",
        str(c["adapter"]),
        "--data",
        str(c["no_source"]),
        "--output",
        str(c["tmp"] / "preds.jsonl"),
    ]
)
case("evaluate: unknown split", "'dev' is not one of train, validation, test")(
    lambda c: [
        "evaluate",
        "--model",
        str(c["model"]),
        "--adapter",
        str(c["adapter"]),
        "--task",
        "rte",
        "--split",
        "dev",
    ]
)
case("export a DePT adapter to PEFT", "PEFT has no DePT", makes="peft")(
    lambda c: ["export-adapter", str(c["adapter"]), str(c["tmp"] / "peft")]
)
case("import a non-DePT adapter", "PROMPT_TUNING_LORA", makes="imported")(
    lambda c: ["import-adapter", str(c["lora_dir"]), str(c["tmp"] / "imported")]
)

# -- recipes and tracking --------------------------------------------------------------------------------
case("recipe file missing", "nor an existing file", makes=None)(lambda c: ["run", str(c["tmp"] / "nope.yaml")])
case("misspelt shipped recipe", "recipe 'quickstrat' (did you mean 'quickstart'?)", makes=None)(
    lambda c: ["run", "quickstrat"]
)
case("recipe not YAML", "is not valid YAML", makes=None)(lambda c: ["run", str(c["bad_yaml"])])
case("recipe unknown key", "recipe.stages[0].tasx: unknown key (did you mean 'tasks'?)")(
    lambda c: ["run", str(c["recipe_unknown_key"])]
)
case("recipe override of a missing stage", "no stage 'nope'")(
    lambda c: ["run", "quickstart", f"--output_dir={c['tmp'] / 'out'}", "--stages.nope.train.steps=3"]
)
case("file tracking store", "MLFLOW_ALLOW_FILE_STORE")(
    lambda c: ["run", "quickstart", f"--output_dir={c['tmp'] / 'out'}", f"--tracking.uri=file://{c['tmp'] / 'mlruns'}"]
)


@pytest.fixture(scope="module")
def shared(tiny_models, tmp_path_factory):
    """Inputs the cases need: a finished tiny run (its adapter), corrupt and tampered files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_toy_task(root / "toy.jsonl", n=16)
    finished = root / "finished"
    assert (
        main(
            train_argv(
                str(tiny_models["t5"]), str(finished), train_file=str(data), batch_size="4", steps="2", warmup_steps="1"
            )
        )
        == 0
    )
    tampered = root / "tampered"
    shutil.copytree(finished / "adapter", tampered)
    weights = tampered / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    corrupt = root / "corrupt.jsonl"
    lines = data.read_text().splitlines()
    corrupt.write_text("\n".join(lines[:2] + ['{"source": "broken'] + lines[2:]) + "\n")
    (root / "bad.json").write_text("{zero_optimization: 3")
    (root / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    (root / "bad.yaml").write_text("name: [unclosed\n")
    (root / "not_mapping.yaml").write_text("- a\n- b\n")
    (root / "no_source.jsonl").write_text('{"text": "hello"}\n')
    lora = root / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (lora / "adapter_model.bin").write_bytes(b"not used")
    csv_file = root / "reviews.csv"
    csv_file.write_text("text,stars\ngood film,5\nbad film,1\nfine film,3\n")
    base = {
        "name": "stars",
        "data_files": {"train": str(csv_file), "validation": str(csv_file)},
        "input_columns": ["text"],
        "label_column": "stars",
        "metric": "accuracy",
    }
    import yaml

    (root / "custom_missing_column.yaml").write_text(yaml.safe_dump({**base, "input_columns": ["review"]}))
    (root / "custom_bad_label.yaml").write_text(yaml.safe_dump({**base, "label_words": {1: "neg", 5: "pos"}}))
    empty_csv = root / "empty.csv"
    empty_csv.write_text("text,stars\n")
    (root / "custom_empty.yaml").write_text(
        yaml.safe_dump({**base, "data_files": {"train": str(empty_csv), "validation": str(csv_file)}})
    )
    (root / "custom_unknown_key.yaml").write_text(yaml.safe_dump({**base, "colour": "blue"}))
    (root / "recipe_unknown_key.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "model": "random:tiny-t5",
                "output_dir": str(root / "never"),
                "stages": [{"name": "a", "tasx": ["rte"]}],
            }
        )
    )
    return {
        "model": tiny_models["t5"],
        "data": data,
        "adapter": finished / "adapter",
        "finished": finished,
        "tampered": tampered,
        "corrupt": corrupt,
        "bad_json": root / "bad.json",
        "zero2": root / "zero2.json",
        "bad_yaml": root / "bad.yaml",
        "not_mapping": root / "not_mapping.yaml",
        "no_source": root / "no_source.jsonl",
        "lora_dir": lora,
        "custom_missing_column": root / "custom_missing_column.yaml",
        "custom_bad_label": root / "custom_bad_label.yaml",
        "custom_empty": root / "custom_empty.yaml",
        "custom_unknown_key": root / "custom_unknown_key.yaml",
        "recipe_unknown_key": root / "recipe_unknown_key.yaml",
    }


def test_the_catalogue_is_large():
    assert len(CATALOGUE) >= 25


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_refused_with_one_line(name, shared, tmp_path, capsys, monkeypatch):
    build, expected, makes, data = CATALOGUE[name]
    if missing_task_data(*data):
        pytest.skip(why_missing(missing_task_data(*data)))
    ctx = {**shared, "tmp": tmp_path}
    before = sorted(p.name for p in Path(shared["finished"]).iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: fail fast, not after retries
    monkeypatch.chdir(tmp_path)
    rc = main(build(ctx))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2, f"{name}: exit {rc}\n{err[-2000:]}"
    assert len(errors) == 1 and expected in errors[0], f"{name}: {errors or err.splitlines()[-3:]}"
    if makes:
        assert not (tmp_path / makes).exists(), f"{name}: left {makes} behind"
    assert sorted(p.name for p in Path(shared["finished"]).iterdir()) == before  # nothing else touched


@pytest.mark.slow
@pytest.mark.parametrize("name", ["typo'd flag", "init adapter tampered", "recipe not YAML"])
def test_the_console_script_exits_2_with_one_line_and_no_traceback(name, shared, tmp_path):
    build, expected, _, _ = CATALOGUE[name]
    proc = run(build({**shared, "tmp": tmp_path}), check=False, env={"HF_HUB_OFFLINE": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
