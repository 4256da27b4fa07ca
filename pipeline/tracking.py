"""The MLflow client: one parent run per recipe execution, one nested child run per job, logged from rank 0 only.
What the runs hold (names, params, tags, how a training record becomes curves) is decided in mlflow_record.py.

Only rank 0 talks to MLflow; every other rank holds a tracker whose logging methods do nothing, so several
ranks never create duplicate runs. The calls that decide control flow (`parent`, `child`, `is_finished`,
`run_id_for`) are collectives when torch.distributed runs several ranks (`distributed.decided_on_rank0`): rank 0
answers and the answer (or its error) is broadcast, so every rank gets the same run id and skips the same finished stages. All ranks must
therefore make those calls in the same order, with the same `enabled` value.

Runs are found again by the tag `dept.key` (a stable identity of a recipe execution or stage that the caller
computes): re-running a recipe re-attaches to its runs instead of creating new ones. Everything goes through
`MlflowClient` with explicit run ids: no global active run, so nesting and re-attaching are explicit.

What reaches MLflow from the training loop (`callback_for`, through `mlflow_record.split_record`): curves only (loss, learning rates,
tokens/s, memory, validation scores), sent in batches; `step` is the x axis, counts that do not change (`eval_n`, ...)
are tags; metric names carry no '/'; None is never a param value. With a tracking server, artifacts must go through
its artifact proxy (`mlflow-artifacts:`) or a shared store: an experiment whose artifacts would land on a local path
is refused before any run starts, since other machines could not download them.

`import pipeline.tracking` stays cheap: mlflow, pandas and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.mlflow_record import flatten_params, metric_name, numeric, safe_name, split_record

# MLflow 3's UI opens an experiment in the GenAI layout (Traces, "Evaluations") unless its kind tag says model
# training: the UI reads `mlflow.experimentKind` (its ExperimentKind enum; custom_model_development, finetuning,
# ... map to the machine-learning layout). #22
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
log = logging.getLogger(__name__)

KEY_TAG = "dept.key"
ROLE_TAG = "dept.role"
PARENT_TAG = "mlflow.parentRunId"
GIT_TAG = "dept.git_commit"
DIRTY_TAG = "dept.git_dirty"
CONTEXTS = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "eval": "validation",
    "test": "test",
}
STATUSES = ("FINISHED", "FAILED", "KILLED")
DATASET_PREVIEW_ROWS = 1000  # rows of a large training table shown as the run's dataset input
FLUSH_EVERY_S = 10.0  # buffered training metrics reach MLflow at least this often
PENDING_FILE = "tracking-pending.jsonl"  # records kept while the tracking server does not answer (per output folder)
PROBE_EVERY_S = 15.0  # while the server does not answer, ask its /health this often (never MLflow's long retries)
HEALTHY_FOR_S = 5.0  # a /health answer is trusted this long before the next call asks again
WRITE_REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/=+\-]{1,250}$")
_FILE_STORE_HINT = (
    "MLflow 3 refuses the plain file store (maintenance mode); use a database store such as "
    "sqlite:///ABSOLUTE/PATH/mlflow.db or an http(s) tracking server, or set "
    "MLFLOW_ALLOW_FILE_STORE=true to use the file store anyway"
)


# ----------------------------------------------------------------------------------------------- URIs


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike) -> str:
    """Explicit `uri` > env MLFLOW_TRACKING_URI > `sqlite:///<workdir>/mlflow.db` (absolute path).

    Relative sqlite paths become absolute (so ranks and subprocesses with another cwd agree). `file:` URIs and
    plain paths are refused unless MLFLOW_ALLOW_FILE_STORE=true, as MLflow 3 itself does, but here with a
    one-line error before anything starts.
    """
    chosen = (uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not chosen:
        return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"
    scheme = urllib.parse.urlparse(chosen).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):  # plain path (or a Windows drive)
        if not _truthy(os.environ.get("MLFLOW_ALLOW_FILE_STORE")):
            raise PipelineError(f"tracking URI {chosen!r} is a file store: {_FILE_STORE_HINT}")
        if scheme == "file":
            return chosen
        return Path(chosen).expanduser().resolve().as_uri()
    if scheme == "sqlite":
        path = _sqlite_path(chosen)
        if path is not None and not path.is_absolute():
            return f"sqlite:///{path.resolve()}"
    return chosen


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for in-memory databases)."""
    rest = uri.split(":", 1)[1]
    if not rest.startswith("///"):
        return None if rest in ("", "//", "///:memory:") else Path(rest.lstrip("/"))
    path = rest[3:].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when the tracking store cannot be used. Call it before any training.

    http(s): GET `<uri>/health` within `timeout_s`. sqlite: the database's directory is created and must be
    writable. Other schemes (postgresql, mysql, databricks, ...) are left to MLflow.
    """
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and refused connections
            reason = getattr(exc, "reason", None) or exc
            raise PipelineError(
                f"tracking URI {uri} unreachable: GET {url} failed within {timeout_s:g} s ({reason}); start "
                f"`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port PORT --workers 1 "
                f"--backend-store-uri sqlite:///PATH/mlflow.db` or unset MLFLOW_TRACKING_URI (a local sqlite store "
                f"in the output directory is then used)"
            ) from None
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            return
        parent = path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(
                f"tracking URI {uri}: cannot create directory {parent} ({exc}); "
                f"choose another --tracking.uri=URI (or MLFLOW_TRACKING_URI) or --output_dir"
            ) from None
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise PipelineError(
                f"tracking URI {uri}: {path if path.exists() else parent} is not writable; "
                f"fix its permissions or choose another --tracking.uri=URI (or MLFLOW_TRACKING_URI)"
            )


# ----------------------------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, str]:
    """(commit, dirty) of the repository this package lives in; ("unknown", "unknown") when not in a git checkout.

    Only a checkout that tracks this package counts: an installed copy inside some unrelated repository (a venv
    inside a project) reports "unknown". dirty: "true" when tracked files differ from HEAD.
    """
    here = Path(__file__).resolve()
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(here.parent), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if not git("ls-files", "--", str(here.parent)):  # this package must be tracked by that repository
            return "unknown", "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no", "--", str(top)) else "false"
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise PipelineError(
            f"tracking key {key!r} is not valid: use 1-250 characters from A-Z a-z 0-9 _ . : / = + - "
            f"(e.g. a hash of the resolved recipe and output directory)"
        )
    return key


# ----------------------------------------------------------------------------------------------- tracker


class Tracker:
    """Parent/child MLflow runs for a recipe, logged from rank 0 only.

    `Tracker(uri, experiment, enabled=False)` and trackers on ranks other than 0 never touch MLflow: logging
    methods return None, `parent`/`child`/`run_id_for` return rank 0's answer when torch.distributed is up
    (None otherwise) and `is_finished` rank 0's answer (False otherwise).

    `run_id=None` in the logging methods means the current run: the last child opened and not finished, else
    the parent. As a context manager, runs still open at exit are finished (FAILED on an exception, KILLED on
    KeyboardInterrupt).
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        enabled: bool = True,
        rank: int | None = None,
        workdir: str | os.PathLike | None = None,
    ):
        self.enabled = bool(enabled)
        self.rank = distributed.rank() if rank is None else int(rank)
        self.active = self.enabled and self.rank == 0
        self.experiment = str(experiment)
        if self.enabled and not self.experiment.strip():
            raise PipelineError("MLflow experiment name is empty: give one, e.g. --tracking.experiment=dept")
        self.uri = resolve_tracking_uri(uri, workdir or os.getcwd()) if self.enabled else (uri or "")
        self._client = None
        self._experiment_id: str | None = None
        self._checked = False
        self.parent_id: str | None = None
        self._keys: dict[str, str] = {}  # dept.key -> run id, for runs opened by this tracker
        self._open: list[str] = []  # run ids opened by this tracker and not finished yet (children after parent)
        self._streams: list[_MetricStream] = []  # callbacks with buffered metric points
        self._outage = _Outage(self.uri, float(os.environ.get("DEPT_TRACKING_PROBE_S", PROBE_EVERY_S)))
        self._folders: dict[str, Path] = {}  # run id -> its output folder (tag dept.output_dir): where records wait
        self._kept: set[Path] = set()  # pending files this tracker wrote and has not sent yet
        self._finished: set[str] = set()  # run ids this tracker finished
        self._without_run: set[str] = set()  # keys of jobs that started while the server did not answer

    # -- plumbing

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        if not self._checked:
            check_reachable(self.uri)
            self._checked = True
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                path = _sqlite_path(self.uri)
                if path is not None:  # else MLflow would put artifacts in ./mlruns of whatever cwd this is
                    location = (path.parent / "mlartifacts").resolve().as_uri()
            try:
                self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as exc:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise PipelineError(
                        f"cannot create MLflow experiment {self.experiment!r} at {self.uri}: {exc}"
                    ) from None
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise PipelineError(
                    f"MLflow experiment {self.experiment!r} (id {exp.experiment_id}) is deleted at {self.uri}: "
                    f"restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose "
                    f"another experiment name"
                )
            self._experiment_id = exp.experiment_id
        self._check_artifact_location()
        kind = (exp.tags if exp is not None else {}).get(EXPERIMENT_KIND_TAG)
        if kind is None:  # a kind chosen in the UI by hand is kept
            self.client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return self._experiment_id

    def _check_artifact_location(self) -> None:
        """With a tracking server, artifacts must go through it (`mlflow-artifacts:`) or to a shared store (s3:,
        gs:, ...): a local path of the server's machine is one the training machine writes to its own disk and no
        other client can download from (MLflow then answers "No artifacts found")."""
        if urllib.parse.urlparse(self.uri).scheme.lower() not in ("http", "https"):
            return
        location = self.client.get_experiment(self._experiment_id).artifact_location or ""
        scheme = urllib.parse.urlparse(location).scheme.lower()
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            raise PipelineError(
                f"MLflow experiment {self.experiment!r} at {self.uri} stores artifacts at {location!r}, a path on "
                f"the local disk, so adapters logged from here could not be downloaded from another machine: start "
                f"the server with its artifact proxy (`mlflow server --serve-artifacts --artifacts-destination DIR`, "
                f"the default since MLflow 2; no --default-artifact-root with a local path) and use a new experiment "
                f"(--tracking.experiment=NAME): an experiment's artifact location cannot change"
            )

    def describe_experiment(self, description: str) -> None:
        """The experiment's description in the UI (its `mlflow.note.content` tag); empty text changes nothing."""
        if self.active and description and description.strip():
            self.client.set_experiment_tag(self._experiment(), "mlflow.note.content", description.strip())

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id (rank 0 with tracking on), for links into the MLflow UI."""
        return self._experiment() if self.active else None

    def _collective(self, fn: Callable, default=None):
        """fn() on rank 0 when tracking is on; its result (or its error) is handed to every rank."""
        if not self.enabled:
            return default
        if self.rank != distributed.rank():  # a tracker told its rank (tests): no collective to take part in
            return fn() if self.active else default
        return distributed.decided_on_rank0(fn, default, what="MLflow tracking")

    def _find(self, key: str, parent_id: str | None = None, role: str | None = None):
        """The oldest active run of this experiment with tag dept.key == key (under parent_id, of role, if given)."""
        query = f"tags.`{KEY_TAG}` = '{key}'"
        if role:
            query += f" and tags.`{ROLE_TAG}` = '{role}'"
        if parent_id:
            query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
        runs = self.client.search_runs(
            [self._experiment()], filter_string=query, max_results=10, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    def _open_run(
        self, key: str, name: str, tags: dict[str, str], parent_id: str | None = None, params: dict | None = None
    ) -> str:
        commit, dirty = git_commit()
        run = self._find(key, parent_id, tags[ROLE_TAG])
        if run is not None and params:
            self._new_params(params, run.data.params, run.info.run_id)  # refuse changed params before re-opening
        if run is None:
            all_tags = self._context_tags()
            all_tags.update(tags)
            all_tags.update({KEY_TAG: key, GIT_TAG: commit, DIRTY_TAG: dirty})
            if commit != "unknown":
                all_tags["mlflow.source.git.commit"] = commit
            if parent_id:
                all_tags[PARENT_TAG] = parent_id
            run_id = self.client.create_run(self._experiment(), tags=all_tags, run_name=name).info.run_id
        else:
            run_id = run.info.run_id
            attempts = int(run.data.tags.get("dept.attempts", "1") or 1) + 1
            self.client.update_run(run_id, status="RUNNING")
            self._set_tags({GIT_TAG: commit, DIRTY_TAG: dirty, "dept.attempts": str(attempts)}, run_id)
        self._keys[key] = run_id
        if run_id not in self._open:
            self._open.append(run_id)
        if params:
            self._log_params(params, run_id)
        return run_id

    @staticmethod
    def _context_tags() -> dict[str, str]:
        """mlflow.user, mlflow.source.name, ... as `mlflow.start_run` would add them (best effort)."""
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return {k: str(v) for k, v in resolve_tags({}).items()}
        except Exception:  # internal API: losing these tags is harmless
            return {}

    def _current(self, run_id: str | None) -> str | None:
        if run_id:
            return run_id
        if self._open:
            return self._open[-1]
        return self.parent_id

    def _set_tags(self, tags: dict, run_id: str) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(safe_name(k), str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i : i + 100])

    @staticmethod
    def _new_params(params: dict, existing: dict[str, str], run_id: str) -> dict[str, str]:
        """The flattened params not logged yet; PipelineError when one was logged with another value."""
        flat = flatten_params(params)
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
        if changed:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5])
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            raise PipelineError(
                f"run {run_id} already has different values for params {shown}{more}: MLflow params "
                f"cannot change, so use a new output directory for a changed recipe"
            )
        return {k: v for k, v in flat.items() if k not in existing}

    def _log_params(self, params: dict, run_id: str) -> None:
        from mlflow.entities import Param

        new = self._new_params(params, self.client.get_run(run_id).data.params, run_id)
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    # -- runs

    def parent(self, recipe_name: str, key: str) -> str | None:
        """Start, or re-attach to (status back to RUNNING), the parent run of a recipe execution; its run id."""
        _check_key(key)

        def open_parent():
            return self._open_run(key, recipe_name, {ROLE_TAG: "parent", "dept.recipe": recipe_name})

        self.parent_id = self._collective(open_parent)
        return self.parent_id

    def join_parent(self, key: str, wait_s: float = 600.0) -> str | None:
        """The parent run another process opened (a `dept run --join` worker's): found by its key, waited for up
        to `wait_s` (the launcher may still be starting), and never re-opened or finished by this tracker: the
        launcher that opened it closes it when every job is done."""
        _check_key(key)

        def find_parent():
            deadline = time.monotonic() + wait_s
            while True:
                run = self._find(key, role="parent")
                if run is not None:
                    return run.info.run_id
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"no MLflow parent run with key {key} at {self.uri} after {wait_s:.0f} s: start the run with "
                        f"`dept run RECIPE --output_dir=DIR` first, then join it with the same recipe, --output_dir "
                        f"and tracking URI"
                    )
                time.sleep(2)

        self.parent_id = self._collective(find_parent)
        return self.parent_id

    def child(self, name: str, key: str, params: dict | None = None) -> str | None:
        """Start, or re-attach to, a nested run under the parent and log its params (flattened with dots).

        On re-attach, params already logged with the same value are skipped; a changed value raises
        PipelineError (MLflow params are immutable: a changed recipe needs a new output directory).
        """
        _check_key(key)

        def open_child():
            if self.parent_id is None:
                raise RuntimeError("Tracker.child() called before Tracker.parent()")
            if not self._outage.usable():  # a run cannot be created now: the job goes on without one (#21)
                if key in self._without_run:  # said once per job (the summary looks at every job again)
                    return None
                self._without_run.add(key)
                log.warning(
                    "MLflow tracking server %s does not answer: job %s runs without its MLflow run; its results "
                    "stay in its folder, and the next run of the same command creates the run from them once the "
                    "server answers",
                    self.uri,
                    name,
                )
                return None
            return self._open_run(
                key, name, {ROLE_TAG: "child", "dept.stage": name}, parent_id=self.parent_id, params=params
            )

        return self._collective(open_child)

    def run_id_for(self, key: str) -> str | None:
        """The run id with that dept.key (a child of the current parent when there is one), or None."""
        _check_key(key)

        def lookup():
            if key in self._keys:
                return self._keys[key]
            if not self._outage.usable():  # unknown while the server does not answer (lineage tags are skipped)
                return None
            run = self._find(key, self.parent_id) or (self._find(key) if self.parent_id is None else None)
            return run.info.run_id if run else None

        return self._collective(lookup)

    def is_finished(self, key: str) -> bool:
        """True when a run with that key (a child of the current parent, if any) exists and is FINISHED."""
        _check_key(key)

        def lookup():
            if self._keys.get(key) in self._finished:  # finished here (maybe kept for later): no request. #21
                return True
            if not self._outage.usable():  # the caller then asks for the run, and goes on without one
                return False
            run = self._find(key, self.parent_id) if self.parent_id else self._find(key)
            return bool(run and run.info.status == "FINISHED")

        return bool(self._collective(lookup, default=False))

    def finish(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        """Terminate a run (default: the current one). Finishing the parent also finishes, with the same status,
        the children this tracker opened and left open."""
        status = status.upper()
        if status not in STATUSES:
            raise PipelineError(f"run status {status!r} is not one of {', '.join(STATUSES)}")
        run_id = self._current(run_id)
        if not self.active or run_id is None:
            return
        to_close = [run_id]
        if run_id == self.parent_id:
            to_close = [r for r in self._open if r != run_id] + [run_id]
        for rid in to_close:
            self.flush(rid)
            self._send_or_keep(rid, {"kind": "terminate", "status": status}, self.client.set_terminated, rid, status)
            if status == "FINISHED":
                self._finished.add(rid)
            if rid in self._open:
                self._open.remove(rid)
        self._say_what_waits()

    # -- logging

    def log_params(self, params: dict, run_id: str | None = None) -> None:
        run_id = self._current(run_id)
        if self.active and run_id and params:
            record = {"kind": "params", "params": flatten_params(params)}
            self._send_or_keep(run_id, record, self._log_params, params, run_id)

    def set_tags(self, tags: dict, run_id: str | None = None) -> None:
        run_id = self._current(run_id)
        if self.active and run_id and tags:
            if "dept.output_dir" in tags:
                self._folders[run_id] = Path(tags["dept.output_dir"])
            record = {"kind": "tags", "tags": {safe_name(k): str(v)[:8000] for k, v in tags.items()}}
            self._send_or_keep(run_id, record, self._set_tags, tags, run_id)

    def log_metrics(self, metrics: dict, step: int, run_id: str | None = None) -> None:
        """Log the numeric values of `metrics` at `step` (strings, None and other non-numbers are skipped)."""
        run_id = self._current(run_id)
        if not (self.active and run_id and metrics):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = numeric(value)
            if number is not None:
                items.append(Metric(metric_name(key), number, now, int(step)))
        record = {"kind": "batch", "points": [[m.key, m.value, m.timestamp, m.step] for m in items], "tags": {}}
        self._send_or_keep(run_id, record, _send_batch, self.client, run_id, items, {})

    def log_artifact(
        self, path: str | os.PathLike, artifact_path: str | None = None, run_id: str | None = None
    ) -> None:
        """A file lands at `<artifact_path>/<name>`; a directory at `<artifact_path>/<dirname>/...`."""
        run_id = self._current(run_id)
        if not (self.active and run_id):
            return
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"cannot log artifact {path}: no such file or directory")
        record = {"kind": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path}
        self._send_or_keep(run_id, record, _send_artifact, self.client, run_id, str(path), artifact_path)

    def log_dataset(
        self, rows: list[dict], name: str, context: str, run_id: str | None = None, source: str | None = None
    ) -> str | None:
        """Log rows as an MLflow dataset input (from_pandas; digest = sha256 of the rows) with a context tag. A
        memory-mapped table is identified by its content fingerprint and logged by its first rows only.

        context: "training", "validation" or "test" (aliases train/valid/dev/eval accepted). Returns the digest.
        """
        canonical = CONTEXTS.get(str(context).lower())
        if canonical is None:
            raise PipelineError(f"dataset context {context!r} is not one of training, validation, test")
        run_id = self._current(run_id)
        if not (self.active and run_id):
            return None
        if not self._outage.usable():  # a preview of the rows: not worth keeping for later
            log.warning("MLflow tracking server unreachable: dataset %s (%s) not logged", name, canonical)
            return None
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if hasattr(rows, "_fingerprint"):  # a memory-mapped `datasets` table (large): never read it whole
            digest = hashlib.sha256(str(rows._fingerprint).encode()).hexdigest()[:16]
            rows = rows.select(range(min(len(rows), DATASET_PREVIEW_ROWS))).to_list()
        else:
            blob = json.dumps(list(rows), sort_keys=True, default=str).encode()
            digest = hashlib.sha256(blob).hexdigest()[:16]
        flat = [
            {
                k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v)
                for k, v in row.items()
            }
            for row in rows
        ]
        frame = pd.DataFrame(flat)
        with warnings.catch_warnings():  # schema-inference hints about integer columns are for model serving
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
            entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, canonical)])
        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, datasets=[entity])
                break
            except Exception as exc:  # noqa: BLE001 - MLflow wraps the store's error in several types
                # Two parallel workers logging the same rows at once (#19): MLflow's sqlite store checks for the
                # dataset, then inserts it, so one of them hits the UNIQUE constraint; a retry finds the row the
                # other wrote. A preview is not worth stopping a job for: after three tries, a warning.
                if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in type(exc).__name__:
                    raise
                if attempt == 2:
                    log.warning("dataset %s (%s) not logged to MLflow: %s", name, canonical, str(exc)[:200])
                time.sleep(0.2 * (attempt + 1))
        return digest

    def callback_for(
        self, run_id: str | None = None, invalid_curves: bool = False, flush_every_s: float = FLUSH_EVERY_S
    ) -> Callable[[int, dict], None]:
        """A `(step, record) -> None` for the training loop's callbacks: what `split_record` makes of each record.

        Points are buffered and sent in batches (one request per `flush_every_s` seconds or 1000 points, and at
        once for validation and test records), so logging every step costs little; `finish` and leaving the
        `with` block send what is left. A failing MLflow call is logged as a warning and does not stop training (a
        lost metric point costs less than a lost run); parent/child/finish errors still raise.
        """
        run_id = self._current(run_id)
        if not (self.active and run_id):
            return lambda step, metrics: None
        stream = _MetricStream(self, run_id, invalid_curves, flush_every_s, self._last_steps(run_id))
        self._streams.append(stream)
        return stream

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """The last step logged of each metric of a run (empty for a new run): a resumed job re-logs nothing. #21"""
        try:
            keys = list(self.client.get_run(run_id).data.metrics)
            return {key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1) for key in keys}
        except Exception as exc:  # noqa: BLE001 -- a tracking failure never stops training (see callback_for)
            log.warning("could not read the metrics MLflow run %s already holds: %s", run_id, exc)
            return {}

    def flush(self, run_id: str | None = None) -> None:
        """Send the metric points buffered for `run_id` (None: every run)."""
        for stream in list(self._streams):
            if run_id is None or stream.run_id == run_id:
                stream.flush()
                if run_id is not None:
                    self._streams.remove(stream)
        if run_id is None:
            self._streams.clear()

    # -- context manager

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active or not self._open:
            return
        # Ctrl-C and SIGTERM (interrupts.Interrupted is a KeyboardInterrupt): KILLED; the next run re-attaches. #21
        status = "FINISHED" if exc_type is None else ("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        try:
            self.flush()  # the curve up to the failure is worth keeping
        except Exception as err:  # noqa: BLE001 -- never hide the original exception
            log.warning("could not send the last MLflow metrics: %s", err)
        for run_id in reversed(list(self._open)):
            try:
                self._send_or_keep(
                    run_id, {"kind": "terminate", "status": status}, self.client.set_terminated, run_id, status
                )
            except Exception as err:  # noqa: BLE001 -- never hide the original exception
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)
        self._open.clear()
        self._say_what_waits()

    # -- while the tracking server does not answer (#21)

    def _send_or_keep(self, run_id: str, record: dict, send: Callable, *args) -> None:
        """`send(*args)` now; while the tracking server does not answer, `record` waits in the run's
        `<output_dir>/tracking-pending.jsonl` instead (sent when the server answers again, by `dept sync-tracking`
        or by the next run of the same command). An error from a server that answers is raised as before."""
        if self._outage.usable():
            try:
                with _without_retries():
                    if self._kept:
                        self._send_kept()
                    send(*args)
                return
            except PipelineError:
                raise
            except Exception as exc:
                if self._outage.healthy_now():
                    raise  # the server answers: a real error, not an outage
                self._outage.failed(exc)
        self._keep(run_id, record)

    def _keep(self, run_id: str, record: dict) -> None:
        path = self._folders.get(run_id, self._folders.get(self.parent_id or "", Path.cwd())) / PENDING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"uri": self.uri, "run_id": run_id, **record}) + "\n")
        self._kept.add(path)

    def _send_kept(self) -> None:
        for path in sorted(self._kept):
            sent = send_pending(path, self.client)
            self._kept.discard(path)
            log.info("MLflow tracking server back: %d kept record(s) from %s sent", sent, path)

    def _say_what_waits(self) -> None:
        if self._kept and self._outage.down_since is not None:
            folders = ", ".join(str(p) for p in sorted(self._kept))
            log.warning(
                "MLflow tracking server %s still unreachable: unsent records wait in %s; once it answers, run "
                "`dept sync-tracking OUTPUT_DIR` (or the same command again) to send them",
                self.uri,
                folders,
            )

    def send_pending(self, folder: str | os.PathLike) -> int:
        """Send every record kept under `folder` (the next run of the same command calls it); the count sent."""
        if not self.active:
            return 0
        total = 0
        for path in sorted(Path(folder).rglob(PENDING_FILE)):
            total += send_pending(path, self.client)
        return total


@contextlib.contextmanager
def _without_retries():
    """MLflow's http client retries a failed request for minutes (7 retries, growing back-off): for the writes a
    running job makes, one try within a bounded time, after which the record waits in the pending file instead.
    MLflow reads both variables at each request; a value the user set wins."""
    saved = {name: os.environ.get(name) for name in WRITE_REQUEST_ENV}
    for name, value in WRITE_REQUEST_ENV.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def _send_batch(client, run_id: str, points: list, tags: dict) -> None:
    from mlflow.entities import RunTag

    for i in range(0, max(len(points), 1), 1000):
        batch_tags = [RunTag(k, v) for k, v in tags.items()] if i == 0 else []
        client.log_batch(run_id, metrics=points[i : i + 1000], tags=batch_tags)


def _send_artifact(client, run_id: str, path: str, artifact_path: str | None) -> None:
    """A file lands at `<artifact_path>/<name>`; a directory at `<artifact_path>/<dirname>/...`."""
    if Path(path).is_dir():
        name = Path(path).name
        client.log_artifacts(run_id, path, posixpath.join(artifact_path, name) if artifact_path else name)
    else:
        client.log_artifact(run_id, path, artifact_path)


def send_pending(path: str | os.PathLike, client=None) -> int:
    """Send the records kept in one `tracking-pending.jsonl` to the tracking server each names (or `client`'s), in
    order; each record is dropped from the file once sent, so a failure part-way re-sends nothing twice. Returns
    the number sent; the file is gone when all were."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    clients: dict[str, object] = {}
    for done, record in enumerate(records):
        if client is None and record["uri"] not in clients:
            check_reachable(record["uri"])  # one line now, rather than MLflow's retries for minutes
            clients[record["uri"]] = MlflowClient(tracking_uri=record["uri"])
        mlflow = client or clients[record["uri"]]
        run_id, kind = record["run_id"], record["kind"]
        try:
            if kind == "batch":
                points = [Metric(k, v, t, s) for k, v, t, s in record["points"]]
                _send_batch(mlflow, run_id, points, record["tags"])
            elif kind == "tags":
                mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
            elif kind == "params":
                existing = mlflow.get_run(run_id).data.params
                params = [Param(k, v) for k, v in record["params"].items() if k not in existing]
                if params:
                    mlflow.log_batch(run_id, params=params)
            elif kind == "artifact":
                _send_artifact(mlflow, run_id, record["path"], record["artifact_path"])
            elif kind == "terminate":
                mlflow.set_terminated(run_id, status=record["status"])
        except BaseException:
            from pipeline import atomic

            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records[done:]))
            raise
    path.unlink()
    return len(records)


class _Outage:
    """Whether the tracking server answers, asked cheaply: an http(s) server's `/health` (2 s) before calls when
    the last answer is older than HEALTHY_FOR_S, and while it does not answer at most every PROBE_EVERY_S, so that
    no call waits through MLflow's own retries (minutes) and training never slows down. One warning when it goes,
    one when it is back. Other stores (sqlite) are taken to answer."""

    def __init__(self, uri: str, probe_every_s: float = PROBE_EVERY_S):
        self.uri, self.probe_every_s = uri, probe_every_s
        self.http = urllib.parse.urlparse(uri).scheme.lower() in ("http", "https")
        self.down_since: float | None = None
        self.asked_at = -math.inf

    def healthy_now(self) -> bool:
        if not self.http:
            return True
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2) as resp:
                ok = resp.status == 200
        except (OSError, ValueError):
            ok = False
        self.asked_at = time.monotonic()
        return ok

    def usable(self) -> bool:
        now = time.monotonic()
        if not self.http or (self.down_since is None and now - self.asked_at < HEALTHY_FOR_S):
            return True
        if self.down_since is not None and now - self.asked_at < self.probe_every_s:
            return False
        if self.healthy_now():
            if self.down_since is not None:
                log.warning("MLflow tracking server %s answers again after %.0f s", self.uri, now - self.down_since)
                self.down_since = None
            return True
        self.failed("no answer to GET /health")
        return False

    def failed(self, reason) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "MLflow tracking server %s does not answer (%s): training goes on; metrics, params and tags wait in "
                "the job folder's %s until it answers",
                self.uri,
                str(reason).splitlines()[0][:200] if str(reason) else type(reason).__name__,
                PENDING_FILE,
            )
        self.asked_at = time.monotonic()


class _MetricStream:
    """One run's training-loop callback: records split into metrics and tags, buffered, sent in batches."""

    def __init__(
        self, tracker: Tracker, run_id: str, invalid_curves: bool, flush_every_s: float, last_steps: dict | None = None
    ):
        self.tracker, self.run_id, self.invalid_curves = tracker, run_id, invalid_curves
        self.last_steps = last_steps or {}  # metric -> last step the run holds: later points only (a resumed job)
        self.flush_every_s = flush_every_s
        self.points: list = []
        self.tags: dict[str, str] = {}
        self.sent_at = time.monotonic()
        self.failures = 0

    def __call__(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        metrics, tags = split_record(record, self.invalid_curves)
        now = int(time.time() * 1000)
        self.points += [
            Metric(k, v, now, int(step)) for k, v in metrics.items() if int(step) > self.last_steps.get(k, -1)
        ]
        self.tags.update(tags)
        evaluated = any(str(k).startswith(("eval_", "test_")) for k in record)
        if evaluated or len(self.points) >= 1000 or time.monotonic() - self.sent_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not (self.points or self.tags):
            return

        points, tags = self.points, self.tags
        self.points, self.tags, self.sent_at = [], {}, time.monotonic()
        record = {"kind": "batch", "points": [[m.key, m.value, m.timestamp, m.step] for m in points], "tags": tags}
        try:
            self.tracker._send_or_keep(self.run_id, record, _send_batch, self.tracker.client, self.run_id, points, tags)
        except Exception as exc:  # noqa: BLE001 -- see Tracker.callback_for
            self.failures += 1
            if self.failures <= 3 or math.log2(self.failures).is_integer():
                log.warning(
                    "MLflow metric logging failed (%d points lost, %d failures so far): %s",
                    len(points),
                    self.failures,
                    exc,
                )
