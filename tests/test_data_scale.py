"""Rows as memory-mapped tables end to end (issue 12 §5): the job's training rows are a `datasets.Dataset` read from
cache files; the split rules, k-shot samples and mixtures give the rows the list path gives; a second call (another
process, another rank) reuses the rendered file without a second rendering pass; each node's LOCAL_RANK 0 renders
while the other ranks wait; and the training loop trains on a table exactly as on the list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCHER_VARIABLES, REPO, free_port, needs_full_data, needs_task_data
from conftest import SHIPPED_DATA as DATA_DIR

from pipeline.config import DataArgs, JobConfig
from pipeline.data import read_source_target, row_lengths, rows_at, source_target_table, tokenize, tokenize_table
from pipeline.errors import PipelineError
from pipeline.job import load_job_data
from pipeline.options import build
from pipeline.tasks import get_task, kshot_sample, loading, mixture, tables
from pipeline.tasks.loading import load_task_splits, load_task_tables
from pipeline.tasks.splits import SPLITS, apply_split_rule


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache for this test (the session's is shared by every test)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DEPT_CACHE", str(folder))
    return folder


def list_path(task, data_dir, seed=42, splits=SPLITS) -> dict[str, list[dict]]:
    """The splits as the list path makes them: every row read and rendered into a list, parts taken by index."""
    return apply_split_rule(
        task, splits, lambda original: loading._load_rendered(task, original, data_dir, None)[1], seed
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def yelp_like(folder: Path, n: int = 1500) -> Path:
    write_jsonl(
        folder / "yelp" / "train.jsonl",
        [{"text": f"review {i} " + "good " * (i % 7), "label": i % 2} for i in range(n)],
    )
    write_jsonl(folder / "yelp" / "test.jsonl", [{"text": f"test {i}", "label": i % 2} for i in range(50)])
    return folder


# ----------------------------------------------------------------------------------------------- memory-mapped rows


@needs_full_data("rte")
def test_the_jobs_training_rows_are_a_memory_mapped_table(fresh_cache):
    import datasets

    job = load_job_data(build(DataArgs, {"tasks": ["rte"], "max_eval_rows": 20}, "data"), seed=0)
    assert isinstance(job.train, datasets.Dataset) and len(job.train) == 2490
    assert type(job.train.data).__name__ == "MemoryMappedTable"  # pages of a file, not Python objects
    files = [Path(f["filename"]) for f in job.train.cache_files]
    assert files and all(f.is_relative_to(fresh_cache / "rendered") and f.suffix == ".arrow" for f in files)
    validation, test = job.held_out["rte"]
    assert isinstance(validation, list) and len(validation) == len(test) == 20
    assert validation == load_task_splits("rte", splits=("validation",))["validation"][:20]


def test_a_source_target_file_is_a_table_too(fresh_cache, toy_task):
    job = load_job_data(build(DataArgs, {"train_file": str(toy_task)}, "data"), seed=0)
    assert type(job.train.data).__name__ == "MemoryMappedTable"
    assert job.train.to_list() == [{k: r[k] for k in ("id", "source", "target")} for r in read_source_target(toy_task)]


# ----------------------------------------------------------------------------------------------- same rows as lists


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=(needs_full_data if n == "qnli" else needs_task_data)(n)) for n in ("rte", "cb", "qnli")],
)
def test_splits_are_the_list_paths_row_for_row(name, fresh_cache):
    task = get_task(name)
    for seed in (42, 7):
        tables_ = load_task_tables(task, DATA_DIR, split_seed=seed)
        expected = list_path(task, DATA_DIR, seed)
        assert {s: t.to_list() for s, t in tables_.items()} == expected, (name, seed)
    assert load_task_splits(task, DATA_DIR) == list_path(task, DATA_DIR)


def test_the_large_rule_and_train_limit_select_the_list_paths_rows(tmp_path, fresh_cache):
    from dataclasses import replace

    folder = yelp_like(tmp_path / "data")
    for task in (get_task("yelp"), replace(get_task("yelp"), train_limit=300)):
        got = {s: t.to_list() for s, t in load_task_tables(task, folder).items()}
        assert got == list_path(task, folder)
        assert len(got["validation"]) == 1000 and len(got["train"]) == min(500, task.train_limit)


@needs_task_data("cb", "stsb", "rte")
def test_kshot_and_mixtures_give_the_list_paths_rows(fresh_cache):
    for name, k in (("cb", 12), ("stsb", 10)):
        task = get_task(name)
        table = load_task_tables(task, DATA_DIR, splits=("train",))["train"]
        rows = table.to_list()
        for seed in (0, 5):
            sample = kshot_sample(table, k, seed, task)
            assert type(sample.data).__name__ == "MemoryMappedTable"
            assert sample.to_list() == kshot_sample(rows, k, seed, task), (name, seed)
    train = {name: load_task_tables(name, DATA_DIR, splits=("train",))["train"] for name in ("rte", "cb")}
    mixed = mixture(train, cap=100, seed=3)
    assert mixed.to_list() == mixture({n: t.to_list() for n, t in train.items()}, cap=100, seed=3)
    assert type(mixed.data).__name__ == "MemoryMappedTable"
    again = mixture(train, cap=100, seed=3)
    assert again.cache_files == mixed.cache_files and again._fingerprint == mixed._fingerprint
    assert mixture(train, cap=100, seed=4).cache_files != mixed.cache_files


# ----------------------------------------------------------------------------------------------- once per content


@needs_task_data("cb")
def test_a_second_call_reuses_the_rendered_file_without_rendering(tmp_path, fresh_cache):
    before = loading.RENDER_PASSES
    first = load_task_tables("cb", DATA_DIR)
    assert loading.RENDER_PASSES == before + 2  # train and validation, one pass each
    second = load_task_tables("cb", DATA_DIR)
    assert loading.RENDER_PASSES == before + 2
    assert {s: t.cache_files for s, t in second.items()} == {s: t.cache_files for s, t in first.items()}
    # Another process finds the same file by content: no rendering pass, the same fingerprint.
    code = (
        "import json; from pipeline.tasks import loading; from pipeline.tasks.loading import load_task_tables; "
        f"t = load_task_tables('cb', {str(DATA_DIR)!r})['train']; "
        "print(json.dumps([loading.RENDER_PASSES, t._fingerprint]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "DEPT_CACHE": str(fresh_cache)},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, first["train"]._fingerprint]
    # New content (the same path) is rendered again.
    copy = tmp_path / "data"
    rows = [json.loads(line) for line in (DATA_DIR / "cb" / "train.jsonl").read_text().splitlines()]
    write_jsonl(copy / "cb" / "train.jsonl", rows)
    load_task_tables("cb", copy, splits=("train",))
    assert loading.RENDER_PASSES == before + 2  # same content elsewhere: reused
    write_jsonl(copy / "cb" / "train.jsonl", rows[:-1])
    assert len(load_task_tables("cb", copy, splits=("train",))["train"]) == len(rows) - 1
    assert loading.RENDER_PASSES == before + 3


def test_skipped_rows_are_reported_on_every_call_and_a_refused_split_leaves_no_file(tmp_path, fresh_cache, caplog):
    import logging

    rows = [{"sentence1": f"s{i}", "sentence2": "t", "label": i % 2, "idx": i} for i in range(150)]
    write_jsonl(tmp_path / "ok" / "rte" / "train.jsonl", [*rows[:60], {**rows[60], "label": 7}, *rows[61:]])
    for _ in range(2):
        caplog.clear()
        provenance = {}
        with caplog.at_level(logging.WARNING, logger="pipeline.tasks.loading"):
            table = loading.load_rendered_table("rte", "train", tmp_path / "ok", provenance)
        assert len(table) == 149 and provenance["train"]["skipped"] == [60]
        assert "skipped 1 of 150 rows" in caplog.text and "label 7" in caplog.text
    bad = [{**row, "label": 9} if i in (3, 70) else row for i, row in enumerate(rows[:100])]
    write_jsonl(tmp_path / "bad" / "rte" / "train.jsonl", bad)
    with pytest.raises(PipelineError, match="2 of 100 rows") as caught:
        loading.load_rendered_table("rte", "train", tmp_path / "bad")
    assert "\n" not in str(caught.value)
    left = sorted(p.name for p in (fresh_cache / "rendered").iterdir() if not p.name.endswith(".lock"))
    assert len([name for name in left if name.endswith(".arrow")]) == 1  # only the good split's
    assert not [name for name in left if name.endswith(".tmp")]


def test_ids_that_mix_numbers_and_text_are_stored_as_text(tmp_path):
    rows = [{"id": i, "source": f"s{i}", "target": "0"} for i in range(tables.BATCH_ROWS + 500)]
    rows[tables.BATCH_ROWS + 200]["id"] = "x-1"  # after a whole batch of numbers was written
    path = tmp_path / "mixed.arrow"
    with tables.RowWriter(path, "f00d", ["id", "source", "target"]) as writer:
        for row in rows:
            writer.add(row)
        assert writer.commit() == len(rows)
    table = tables.open_table(path)
    assert table._fingerprint == "f00d"
    assert table["id"][:3] == ["0", "1", "2"] and table[tables.BATCH_ROWS + 200]["id"] == "x-1"
    assert table["source"][-1] == rows[-1]["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.arrow"]  # no temporary file left


# ----------------------------------------------------------------------------------------------- tokens and training


def test_tokenized_rows_stay_in_their_cache_file(fresh_cache, toy_task):
    from pipeline.backbone import load_tokenizer

    tokenizer = load_tokenizer("random:tiny-t5")
    table = source_target_table(toy_task)
    tokenized = tokenize_table(table, tokenizer, True, 16)
    assert type(tokenized.data).__name__ == "MemoryMappedTable"
    assert all(Path(f["filename"]).parent == fresh_cache / "tokenized" for f in tokenized.cache_files)
    as_list = tokenize(read_source_target(toy_task), tokenizer, True, 16)
    assert rows_at(tokenized, [5, 0, 5]) == [{**as_list[i], "length": len(as_list[i]["input_ids"])} for i in (5, 0, 5)]
    assert row_lengths(tokenized) == [len(r["input_ids"]) for r in as_list]
    again = tokenize_table(source_target_table(toy_task), tokenizer, True, 16)
    assert again.cache_files == tokenized.cache_files  # keyed by the table's content: reused


def test_training_on_a_table_equals_training_on_the_list(tmp_path, toy_task):
    from pipeline.train import train

    def job(name: str) -> JobConfig:
        return build(
            JobConfig,
            {
                "model": "random:tiny-t5",
                "output_dir": str(tmp_path / name),
                "data": {"train_file": str(toy_task)},
                "dept": {"num_virtual_tokens": 4, "r": 2, "max_length": 16},
                "train": {
                    "batch_size": 4,
                    "steps": 6,
                    "warmup_steps": 2,
                    "log_every": 1,
                    "lr_lowrank": 0.01,
                    "group_by_length": True,
                },
            },
            "job",
        )

    on_list = train(job("list"), read_source_target(toy_task))
    on_table = train(job("table"), source_target_table(toy_task))
    assert [h["loss"] for h in on_table.history] == pytest.approx([h["loss"] for h in on_list.history], rel=1e-6)
    assert on_table.probe == pytest.approx(on_list.probe, rel=1e-6)
    assert on_table.history[-1]["loss"] < on_table.history[0]["loss"]


# ----------------------------------------------------------------------------------------------- ranks


WORKER = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
from pipeline.config import DataArgs
from pipeline.options import build
from pipeline.errors import PipelineError
from pipeline.job import load_job_data
from pipeline.tasks import loading
out = {"rank": dist.get_rank()}
try:
    load_job_data(build(DataArgs, {"tasks": ["cb"], "data_dir": sys.argv[2]}, "data"), 0)
except PipelineError as err:
    out["error"] = str(err)
job = load_job_data(build(DataArgs, {"tasks": ["cb"], "data_dir": sys.argv[1]}, "data"), 0)
out.update(passes=loading.RENDER_PASSES, rows=len(job.train), fingerprint=job.train._fingerprint)
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


@needs_full_data("cb")  # counts CB's 250 training rows
def test_local_rank_0_renders_once_while_the_other_rank_waits(tmp_path, fresh_cache):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(DEPT_CACHE=str(fresh_cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            str(DATA_DIR),
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {
        r["rank"]: r
        for r in (json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line)
    }
    assert results[0]["passes"] == 2 and results[1]["passes"] == 0  # one rendering pass per split per node
    assert results[0]["fingerprint"] == results[1]["fingerprint"] and results[0]["rows"] == results[1]["rows"] == 250
    # A failure on the first rank reaches every rank as one line (the others do not hang at the barrier).
    assert "no 'train' data for task 'cb'" in results[0]["error"]
    assert results[1]["error"].startswith("preparing the data failed on rank 0: no 'train' data for task 'cb'")
