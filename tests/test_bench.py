"""`dept bench`: its flags (derived from CompareArgs and ScaleArgs, presets, one-line refusals), the rows it plans, that it is a
client of the library (no DeepSpeed names, no torch at import), and end to end in a subprocess: the compare table
on a tiny geometry (real engine, real RTE lengths, PEFT reference, MLflow) and the 2-rank scale run."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO, needs_task_data, run

from pipeline.bench import bench_flags
from pipeline.bench.output import MEASURED
from pipeline.bench.settings import PRESETS, REFS, CompareArgs, ScaleArgs, bench_args, with_model_overrides
from pipeline.bench.variants import plan_variants
from pipeline.dept import count_trainable, rank_for_budget
from pipeline.errors import PipelineError


def test_bench_help_is_derived_from_the_settings_classes():
    """Every CompareArgs field is a flag of `dept bench --help` with its own help text; scale mode's defaults (from
    ScaleArgs) and the presets are listed."""
    proc = run(["bench", "--help"])
    text = proc.stdout
    for spec in dataclasses.fields(CompareArgs):
        line = next((x for x in text.splitlines() if x.strip().startswith(f"--{spec.name} ")), None)
        assert line is not None, f"--{spec.name} missing from dept bench --help"
        assert spec.metadata["help"][:40] in line, spec.name
    assert "rank_for_budget" in text and "compare | scale" in text
    for preset in PRESETS:
        assert f"  {preset} " in text, preset
    flags = bench_flags()
    assert list(flags) == [f.name for f in dataclasses.fields(CompareArgs)]
    assert "scale mode's defaults (--mode scale): mode=scale model=random:llama-7b ms=60 max_length=64" in text
    assert flags["group_by_length"] is bool and flags["memory_profile"] is bool  # bare --flag on the command line


def test_bench_presets_yield_to_explicit_flags_and_set_mode_defaults():
    paper = bench_args({"preset": "paper", "batch_size": "4", "ms": "40,60"})  # strings, as the command line gives
    assert (paper.batch_size, paper.ms, paper.grad_accum, paper.model) == (4, [40, 60], 4, "random:t5-base")
    assert paper.refs == list(REFS) and paper.ds_config == "zero3_cpu"
    scale = bench_args({"preset": "scale-dev", "layers": 2, "ms": (8, 16)})  # fire's parsed values work too
    assert (scale.mode, scale.hidden, scale.layers, scale.ms) == ("scale", 256, 2, [8])  # scale keeps the first m
    assert (scale.ds_config, scale.refs, scale.batch_size, scale.max_length) == ("zero3_cpu_bf16", [], 0, 64)
    assert bench_args({"mode": "scale", "refs": "bare"}).refs == ["bare"]
    assert bench_args({"refs": "none"}).refs == [] and bench_args({"refs": "all"}).refs == list(REFS)
    assert bench_args({}).mode == "compare" and bench_args({}).ms == [0, 20, 40, 60, 80, 100]
    for name in PRESETS:  # every preset is a valid setting
        assert bench_args({"preset": name}).preset == name


def test_each_mode_has_its_own_settings_class_with_the_same_flags():
    """#23: scale mode's defaults are ScaleArgs' own, not patched into compare mode's class."""
    assert [f.name for f in dataclasses.fields(ScaleArgs)] == [f.name for f in dataclasses.fields(CompareArgs)]
    for spec, scale_spec in zip(dataclasses.fields(CompareArgs), dataclasses.fields(ScaleArgs)):
        assert spec.metadata == scale_spec.metadata, spec.name  # same help and minimum
    scale, compare = bench_args({"mode": "scale"}), bench_args({})
    assert type(scale) is ScaleArgs and type(compare) is CompareArgs
    assert (scale.model, scale.ms, scale.steps, scale.infer_repeats) == ("random:llama-7b", [60], 3, 0)
    assert (compare.model, compare.max_length, compare.batch_size, compare.steps) == ("random:t5-base", 256, 8, 5)
    assert type(bench_args({"preset": "scale-llama-7b"})) is ScaleArgs
    assert type(bench_args({"preset": "paper", "mode": "compare"})) is CompareArgs


def test_bench_model_overrides_follow_the_architecture():
    llama = with_model_overrides(
        bench_args(
            {"mode": "scale", "model": "random:tiny-llama", "hidden": 256, "overrides": '{"num_key_value_heads": 1}'}
        )
    )
    assert llama.overrides == {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}
    t5 = with_model_overrides(bench_args({"model": "random:tiny-t5", "hidden": 128, "layers": 3}))
    assert t5.overrides == {"d_model": 128, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 2, "d_kv": 64}


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"ms": "0,120", "pt_tokens": 100}, "every m in --ms must lie in 0..l"),
        ({"preset": "papr"}, "did you mean 'paper'"),
        ({"refs": "bare,nope"}, "refs[1]: 'nope' is not one of"),
        ({"refs": "none,bare"}, "all and none stand alone"),
        ({"steps": "0"}, "steps: must be at least 1"),
        ({"mode": "scale", "grad_accum": 2}, "leave --grad_accum at 1"),
        ({"hidden": 64, "model": "./my-model"}, "--hidden needs a random:<preset> model"),
        ({"ds_config": "zero9"}, "neither a shipped DeepSpeed config"),
        ({"batch_size": 0}, "--batch_size must be at least 1 in compare mode"),
        ({"lenghts": "rte"}, "did you mean 'lengths'"),
    ],
)
def test_bench_args_refuse_bad_values_in_one_line(flags, message):
    with pytest.raises(PipelineError, match=re.escape(message)) as caught:
        bench_args(flags)
    assert "\n" not in str(caught.value)


def test_bench_plans_budget_rows_then_reference_rows():
    rows = plan_variants(bench_args({"ms": "40,100", "max_length": 48, "lengths": "rte"}), d_model=64)
    r = rank_for_budget(100, 40, 48, 64)
    assert [v.key for v in rows] == [
        f"dept_m40_r{r}",
        "pt_l100",
        "pt_l100_pad48",
        "bare_p40",
        "bare_p100",
        "eager_bare_p100",
        "eager_pt_l100",
        "peft_pt_l100",
    ]
    assert [v.loop for v in rows[-3:]] == ["eager", "eager", "peft"]
    padded = plan_variants(bench_args({"ms": "60", "refs": "padded,bare"}), d_model=768)
    assert [v.key for v in padded] == ["dept_m60_r30", "bare_p60"]  # inputs padded to s already: no padded row
    with pytest.raises(PipelineError, match="nothing to train"):
        plan_variants(bench_args({"ms": "0", "pt_tokens": 1}), d_model=64)


def test_importing_the_bench_package_imports_no_torch():
    code = "import sys, pipeline.bench; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_bench_source_names_no_deepspeed_internals():
    """The bench is a client of the library: DeepSpeed is reached only through pipeline.engine."""
    forbidden = re.compile(r"deepspeed|ds_numel|ds_tensor|ds_id|GatheredParameters")
    files = sorted((REPO / "pipeline" / "bench").glob("**/*.py"))
    assert len(files) >= 8
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert not hits, hits


@pytest.mark.slow
@needs_task_data("rte")  # --lengths rte: real RTE lengths
def test_bench_compare_tiny_writes_table_json_plot_and_mlflow_run(tmp_path):
    out = tmp_path / "bench"
    db = tmp_path / "ml" / "mlflow.db"
    proc = run(
        [
            "bench",
            "--model",
            "random:tiny-t5",
            "--ms",
            "40,100",
            "--pt_tokens",
            "100",
            "--max_length",
            "48",
            "--batch_size",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--lengths",
            "rte",
            "--group_by_length",
            "--infer_repeats",
            "1",
            "--output_dir",
            str(out),
            "--mlflow_uri",
            f"sqlite:///{db}",
        ],
        timeout=300,
    )

    for name in ("bench.md", "bench.json", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The Markdown table (also printed) has every column, one line per configuration, and the paired ratios:
    # measurements only, no verdicts (the thresholds are quoted in docs/bench.md, #23).
    table = (out / "bench.md").read_text()
    assert table in proc.stdout
    header = next(line for line in table.splitlines() if line.startswith("| configuration"))
    for column in (
        "step s (median)",
        "step s (min .. max)",
        "tokens/s",
        "time / PT l",
        "time / bare same length",
        "step tensor peak MB",
        "RSS peak MB",
        "inference s (median)",
        "epoch est. s",
        "m",
        "r",
    ):
        assert f"| {column} |" in header, column
    assert "## Paired ratios" in table and "pipeline overhead" in table and "PEFT" in table
    assert "verdict" not in table and "meets" not in table and "misses" not in table
    assert "batches of similar lengths" in table

    result = json.loads((out / "bench.json").read_text())
    rows = {row["key"]: row for row in result["rows"]}
    # two configurations at the budget of l = 100, plus the reference rows (bare at both lengths, padded PT,
    # PT and bare without engine, PEFT, LoRA)
    r = rank_for_budget(100, 40, 48, 64)  # 34 for tiny-t5 (d = 64) at s = 48
    assert {
        f"dept_m40_r{r}",
        "pt_l100",
        "pt_l100_pad48",
        "bare_p40",
        "bare_p100",
        "eager_bare_p100",
        "eager_pt_l100",
        "peft_pt_l100",
        "lora_r4",  # PEFT's LoRA at PT's budget: 6,400 / (12 q, v layers x (64 + 64)) = 4.2 -> r = 4
    } == set(rows)
    assert rows["lora_r4"]["trainable"] == 4 * 12 * 128 and rows["lora_r4"]["harness"] == "DeepSpeed ZeRO-3"
    assert rows["lora_r4"]["x_pt"]["n"] == 2 and rows["lora_r4"]["enc_tokens"] < rows["pt_l100"]["enc_tokens"]
    assert rows[f"dept_m40_r{r}"]["trainable"] == count_trainable(40, r, 48, 64) <= rows["pt_l100"]["trainable"] == 6400
    for key, row in rows.items():
        assert row["loss_finite"], key
        assert len(row["times_s"]) == 2, key
        for column in MEASURED:
            value = row[column]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, column, value)
    # DePT rows are compared with PT and with the bare backbone at the same total length, from paired rounds
    assert rows[f"dept_m40_r{r}"]["x_pt"]["median"] > 0 and rows[f"dept_m40_r{r}"]["x_bare_same_len"]["n"] == 2
    assert rows["pt_l100"]["enc_tokens"] == rows["bare_p100"]["enc_tokens"]
    assert rows["pt_l100_pad48"]["enc_tokens"] == 100 + 48
    ratios = {t["key"]: t for t in result["ratios"]}
    assert {"time.dept_m40_over_pt", "overhead.pt_l100_pct", "peft.our_pt_vs_peft_pct"} <= set(ratios)
    assert all(set(t) == {"key", "name", "value", "note"} for t in ratios.values())
    assert ratios["time.dept_m40_over_pt"]["value"]["n"] == 2 and ratios["time.dept_m40_over_pt"]["value"]["median"] > 0
    assert result["lengths"]["source"].startswith("rte train")

    # One MLflow run with the numbers as metrics and the three files as artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dept-bench")
    (ml_run,) = client.search_runs([experiment.experiment_id])
    assert ml_run.info.status == "FINISHED"
    assert ml_run.data.metrics["pt_l100.step_s"] == pytest.approx(rows["pt_l100"]["step_s"])
    ratio = ratios["time.dept_m40_over_pt"]["value"]["median"]
    assert ml_run.data.metrics["ratio.time.dept_m40_over_pt"] == pytest.approx(ratio)
    assert not any(tag.startswith("target.") for tag in ml_run.data.tags)
    assert {a.path for a in client.list_artifacts(ml_run.info.run_id)} == {"bench.md", "bench.json", "bench.png"}


def test_bench_rejects_bad_flags():
    proc = run(["bench", "--ms", "0,120", "--pt_tokens", "100"], check=False)
    assert proc.returncode == 2 and "0..l" in proc.stderr
    proc = run(["bench", "--preset", "nope"], check=False)
    assert proc.returncode == 2 and "paper" in proc.stderr


@pytest.mark.slow
def test_bench_scale_two_ranks_reports_half_of_the_backbone_per_rank(tmp_path):
    out = tmp_path / "scale"
    run(
        [
            "bench",
            "--mode",
            "scale",
            "--model",
            "random:tiny-llama",
            "--hidden",
            "128",
            "--layers",
            "2",
            "--intermediate",
            "256",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--max_length",
            "32",
            "--output_dir",
            str(out),
        ],
        nproc=2,
        launcher="deepspeed",
        timeout=300,
    )
    result = json.loads((out / "bench.json").read_text())
    assert result["world_size"] == 2 and result["d_model"] == 128 and result["layers"] == 2
    assert [s["rank"] for s in result["sharding"]] == [0, 1]
    assert all(s["held_fraction"] == pytest.approx(0.5, abs=0.01) for s in result["sharding"])
    # the scale default is bf16 (ds_configs/zero3_cpu_bf16.json): 2 bytes per parameter, half on each rank
    assert result["dtype"] == "bfloat16"
    assert sum(r["held_param_bytes"] for r in result["ranks"]) == pytest.approx(2 * result["backbone_params"], rel=0.01)
    assert len(result["times_s"]) == 2
    assert result["loss_finite"] and result["step_s"] > 0 and result["load_s"] > 0
    assert 0 < result["peak_used_mb"] <= result["total_ram_mb"] and result["headroom_mb"] > 0
    assert "headroom" in (out / "bench.md").read_text() and (out / "bench.png").is_file()


def test_data_tokenizer_trains_on_every_text_field_and_is_cached(tmp_path):
    """`--tokenizer data-32k` (here with a smaller vocabulary): a SentencePiece trained on <task>/<split>.jsonl
    text, coarser than the 1,000-piece test tokenizer on the same kind of text, reused from the cache."""
    from pipeline.errors import PipelineError
    from pipeline.tokenizer import corpus_lines, data_tokenizer, trained_tokenizer

    lines = corpus_lines(4000, seed=1)
    rows = [{"idx": i, "sentence1": a, "sentence2": b, "label": 0} for i, (a, b) in enumerate(zip(lines, lines[1:]))]
    (tmp_path / "data" / "rte").mkdir(parents=True)
    (tmp_path / "data" / "rte" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = data_tokenizer(tmp_path / "data", 4000, tmp_path / "cache")
    (folder,) = (tmp_path / "cache").glob("data-tokenizer-4000-*")
    stamp = (folder / "spiece.model").stat().st_mtime_ns
    again = data_tokenizer(tmp_path / "data", 4000, tmp_path / "cache")
    assert (folder / "spiece.model").stat().st_mtime_ns == stamp
    text = " ".join(corpus_lines(20, seed=2))
    ids = tok(text)["input_ids"]
    assert ids == again(text)["input_ids"] and len(tok) > 1000
    assert len(ids) < len(trained_tokenizer(tmp_path / "cache")(text)["input_ids"])
    with pytest.raises(PipelineError, match="no <task>/<split>.jsonl"):
        data_tokenizer(tmp_path / "empty", 4000, tmp_path / "cache")
    (tmp_path / "data" / "cb").mkdir()
    (tmp_path / "data" / "cb" / "train.jsonl").write_text('{"premise": "ok"}\n{"premise": \n')
    with pytest.raises(PipelineError, match=r"cb/train.jsonl line 2 is not valid JSON"):
        data_tokenizer(tmp_path / "data", 4000, tmp_path / "cache")


@pytest.mark.slow
def test_bench_speed_tiny_times_our_step_eval_and_startup_next_to_plain_loops(tmp_path):
    """#24: one run times `dept train`'s step (stage 0), a plain PyTorch loop and the ZeRO-3 engine on the same
    batches (the same losses: the same computation), evaluation four ways, and the start-up of spawned jobs next to
    the floor (a plain script that imports and loads the same model from its directory)."""
    out = tmp_path / "speed"
    words = ["bench", "--mode", "speed", "--model", "stories260K", "--steps", "2", "--warmup", "0"]
    words += ["--eval_rows", "4", "--eval_batch", "2", "--infer_repeats", "1", "--startup_runs", "1"]
    proc = run([*words, "--output_dir", str(out)], timeout=600)
    result = json.loads((out / "bench.json").read_text())["models"]["stories260K"]
    assert result["stage_choice"].startswith("ZeRO stage 0: one process")
    losses = result["step"]["losses"]
    assert losses["dept train (stage 0)"] == pytest.approx(losses["plain PyTorch loop"], rel=1e-6)
    assert losses["ZeRO-3 engine"] == pytest.approx(losses["plain PyTorch loop"], rel=1e-4)
    assert set(result["eval"]["seconds"]) == {
        "evaluator, stage 0",
        "evaluator, ZeRO-3 gathered once",
        "evaluator, ZeRO-3 per layer",
        "plain generate loop",
    }
    assert all(len(v) == 1 and v[0] > 0 for v in result["eval"]["seconds"].values())
    startup = result["startup"]
    assert startup["reference"] == "plain script: import, load tokenizer and model" and len(startup["seconds"]) == 3
    assert all(len(v) == 1 and v[0] > 0 for v in startup["seconds"].values())
    table = (out / "bench.md").read_text()
    assert "| stories260K | step | dept train (stage 0) |" in table and "plain generate loop" in proc.stdout


@pytest.mark.slow
def test_bench_speed_on_two_ranks_times_zero3_against_replicate_and_one_rank_alone(tmp_path):
    """#24 under the launcher: ZeRO-3's step vs `--sharding replicate`'s on the same halves of each global batch (the
    same losses), and evaluation gathered once / per layer next to one rank generating every row alone."""
    out = tmp_path / "speed2"
    words = ["bench", "--mode", "speed", "--steps", "3", "--warmup", "0", "--eval_rows", "6", "--eval_batch", "2"]
    run([*words, "--infer_repeats", "1", "--output_dir", str(out)], nproc=2, launcher="deepspeed", timeout=600)
    result = json.loads((out / "bench.json").read_text())
    assert result["world"] == 2
    step = result["models"]["stories260K"]["step"]
    losses = step["losses"]
    assert len(losses["ZeRO-3 engine"]) == 3
    assert losses["replicate (stage 0 on every rank)"] == pytest.approx(losses["ZeRO-3 engine"], rel=1e-4)
    evals = result["models"]["stories260K"]["eval"]
    assert evals["reference"] == "one rank alone: whole model, every row"
    assert all(len(v) == 1 and v[0] > 0 for v in evals["seconds"].values()) and len(evals["seconds"]) == 3
