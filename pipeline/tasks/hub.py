"""Reading a built-in task's split from the Hugging Face hub (or a local mirror of it) with `datasets`.

The task names a namespaced repository (`nyu-mll/glue`), a config and a revision. `datasets.load_dataset` is
called with all three; a revision that is not a commit sha (`main`) is first resolved to the commit it names
now, and that commit is loaded and recorded, so a run always says which data it saw.

Air-gapped machines: set `DEPT_HUB_MIRROR` to a folder holding copies of the hub repositories laid out as on
the hub, e.g. `<mirror>/nyu-mll/glue/README.md` (with its `configs:` YAML) and
`<mirror>/nyu-mll/glue/rte/train-00000-of-00001.parquet`; the same `load_dataset` call then reads the copy. A
copy's commit cannot be checked: the record names the mirror folder and leaves `commit` empty. `DEPT_DATA_DIR`
(plain `<task>/<split>.jsonl` files) bypasses this module.

Every failure becomes one `PipelineError` line that tells the causes apart: an id huggingface_hub refuses, a
dataset/config/split/revision that does not exist, an unreachable hub, a gated dataset or missing login.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks.task import ID_COLUMNS, Task

MIRROR_ENV = "DEPT_HUB_MIRROR"
DATA_DIR_ENV = "DEPT_DATA_DIR"
# Exception class names (anywhere in an error's chain) that mean "no connection": builtins, httpx/httpx2 and
# requests spell them differently, and importing every library just to name its classes would be wasteful.
_NETWORK_ERRORS = {
    "ConnectionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "TimeoutException",
    "NetworkError",
    "ProxyError",
}
_NOT_FOUND_ERRORS = {
    "DatasetNotFoundError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "DataFilesNotFoundError",
    "EmptyDatasetError",
    "FileNotFoundError",
}
_NOT_FOUND_TEXT = ("BuilderConfig", "Unknown split", "Config name is missing", "doesn't exist", "not found")


def hub_name(task: Task) -> str:
    """`namespace/name/config@revision`, for messages and records."""
    name = "/".join(filter(None, (task.hub_path, task.hub_config)))
    return f"{name}@{task.revision}" if task.revision else name


def check_hub_id(task: Task) -> None:
    """Refuse an id huggingface_hub would refuse (bare `glue`, `a/b/c`, ...) before any download."""
    from huggingface_hub.utils import validate_repo_id

    try:
        from huggingface_hub import parse_hf_uri  # the parser the hub file system applies to dataset paths
    except ImportError:  # older huggingface_hub: its validator (below) plus the namespace rule newer versions add
        parse_hf_uri = None
    try:
        validate_repo_id(task.hub_path)
        if parse_hf_uri is not None:
            parsed = parse_hf_uri(f"hf://datasets/{task.hub_path}" + (f"@{task.revision}" if task.revision else ""))
            repo_id = parsed.id
        else:
            repo_id = task.hub_path if task.hub_path.count("/") == 1 else None
        if repo_id != task.hub_path:  # `a/b/c` parses as repo a/b holding file c
            raise ValueError(f"Repository id must be 'namespace/name', got {task.hub_path!r}")
    except ValueError as err:  # HfUriError and HFValidationError are ValueErrors
        raise refused_id_error(task, err) from None


def refused_id_error(task: Task, err: BaseException) -> PipelineError:
    return PipelineError(
        f"hub id {task.hub_path!r} of task {task.name!r} is refused by huggingface_hub ({_brief(err)}); "
        "give the dataset's namespaced id, e.g. nyu-mll/glue instead of glue"
    )


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _named(err: BaseException, names: set[str]) -> bool:
    return any(cls.__name__ in names for e in _chain(err) for cls in type(e).__mro__)


def _brief(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def explain(task: Task, split: str, err: BaseException) -> PipelineError:
    """One line naming the cause of a failed hub load, and its fix."""
    where = f"split {split!r} of {hub_name(task)} (task {task.name!r})"
    local = f"set {DATA_DIR_ENV} to a folder holding {task.name}/{split}.jsonl (hub column names)"
    if _named(err, {"HfUriError", "HFValidationError"}):
        return refused_id_error(task, err)
    gated = _named(err, {"GatedRepoError"}) or any("gated" in str(e).lower() for e in _chain(err))
    if gated or getattr(getattr(err, "response", None), "status_code", None) == 403:
        return PipelineError(
            f"{where} is gated or needs a login ({_brief(err)}); accept its terms at "
            f"https://huggingface.co/datasets/{task.hub_path} and run `hf auth login` (or set HF_TOKEN), or {local}"
        )
    if _named(err, _NETWORK_ERRORS):
        return PipelineError(
            f"cannot reach the Hugging Face hub for {where} ({_brief(err)}); connect to the network "
            f"(and unset HF_HUB_OFFLINE), or {local}, or set {MIRROR_ENV} to a local copy of the hub repositories"
        )
    if _named(err, _NOT_FOUND_ERRORS) or any(text in str(err) for text in _NOT_FOUND_TEXT):
        return PipelineError(
            f"{where} does not exist ({_brief(err)}); check the task's hub_path, hub_config, revision and split "
            "names (a private dataset also needs `hf auth login`)"
        )
    return PipelineError(f"could not load {where} ({_brief(err)}); to work without the hub, {local}")


def _mirror_root() -> Path | None:
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def resolve_commit(task: Task) -> str | None:
    """The commit the task's revision names now: the revision itself when it is a sha, else asked of the hub.
    None in offline mode (HF_HUB_OFFLINE), where `datasets` may still serve a cached copy."""
    if task.revision_pinned:
        return task.revision
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    return HfApi().dataset_info(task.hub_path, revision=task.revision or "main").sha


def load_hub_table(task: Task, split: str):
    """One original split as a memory-mapped `datasets.Dataset` (only the columns the task needs; MRQA: only its
    subset's rows) and a record of where it came from:
    `{"source": "hub"|"mirror", "location", "hub_path", "hub_config", "revision", "commit"}`.
    The table's fingerprint is derived from the loaded split's (the hub cache's content) and the filter."""
    if task.hub_path is None:
        raise PipelineError(f"task {task.name!r} has no hub dataset: give it data files")
    check_hub_id(task)
    import datasets  # heavy; only needed without local files

    from pipeline.tasks.tables import digest

    mirror = _mirror_root()
    record = {"hub_path": task.hub_path, "hub_config": task.hub_config, "revision": task.revision}
    try:
        if mirror is not None:
            location = mirror / task.hub_path
            if not location.is_dir():
                raise PipelineError(
                    f"{MIRROR_ENV}={mirror} has no copy of {task.hub_path}: {location} does not exist; "
                    f"add it (laid out as on the hub) or unset {MIRROR_ENV}"
                )
            record.update(source="mirror", location=str(location), commit=None)
            dataset = datasets.load_dataset(str(location), task.hub_config, split=split)
        else:
            commit = resolve_commit(task)
            record.update(source="hub", location=f"hf://datasets/{task.hub_path}", commit=commit)
            dataset = datasets.load_dataset(
                task.hub_path, task.hub_config, split=split, revision=commit or task.revision
            )
    except PipelineError:
        raise
    except Exception as err:  # the hub's many error types: sorted into causes by `explain`
        raise explain(task, split, err) from err
    if task.row_filter is not None:
        column, value = task.row_filter
        # Filter before anything reads the rows: MRQA's train split holds ~500k rows with tokenised contexts.
        dataset = dataset.filter(
            lambda cell: cell == value,
            input_columns=column,
            new_fingerprint=digest(dataset._fingerprint, "filter", column, value)[:16],
        )
    wanted = set(task.required_columns) | set(ID_COLUMNS) | ({task.row_filter[0]} if task.row_filter else set())
    kept = [c for c in dataset.column_names if c in wanted]
    return dataset.select_columns(kept, new_fingerprint=digest(dataset._fingerprint, "columns", kept)[:16]), record


def load_hub_rows(task: Task, split: str) -> tuple[list[dict], dict]:
    """Rows of one original split as a list (only the columns the task needs) and the record of `load_hub_table`."""
    table, record = load_hub_table(task, split)
    return table.to_list(), record


def iter_table_rows(table, batch_rows: int = 1000):
    """The rows of a `datasets.Dataset`, one dict at a time, read one batch at a time."""
    for batch in table.iter(batch_size=batch_rows):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield dict(zip(names, values))
