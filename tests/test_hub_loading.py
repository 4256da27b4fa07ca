"""The hub code path, offline: ids huggingface_hub accepts, pinned revisions, the real `datasets.load_dataset` on
local copies laid out exactly as the hub repositories (DEPT_HUB_MIRROR), and one-line errors per cause.

The copies are written by the tests: `<namespace>/<name>/README.md` with the `configs:` YAML the hub repositories
carry and `<config>/<split>-0000i-of-0000n.parquet`, from the shipped JSONL where it exists (the result must equal
loading the same JSONL through DEPT_DATA_DIR) and from rows written here in the hub schema otherwise.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO, SHIPPED_DATA, needs_task_data
from support import raises_one_line

from pipeline.tasks import get_task, list_tasks, load_raw_split, load_task_splits
from pipeline.tasks.hub import check_hub_id, explain, resolve_commit

UNPINNED = {"nq", "hotpotqa", "searchqa", "newsqa", "yelp", "scitail"}


def write_hub_repo(mirror: Path, hub_path: str, configs: dict[str, dict[str, list]]) -> Path:
    """A local copy of a hub dataset repository: parquet shards per config and split, and the README's
    `configs:` YAML mapping (config, split) to them. A split given as a list of lists is written in shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = mirror / hub_path
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            shards = rows if rows and isinstance(rows[0], list) else [rows]
            (repo / config).mkdir(parents=True, exist_ok=True)
            for number, shard in enumerate(shards):
                name = f"{split}-{number:05d}-of-{len(shards):05d}.parquet"
                pq.write_table(pa.Table.from_pylist(shard), repo / config / name)
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (repo / "README.md").write_text("\n".join(card + ["---", f"# {hub_path} (local copy for tests)", ""]))
    return repo


def shipped(task: str, split: str) -> list[dict]:
    path = SHIPPED_DATA / task / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No data folder, a private `datasets` cache, and no mirror unless a test sets one."""
    import datasets

    monkeypatch.delenv("DEPT_DATA_DIR", raising=False)
    monkeypatch.delenv("DEPT_HUB_MIRROR", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    datasets.disable_progress_bars()
    return tmp_path


# Ids and revisions ---------------------------------------------------------------------------------------


def test_every_hub_id_is_accepted_by_huggingface_hub_and_revisions_are_recorded():
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.utils import validate_repo_id

    for name in list_tasks(paper_only=True):
        task = get_task(name)
        validate_repo_id(task.hub_path)
        parsed = parse_hf_uri(f"hf://datasets/{task.hub_path}@{task.revision}")
        assert (parsed.id, parsed.revision) == (task.hub_path, task.revision)
        check_hub_id(task)
        # Either a commit sha found in public code, or the branch head recorded as unpinned.
        assert re.fullmatch(r"[0-9a-f]{40}", task.revision) or task.revision == "main"
        assert task.revision_pinned == (name not in UNPINNED)
        if task.revision_pinned:
            assert resolve_commit(task) == task.revision  # a sha needs no hub call
    assert get_task("rte").revision == get_task("cola").revision  # one GLUE snapshot for every GLUE task


def test_results_name_the_data_version_a_job_read(tmp_path, monkeypatch):
    from pipeline.job import data_revisions

    tasks = [get_task("rte"), get_task("yelp"), get_task("syn-source-animal")]
    monkeypatch.delenv("DEPT_DATA_DIR", raising=False)
    assert data_revisions(tasks, None) == {"rte": get_task("rte").revision, "yelp": "main"}
    (tmp_path / "rte").mkdir()
    assert data_revisions(tasks, str(tmp_path)) == {"rte": f"local {tmp_path / 'rte'}", "yelp": "main"}


def test_a_bare_id_is_refused_before_any_download(offline_env):
    bare = replace(get_task("rte"), hub_path="glue")
    message = raises_one_line(
        "hub id 'glue' of task 'rte' is refused by huggingface_hub", load_raw_split, bare, "train"
    )
    assert "namespace/name" in message and "nyu-mll/glue" in message
    raises_one_line("is refused by huggingface_hub", check_hub_id, replace(bare, hub_path="a/b/c"))


# The real load_dataset on hub-layout copies ----------------------------------------------------------------


@needs_task_data("rte", "cola", "stsb", "mrpc", "mnli", "cb", "copa", "boolq", "paws", "scitail")
def test_hub_layout_copies_load_exactly_like_the_shipped_files(offline_env, monkeypatch):
    mirror = offline_env / "mirror"
    glue = {
        name: {"train": shipped(name, "train"), "validation": shipped(name, "validation")}
        for name in ("rte", "cola", "stsb", "mrpc")
    }
    glue["mnli"] = {"train": shipped("mnli", "train"), "validation_matched": shipped("mnli", "validation")}
    write_hub_repo(mirror, "nyu-mll/glue", glue)
    super_glue = {
        name: {"train": shipped(name, "train"), "validation": shipped(name, "validation")} for name in ("cb", "copa")
    }
    super_glue["boolq"] = {"validation": shipped("boolq", "validation")}
    write_hub_repo(mirror, "aps/super_glue", super_glue)
    write_hub_repo(
        mirror,
        "google-research-datasets/paws",
        {"labeled_final": {"validation": shipped("paws", "validation"), "test": shipped("paws", "test")}},
    )
    write_hub_repo(mirror, "allenai/scitail", {"tsv_format": {"test": shipped("scitail", "test")}})

    cases = [(name, ("train", "validation", "test")) for name in ("rte", "cola", "stsb", "mrpc", "cb", "copa")]
    cases += [("mnli", ("train", "test")), ("paws", ("validation", "test"))]
    expected = {name: load_task_splits(name, SHIPPED_DATA, splits=splits) for name, splits in cases}
    raw_expected = {
        (name, split): [get_task(name).render(row) for row in load_raw_split(name, split, SHIPPED_DATA)]
        for name, split in (("boolq", "validation"), ("scitail", "test"))
    }
    monkeypatch.setenv("DEPT_HUB_MIRROR", str(mirror))
    for name, splits in cases:
        provenance = {}
        assert load_task_splits(name, splits=splits, provenance=provenance) == expected[name], name
        record = next(iter(provenance.values()))
        assert record["source"] == "mirror" and record["hub_path"] == get_task(name).hub_path
        assert record["hub_config"] == get_task(name).hub_config and record["revision"] == get_task(name).revision
    for (name, split), rendered in raw_expected.items():
        assert [get_task(name).render(row) for row in load_raw_split(name, split)] == rendered
    provenance = {}
    load_task_splits("mnli", splits=("test",), provenance=provenance)
    assert list(provenance) == ["validation_matched"]  # MNLI's test split is the hub's validation_matched


def mrqa_row(subset: str, number: int) -> dict:
    """A row in the schema of mrqa-workshop/mrqa (plain_text)."""
    context = f"<P> Item {number} was built in {1800 + number} . </P>"
    return {
        "subset": subset,
        "context": context,
        "context_tokens": {"tokens": ["<P>", "Item"], "offsets": [0, 4]},
        "qid": f"{subset[:2]}{number}",
        "question": f"when was item {number} built",
        "question_tokens": {"tokens": ["when"], "offsets": [0]},
        "detected_answers": {
            "text": [str(1800 + number)],
            "char_spans": [{"start": [0], "end": [3]}],
            "token_spans": [{"start": [0], "end": [0]}],
        },
        "answers": [str(1800 + number), f"in {1800 + number}"],
    }


def test_mrqa_from_a_sharded_hub_copy_keeps_one_subset(offline_env, monkeypatch):
    nq = [mrqa_row("NaturalQuestionsShort", i) for i in range(1005)]
    hotpot = [mrqa_row("HotpotQA", i) for i in range(3)]
    write_hub_repo(
        offline_env / "mirror",
        "mrqa-workshop/mrqa",
        {
            "plain_text": {
                "train": [nq[:600] + hotpot, nq[600:]],  # two shards, like the hub's train-0000i-of-00009 files
                "validation": [mrqa_row("NaturalQuestionsShort", 2000), mrqa_row("HotpotQA", 2001)],
            }
        },
    )
    monkeypatch.setenv("DEPT_HUB_MIRROR", str(offline_env / "mirror"))
    provenance = {}
    splits = load_task_splits("nq", provenance=provenance)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 1000, "test": 1}
    assert splits["test"] == [
        {
            "id": "Na2000",
            "source": "question: when was item 2000 built context: <P> Item 2000 was built in 3800 . </P>",
            "target": "3800",
            "answers": ["3800", "in 3800"],
        }
    ]
    assert provenance["train"]["revision"] == "main" and provenance["train"]["commit"] is None
    raw = load_raw_split("hotpotqa", "train")
    assert [r["qid"] for r in raw] == ["Ho0", "Ho1", "Ho2"] and "context_tokens" not in raw[0]


def test_wsc_fixed_winogrande_and_yelp_from_hub_copies(offline_env, monkeypatch):
    from test_bad_rows import LOWER_CASE_SPAN, MARK, NESTED

    mirror = offline_env / "mirror"
    wsc = [{**row, "idx": i} for i, row in enumerate([MARK, LOWER_CASE_SPAN, NESTED] * 4)]
    write_hub_repo(mirror, "aps/super_glue", {"wsc.fixed": {"train": wsc[:8], "validation": wsc[8:]}})
    wino = [
        {
            "sentence": f"Ian ate after Dennis {i} because _ was hungry.",
            "option1": "Ian",
            "option2": "Dennis",
            "answer": "2" if i % 3 else "1",
        }
        for i in range(1004)
    ]
    write_hub_repo(mirror, "allenai/winogrande", {"winogrande_xl": {"train": wino[:1002], "validation": wino[1002:]}})
    yelp = [{"label": i % 2, "text": f"Review number {i}."} for i in range(1010)]
    write_hub_repo(mirror, "fancyzhx/yelp_polarity", {"plain_text": {"train": yelp, "test": yelp[:5]}})
    monkeypatch.setenv("DEPT_HUB_MIRROR", str(mirror))

    splits = load_task_splits("wsc")
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "validation": 2, "test": 2}
    assert splits["train"][1]["source"].startswith("text: * The lawyer * asked")
    wino_splits = load_task_splits("winogrande")
    assert {k: len(v) for k, v in wino_splits.items()} == {"train": 2, "validation": 1000, "test": 2}
    assert wino_splits["test"][0]["source"].endswith("option0: Ian option1: Dennis")
    yelp_splits = load_task_splits("yelp")
    assert {k: len(v) for k, v in yelp_splits.items()} == {"train": 10, "validation": 1000, "test": 5}
    assert yelp_splits["test"][0] == {"id": 0, "source": "sentence: Review number 0.", "target": "0"}


# One line per cause ---------------------------------------------------------------------------------------


def test_missing_dataset_config_and_split_are_told_apart(offline_env, monkeypatch):
    mirror = offline_env / "mirror"
    write_hub_repo(
        mirror, "nyu-mll/glue", {"rte": {"train": [{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}]}}
    )
    monkeypatch.setenv("DEPT_HUB_MIRROR", str(mirror))
    assert load_raw_split("rte", "train") == [{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}]
    message = raises_one_line("split 'validation' of nyu-mll/glue/rte@", load_raw_split, "rte", "validation")
    assert "does not exist" in message and "Unknown split" in message
    message = raises_one_line("does not exist", load_raw_split, "cola", "train")
    assert "BuilderConfig 'cola' not found" in message
    message = raises_one_line("has no copy of aps/super_glue", load_raw_split, "cb", "train")
    assert "unset DEPT_HUB_MIRROR" in message


@pytest.mark.parametrize("name", ["rte", "nq"])  # a pinned and an unpinned revision
def test_unreachable_hub_says_how_to_work_offline(offline_env, monkeypatch, name):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = raises_one_line("cannot reach the Hugging Face hub for split 'train'", load_raw_split, name, "train")
    assert "OfflineModeIsEnabled" in message and f"DEPT_DATA_DIR to a folder holding {name}/train.jsonl" in message
    assert resolve_commit(get_task(name)) == (get_task(name).revision if name == "rte" else None)


def test_gated_and_not_found_hub_errors_from_the_libraries(offline_env):
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RevisionNotFoundError

    httpx = importlib.import_module(HfHubHTTPError.__mro__[1].__module__)  # the HTTP library of huggingface_hub
    task = get_task("winogrande")
    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/datasets/x"))
    gated = [
        GatedRepoError("Access to dataset allenai/winogrande is restricted.", response=response),
        DatasetNotFoundError(
            "Dataset 'allenai/winogrande' is a gated dataset on the Hub. You must be authenticated to access it."
        ),
    ]
    for err in gated:
        message = str(explain(task, "train", err))
        assert "is gated or needs a login" in message and "hf auth login" in message and "\n" not in message
    missing = [
        DatasetNotFoundError("Dataset 'allenai/winogrande' doesn't exist on the Hub or cannot be accessed."),
        RevisionNotFoundError("Revision 'abc' not found.", response=response),
    ]
    for err in missing:
        assert "does not exist" in str(explain(task, "train", err))
    wrapped = RuntimeError("load failed")
    wrapped.__cause__ = ConnectionError("Couldn't reach 'allenai/winogrande' on the Hub (ConnectError)")
    assert "cannot reach the Hugging Face hub" in str(explain(task, "train", wrapped))


def test_importing_the_tasks_imports_neither_torch_nor_datasets():
    code = (
        "import sys, pipeline.tasks; pipeline.tasks.get_task('rte'); "
        "print(sorted(m for m in ('torch', 'datasets', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
