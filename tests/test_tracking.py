"""MLflow tracking against real stores: sqlite files in tmp_path and a real `mlflow server` (no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.mlflow_record import flatten_params, split_record
from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def _runs(client, experiment_id: str) -> list:
    from mlflow.entities import ViewType

    return list(client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000))


# ------------------------------------------------------------------------------------------------ URIs


def test_uri_precedence_and_sqlite_default(tmp_path, monkeypatch):
    assert resolve_tracking_uri(None, tmp_path / "out") == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    monkeypatch.chdir(tmp_path)  # a relative sqlite path becomes absolute (ranks with another cwd agree)
    assert resolve_tracking_uri("sqlite:///rel/m.db", "/nowhere") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"


@pytest.mark.parametrize("uri", ["file:./mlruns", "file:///tmp/mlruns", "./mlruns", "/abs/mlruns"])
def test_file_store_refused_in_one_line_unless_allowed(tmp_path, monkeypatch, uri):
    with pytest.raises(PipelineError) as err:
        resolve_tracking_uri(uri, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "file store" in message and "MLFLOW_ALLOW_FILE_STORE=true" in message
    assert "sqlite:///" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # same refusal when it comes from the environment
    with pytest.raises(PipelineError):
        resolve_tracking_uri(None, tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri(uri, tmp_path).startswith("file:")


def test_unreachable_http_refused_quickly_in_one_line():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        check_reachable(uri, timeout_s=2)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and "unreachable" in message and uri in message
    assert "mlflow server --host 127.0.0.1" in message and "unset MLFLOW_TRACKING_URI" in message
    with pytest.raises(PipelineError, match="unreachable"):  # a Tracker checks before its first run as well
        Tracker(uri, "exp").parent("recipe", "k")


def test_a_job_starting_while_the_server_does_not_answer_goes_on_without_a_run(caplog):
    """#21: the parent exists (the server answered when the recipe started), then the server went away: the next
    job's run cannot be created, so the job runs without one (one warning) instead of waiting through MLflow's
    retries and failing; lookups answer "unknown" without a request."""
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "exp")  # nothing listens there
    tracker.parent_id = "parent-run-id"  # as if created before the outage
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        assert tracker.child("second job", "k2", {"lr": 0.1}) is None
    assert time.monotonic() - start < 10
    assert "job second job runs without its MLflow run" in caplog.text and "next run of the same command" in caplog.text
    assert tracker.is_finished("k1") is False and tracker.run_id_for("k1") is None


def test_sqlite_dir_created_and_must_be_writable(tmp_path):
    check_reachable(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PipelineError, match="not writable"):
            check_reachable(f"sqlite:///{locked}/mlflow.db")


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": {"d": "x", "z": None}}, "e": [1, 2], "f": None, "g": {}}) == {
        "a.b": "1",
        "a.c.d": "x",
        "e": "[1, 2]",
        "g": "{}",
    }  # None is no value: never the string "None"
    assert len(flatten_params({"long": "x" * 10_000})["long"]) == 6000  # MLflow's limit on a param value


def test_split_record_keeps_curves_and_moves_constants_to_tags():
    record = {
        "step": 20,
        "loss": 0.5,
        "lr_prompt": 0.3,
        "tokens_per_s": 10,
        "peak_mem_mb": 700.0,
        "note": "x",
        "eval_accuracy": 55.00000000000001,
        "eval_score": 55.00000000000001,
        "eval_n": 16,
        "eval_invalid": 2,
        "eval_cb.f1_macro": 40.123456,
        "eval_cb.n": 8,
        "eval_cb.score": 40.123456,
        "eval_rte/x.accuracy": 1.0,
        "test_accuracy": 60.0,
        "test_score": 60.0,
        "test_n": 16,
        "test_invalid": 1,
    }
    metrics, tags = split_record(record)
    assert metrics == {
        "loss": 0.5,
        "lr_prompt": 0.3,
        "tokens_per_s": 10.0,
        "peak_mem_mb": 700.0,
        "eval_accuracy": 55.0,
        "eval_score": 55.0,
        "eval_cb.f1_macro": 40.1235,
        "eval_rte_x.accuracy": 1.0,
        "test_accuracy": 60.0,
    }
    assert tags == {
        "dept.eval_n": "16",
        "dept.eval_invalid": "2",
        "dept.eval_cb.n": "8",
        "dept.test_n": "16",
        "dept.test_invalid": "1",
    }
    metrics, tags = split_record(record, invalid_curves=True)  # generation: invalid outputs over training
    assert metrics["eval_invalid"] == 2.0 and "dept.eval_invalid" not in tags and tags["dept.test_invalid"] == "1"
    assert not any("/" in k for k in metrics) and "step" not in metrics


def test_callback_batches_points_and_sends_them_by_finish(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None, tmp_path)
    tracker = Tracker(uri, "batched")
    tracker.describe_experiment("what this experiment is for")
    tracker.parent("recipe", "b")
    run = tracker.child("train", "b/train", {"lr": 0.3})
    callback = tracker.callback_for(run, flush_every_s=3600)
    client = MlflowClient(uri)
    for step in range(1, 6):
        callback(step, {"step": step, "loss": 1.0 / step, "lr_prompt": 0.3})
    assert client.get_metric_history(run, "loss") == []  # buffered: no request per step
    callback(5, {"eval_accuracy": 50.0, "eval_n": 4})  # a validation is sent at once, with what was buffered
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1, 2, 3, 4, 5]
    assert client.get_run(run).data.tags["dept.eval_n"] == "4"
    callback(6, {"step": 6, "loss": 0.1})
    tracker.finish(run)
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1, 2, 3, 4, 5, 6]
    assert "step" not in client.get_run(run).data.metrics and "eval_n" not in client.get_run(run).data.metrics
    experiment = client.get_experiment_by_name("batched")
    assert experiment.tags["mlflow.note.content"] == "what this experiment is for"

    with pytest.raises(RuntimeError):  # a crash keeps the curve up to it
        with Tracker(uri, "batched") as crashed:
            crashed.parent("recipe", "c")
            child = crashed.child("train", "c/train", {})
            crashed.callback_for(child, flush_every_s=3600)(1, {"loss": 2.0})
            raise RuntimeError("training crashed")
    assert [m.value for m in client.get_metric_history(child, "loss")] == [2.0]
    assert client.get_run(child).info.status == "FAILED"


def test_bad_key_refused(tmp_path):
    tracker = Tracker(None, "exp", workdir=tmp_path)
    with pytest.raises(PipelineError, match="tracking key"):
        tracker.parent("recipe", "it's")
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------------------------------ sqlite


def test_parent_children_params_metrics_artifacts_datasets_and_reattach(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None, tmp_path / "out")
    check_reachable(uri)
    tracker = Tracker(uri, "dept-test")
    parent = tracker.parent("toy-recipe", "recipe-abc")
    params = {"model": "t5", "dept": {"prompt_len": 8, "rank": 4}, "lrs": [0.3, 1e-4]}
    train = tracker.child("train", "recipe-abc/train", params)
    tracker.log_metrics({"loss": 2.0, "lr_prompt": 0.3, "note": "text", "none": None}, step=1)
    callback = tracker.callback_for(train)
    import numpy as np

    callback(2, {"loss": np.float32(1.5), "tokens_per_s": 100, "eval_accuracy": 0.5, "lr_lowrank": 1e-4})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "results.json").write_text("{}")
    tracker.log_artifact(adapter)
    tracker.log_artifact(tmp_path / "results.json", "reports")
    rows = [{"source": f"sentence {i}", "target": str(i % 2)} for i in range(10)]
    digest = tracker.log_dataset(rows, "toy-train", "train")
    tracker.log_dataset(rows[:3], "toy-val", "validation")
    tracker.log_dataset(rows, "toy-train", "training")  # the same input again is not duplicated
    tracker.finish(train)
    evaluate = tracker.child("eval", "recipe-abc/eval", {"split": "test"})
    tracker.log_metrics({"accuracy": 0.75}, step=0)
    with pytest.raises(PipelineError, match="no such file"):
        tracker.log_artifact(tmp_path / "missing.txt")

    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("dept-test").experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {run.info.run_id for run in children} == {train, evaluate}
    run = client.get_run(train)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    assert run.data.params == {"model": "t5", "dept.prompt_len": "8", "dept.rank": "4", "lrs": "[0.3, 0.0001]"}
    assert run.data.tags["dept.key"] == "recipe-abc/train" and run.data.tags["dept.role"] == "child"
    assert run.data.tags["dept.git_commit"]  # a commit hash in a checkout, "unknown" elsewhere
    assert [(m.step, m.value) for m in client.get_metric_history(train, "loss")] == [(1, 2.0), (2, 1.5)]
    assert set(run.data.metrics) == {"loss", "lr_prompt", "tokens_per_s", "eval_accuracy", "lr_lowrank"}
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {("toy-train", digest, "training"), ("toy-val", inputs_digest(inputs, "toy-val"), "validation")}
    assert (
        json.loads(next(d for d in run.inputs.dataset_inputs if d.dataset.name == "toy-train").dataset.profile)[
            "num_rows"
        ]
        == 10
    )
    assert {a.path for a in client.list_artifacts(train)} == {"adapter", "reports"}
    assert [a.path for a in client.list_artifacts(train, "adapter")] == ["adapter/adapter.safetensors"]
    assert [a.path for a in client.list_artifacts(train, "reports")] == ["reports/results.json"]
    assert client.get_run(train).info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts").as_uri())
    assert client.get_run(evaluate).data.metrics == {"accuracy": 0.75}
    assert client.get_run(evaluate).info.status == "RUNNING"
    tracker.finish(parent, "FAILED")  # closes the child left open too
    assert client.get_run(evaluate).info.status == "FAILED" and client.get_run(parent).info.status == "FAILED"
    assert len(_runs(client, exp_id)) == 3

    # Re-run of the same recipe: same run ids, no new runs, finished stages are known.
    again = Tracker(uri, "dept-test")
    assert again.is_finished("recipe-abc/train")  # before parent(): looked up in the whole experiment
    assert again.parent("toy-recipe", "recipe-abc") == parent
    assert client.get_run(parent).info.status == "RUNNING"
    assert again.is_finished("recipe-abc/train") and not again.is_finished("recipe-abc/eval")
    assert not again.is_finished("recipe-abc/never")
    assert again.run_id_for("recipe-abc/train") == train and again.run_id_for("recipe-abc/never") is None
    assert again.child("eval", "recipe-abc/eval", {"split": "test"}) == evaluate  # same params: skipped
    assert client.get_run(evaluate).info.status == "RUNNING"
    assert client.get_run(evaluate).data.tags["dept.attempts"] == "2"
    with pytest.raises(PipelineError) as err:
        again.child("train", "recipe-abc/train", {**params, "dept": {"prompt_len": 16, "rank": 4}})
    assert "dept.prompt_len: '8' -> '16'" in str(err.value) and "new output directory" in str(err.value)
    assert "\n" not in str(err.value)
    assert client.get_run(train).info.status == "FINISHED"  # a refused re-attach leaves the run as it was
    again.child("train", "recipe-abc/train", {**params, "new_param": 1})  # a new param is fine
    assert client.get_run(train).data.params["new_param"] == "1"
    again.finish(parent)
    assert len(_runs(client, exp_id)) == 3
    assert client.get_run(parent).info.status == "FINISHED"

    # Another recipe execution (new key) gets new runs; its stage keys are scoped to its own parent.
    other = Tracker(uri, "dept-test")
    assert other.parent("toy-recipe", "recipe-xyz") != parent
    assert not other.is_finished("recipe-abc/train")
    assert len(_runs(client, exp_id)) == 4


def inputs_digest(inputs: set, name: str) -> str:
    return next(d for n, d, _ in inputs if n == name)


def test_context_manager_marks_open_runs_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None, tmp_path)
    with pytest.raises(RuntimeError):
        with Tracker(uri, "exp") as tracker:
            parent = tracker.parent("r", "k")
            child = tracker.child("train", "k/train", {})
            raise RuntimeError("training crashed")
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == client.get_run(child).info.status == "FAILED"
    with pytest.raises(PipelineError, match="DONE"):
        tracker.finish(parent, "DONE")


def test_disabled_and_nonzero_rank_do_nothing(tmp_path):
    for tracker in (
        Tracker(None, "exp", enabled=False, workdir=tmp_path),
        Tracker(None, "exp", rank=1, workdir=tmp_path),
    ):
        assert tracker.parent("recipe", "k") is None
        assert tracker.child("train", "k/train", {"a": 1}) is None
        assert tracker.is_finished("k/train") is False and tracker.run_id_for("k") is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_params({"a": 1})
        tracker.set_tags({"a": "b"})
        tracker.log_artifact(tmp_path / "does-not-matter")
        tracker.log_dataset([{"a": 1}], "d", "training")
        tracker.callback_for(None)(1, {"loss": 1.0})
        tracker.finish(None)
        with tracker:
            pass
    assert list(tmp_path.iterdir()) == []


def test_rank_comes_from_launcher_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert Tracker(None, "exp", workdir=tmp_path).active is False
    monkeypatch.setenv("RANK", "0")
    assert Tracker(None, "exp", workdir=tmp_path).active is True


# ------------------------------------------------------------------------------------------------ 2 ranks

_TWO_RANKS = textwrap.dedent("""
    import os, sys, json
    import torch.distributed as dist
    dist.init_process_group("gloo")
    from pipeline.errors import PipelineError
    from pipeline.tracking import Tracker
    t = Tracker(sys.argv[1], "ranks")
    out = {"parent": t.parent("r", "k"), "child": t.child("train", "k/train", {"lr": 0.3})}
    t.finish(out["child"])
    out["finished"] = t.is_finished("k/train")
    out["lookup"] = t.run_id_for("k/train")
    try:
        t.child("train", "k/train", {"lr": 0.1})
    except PipelineError as exc:
        out["error"] = str(exc)
    t.callback_for()(1, {"loss": float(dist.get_rank())})
    t.finish()
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_ranks_share_one_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = tmp_path / "ranks.py"
    script.write_text(_TWO_RANKS)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), uri], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:]))
    assert results[0]["parent"] and results[0]["child"] and results[0]["finished"] is True
    for key in ("parent", "child", "finished", "lookup"):
        assert results[0][key] == results[1][key]
    assert "cannot change" in results[0]["error"] and "rank 0" in results[1]["error"]
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("ranks").experiment_id
    assert len(_runs(client, exp_id)) == 2  # one parent, one child: not one per rank
    assert [m.value for m in client.get_metric_history(results[0]["child"], "loss")] == []  # parent got it
    assert [m.value for m in client.get_metric_history(results[0]["parent"], "loss")] == [0.0]


# ------------------------------------------------------------------------------------------------ server


def _http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def running_server(tmp_path: Path, *extra: str):
    """A real `mlflow server` on 127.0.0.1 (sqlite store in tmp_path); its URI. Stopped, with its workers, at exit."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / f"server-{port}.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server-{port}.db",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                check_reachable(uri, timeout_s=2)
                break
            except PipelineError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("mlflow server did not start:\n" + log_path.read_text()[-3000:]) from None
                time.sleep(0.5)
        yield uri
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        log_file.close()


@pytest.fixture
def mlflow_server(tmp_path):
    with running_server(tmp_path, "--artifacts-destination", str(tmp_path / "server-artifacts")) as uri:
        yield uri


@pytest.mark.slow
def test_real_server_over_http(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, "dept-http")
    parent = tracker.parent("recipe", "http-key")
    child = tracker.child("train", "http-key/train", {"a": {"b": 2}})
    tracker.callback_for(child)(3, {"loss": 0.5})
    (tmp_path / "note.txt").write_text("x")
    tracker.log_artifact(tmp_path / "note.txt", run_id=child)
    tracker.log_dataset([{"x": 1}, {"x": 2}], "tiny", "test", run_id=child)
    tracker.finish(child)
    tracker.finish(parent)

    exp = _http_json(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dept-http")
    exp_id = exp["experiment"]["experiment_id"]
    found = _http_json(f"{mlflow_server}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    by_id = {run["info"]["run_id"]: run for run in found}
    assert set(by_id) == {parent, child}
    tags = {t["key"]: t["value"] for t in by_id[child]["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent and tags["dept.key"] == "http-key/train"
    assert {p["key"]: p["value"] for p in by_id[child]["data"]["params"]} == {"a.b": "2"}
    assert {m["key"]: m["value"] for m in by_id[child]["data"]["metrics"]} == {"loss": 0.5}
    assert by_id[child]["info"]["status"] == by_id[parent]["info"]["status"] == "FINISHED"
    assert by_id[child]["inputs"]["dataset_inputs"][0]["dataset"]["name"] == "tiny"
    assert any((tmp_path / "server-artifacts").rglob("note.txt"))
    # through the server's artifact proxy, not a path on this machine's disk
    assert by_id[child]["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    # Re-attach over HTTP as well.
    assert Tracker(mlflow_server, "dept-http").parent("recipe", "http-key") == parent


@pytest.mark.slow
def test_server_storing_artifacts_on_its_local_disk_is_refused_before_training(tmp_path):
    local_root = tmp_path / "server-local-artifacts"
    with running_server(tmp_path, "--no-serve-artifacts", "--default-artifact-root", str(local_root)) as uri:
        tracker = Tracker(uri, "no-proxy")
        with pytest.raises(PipelineError) as err:
            tracker.parent("recipe", "np")
        message = str(err.value)
        assert "\n" not in message and "--serve-artifacts" in message and "--tracking.experiment" in message
        assert str(local_root) in message
        assert (
            _http_json(
                f"{uri}/api/2.0/mlflow/runs/search",
                {
                    "experiment_ids": [
                        _http_json(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=no-proxy")[
                            "experiment"
                        ]["experiment_id"]
                    ]
                },
            ).get("runs", [])
            == []
        )  # no run was started


def test_a_dataset_logged_by_two_workers_at_once_is_retried_not_fatal(tmp_path, monkeypatch, caplog):
    """#19: parallel workers race on MLflow's check-then-insert of the same dataset row (UNIQUE constraint)."""
    import logging

    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None, tmp_path / "out")
    tracker = Tracker(uri, "dept-race")
    tracker.parent("race", "race-key")
    child = tracker.child("job", "race-key/job", {})
    real, calls = tracker.client.log_inputs, []

    def racing(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:  # what the losing worker's store raises
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, ...")
        return real(run_id, datasets=datasets)

    monkeypatch.setattr(tracker.client, "log_inputs", racing)
    tracker.log_dataset([{"x": 1}, {"x": 2}], "tiny", "validation", run_id=child)
    assert len(calls) == 2
    assert len(MlflowClient(uri).get_run(child).inputs.dataset_inputs) == 1
    monkeypatch.setattr(
        tracker.client, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("UNIQUE constraint"))
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker.log_dataset([{"x": 3}], "other", "test", run_id=child)  # never fatal
    assert any("not logged to MLflow" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(tracker.client, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):  # any other error still surfaces
        tracker.log_dataset([{"x": 4}], "third", "test", run_id=child)
