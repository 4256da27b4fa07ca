"""The one typed configuration: recipes, `dept` command-line flags and `--help` are all derived from it.

A training job (`dept train`, or one job of a recipe) is a `JobConfig`: run-level fields (model, output
directory, DeepSpeed config, method, ...) plus three sections that recipes spell as mappings and the command line
as flat flags:

    dept:   DeptArgs   the DePT shape and init              recipe `dept: {num_virtual_tokens: 60}`  flag --num_virtual_tokens 60
    train:  TrainArgs  optimisation and the training loop   recipe `train: {steps: 100}`             flag --steps 100
    data:   DataArgs   tasks, k-shot, evaluation            recipe `data: {eval_mode: score}`        flag --eval_mode score

This module is the schema: the dataclasses, their help texts, defaults and minimums (`option`), and the rules
between fields (`__post_init__`, one-line `PipelineError`s). How a mapping or the command line's flags become these
dataclasses (keys, types, choices, ranges checked; "did you mean") is options.py. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Literal

from pipeline.errors import PipelineError
from pipeline.options import coerce, option

# The DePT authors' TEXT init, typo included (their released configs), tokenized with the tokenizer's special
# tokens as PEFT does (T5 appends </s>) and tiled to m rows.
AUTHORS_INIT_TEXT = "Classify this text is postive or not:"
METHODS = ("dept", "pt", "lora", "finetune")
LENGTH_POLICIES = ("error", "truncate", "pad")
PROMPT_INITS = ("TEXT", "VOCAB", "RANDOM")
EVAL_MODES = ("generate", "score")
DEFAULT_M, DEFAULT_R, DEFAULT_S = 60, 30, 256  # the paper's shape: the one default of m, r and s

# What each method reads, by field path: the fields listed here are read only by the methods that list them; every
# other field is read by every method. A job's fingerprint leaves out what its method does not read
# (fingerprint.py), its MLflow run shows only what it reads (mlflow_record.job_params), and a recipe's `dept:` section
# reaches a stage only with keys the stage's method reads (recipe.py).
_PROMPT = {
    ("train", "lr_prompt"),
    ("dept", "num_virtual_tokens"),
    ("dept", "prompt_init"),
    ("dept", "init_text"),
    ("init_adapter",),
    ("on_length_mismatch",),
}
METHOD_FIELDS = {
    "dept": _PROMPT | {("train", "lr_lowrank"), ("dept", "r"), ("dept", "budget_tokens"), ("dept", "lora_alpha")},
    "pt": _PROMPT,  # r = 0: no low-rank pair, so no r, budget, lora_alpha or its learning rate
    # PEFT's LoRA pairs in the backbone: its own section and rate; a LoRA adapter to start from; dept.max_length: the input
    "lora": {("lora",), ("train", "lr_lora"), ("init_adapter",)},
    "finetune": {("train", "lr"), ("save_model",)},  # every backbone weight at one rate; dept.max_length: the input
}
_SOME_METHODS = set().union(*METHOD_FIELDS.values())


def unread_fields(method: str) -> set[tuple[str, ...]]:
    """The field paths of a JobConfig that `method` never reads (changing them cannot change its result)."""
    return _SOME_METHODS - METHOD_FIELDS[method]


def micro_batch_size(batch_size: int, grad_accum: int, world: int) -> int:
    """Rows per rank per forward pass: the global batch split over the ranks and the accumulation steps."""
    per_step = world * grad_accum
    if batch_size % per_step:
        raise PipelineError(
            f"batch_size {batch_size} is not divisible by world size {world} x grad_accum "
            f"{grad_accum}: choose a multiple of {per_step} (or another number of ranks)"
        )
    return batch_size // per_step


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class DeptArgs:
    """The DePT shape and initialisation (recipe section `dept:`)."""

    num_virtual_tokens: int | None = option(
        None, f"m, prompt length (default {DEFAULT_M}, or the init adapter's)", minimum=0
    )
    r: int | None = option(
        None,
        f"rank of A @ B (default {DEFAULT_R}, or from budget_tokens, or the init adapter's; pt: 0)",
        minimum=0,
        cli="lora_rank",
    )
    max_length: int | None = option(
        None, f"s, longest input in tokens = rows of A (default {DEFAULT_S}, or the init adapter's)", minimum=1
    )
    budget_tokens: int | None = option(
        None,
        "l: choose r so that DePT spends the parameters of prompt tuning with l tokens, r = (l - m) d / (s + d)",
        minimum=1,
    )
    lora_alpha: float = option(8.0, "offset scale is lora_alpha / sqrt(r), as in every published run", minimum=1e-12)
    prompt_init: Literal[PROMPT_INITS] = option(
        "TEXT", "prompt init: TEXT (the init text's embeddings, tiled), VOCAB (random vocabulary rows), RANDOM"
    )
    init_text: str = option(AUTHORS_INIT_TEXT, "text whose token embeddings seed a TEXT init (the authors')")

    def __post_init__(self):
        if self.r is not None and self.budget_tokens is not None:
            raise PipelineError(
                f"give r ({self.r}) or budget_tokens ({self.budget_tokens}), not both: budget_tokens computes r"
            )
        if self.prompt_init == "TEXT" and not self.init_text.strip():
            raise PipelineError("init_text is empty: give a text for TEXT init or set prompt_init to VOCAB/RANDOM")

    def refuse_other_shape(self, adapter: str, m: int | None, r: int | None) -> None:
        """An explicit m or r that contradicts the init adapter's (`m`, `r`; None: unknown) is refused: the
        adapter's tensors could not be loaded."""
        for flag, mine, theirs in (("num_virtual_tokens", self.num_virtual_tokens, m), ("lora_rank (r)", self.r, r)):
            if mine is not None and theirs is not None and mine != theirs:
                raise PipelineError(
                    f"init adapter {adapter} has {flag}={theirs} but {mine} was given: "
                    f"drop {flag} to take the adapter's shape"
                )


@dataclass
class LoraArgs:
    """LoRA through HF PEFT (method lora; recipe section `lora:`): PEFT's LoraConfig fields under their own flags."""

    r: int | None = option(None, "rank of each LoRA pair (default 8, or from a budget)", minimum=1, cli="lora_r")
    alpha: float | None = option(
        None,
        "PEFT's lora_alpha: updates are scaled by alpha / r (default: r, i.e. scale 1); DePT's --lora_alpha is not it",
        minimum=1e-12,
    )
    dropout: float = option(
        0.0, "dropout on the input of each LoRA pair (PEFT's lora_dropout)", minimum=0.0, cli="lora_dropout"
    )
    target_modules: list[str] | None = option(
        None,
        "names of the Linear layers that get a LoRA pair (default PEFT's for the architecture: T5 q, v; "
        "LLaMA q_proj, v_proj)",
        cli="lora_targets",
    )
    budget_tokens: int | None = option(
        None,
        "choose r so that LoRA spends about the parameters of prompt tuning with this many tokens (l x d), the "
        "budget DePT's budget_tokens spends",
        minimum=1,
        cli="lora_budget_tokens",
    )
    budget_params: int | None = option(
        None,
        "choose r so that LoRA spends about this many parameters (e.g. a DePT shape's m d + s r + r d)",
        minimum=1,
        cli="lora_budget_params",
    )

    def __post_init__(self):
        given = [n for n in ("r", "budget_tokens", "budget_params") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PipelineError(
                f"LoRA: give one of lora_r, lora_budget_tokens, lora_budget_params (got {', '.join(given)}): "
                "a budget computes r"
            )
        if self.dropout >= 1:
            raise PipelineError(f"LoRA dropout must be below 1, got {self.dropout}")
        if self.target_modules is not None and not [t for t in self.target_modules if str(t).strip()]:
            raise PipelineError("LoRA target_modules is empty: name Linear layers (e.g. [q, v]) or leave it unset")


@dataclass
class TrainArgs:
    """Optimisation and the training loop (recipe section `train:`). Defaults follow the paper's runs."""

    batch_size: int = option(32, "global batch: all ranks and accumulation steps together", minimum=1)
    grad_accum: int = option(1, "gradient accumulation steps per optimizer step", minimum=1)
    steps: int = option(1000, "optimizer steps", minimum=1)
    warmup_steps: int = option(500, "linear warmup steps, then linear decay to 0 (must be below steps)", minimum=0)
    lr_prompt: float = option(0.3, "learning rate of the prompt", minimum=0.0)
    lr_lowrank: float = option(1e-4, "learning rate of A and B", minimum=0.0)
    lr: float = option(1e-4, "learning rate of the backbone (method finetune only)", minimum=0.0)
    lr_lora: float = option(5e-4, "learning rate of LoRA's A and B (method lora only)", minimum=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay (the authors' runs: effectively 0)", minimum=0.0)
    grad_clip: float = option(1.0, "gradient-norm clip (0: none)", minimum=0.0)
    seed: int = option(42, "seed of the init, the data order and dropout", minimum=0)
    log_every: int = option(10, "log loss and learning rates every N steps", minimum=1)
    eval_every: int = option(
        0, "validate every N steps (0: once at the end); the best step scores the test split", minimum=0
    )
    save_every: int | None = option(
        None,
        "write a resumable checkpoint every N steps (0: none; not given: every save_every_minutes of wall time, at "
        "the end of warm-up, and when SIGTERM/SIGINT stops the job)",
        minimum=0,
    )
    save_every_minutes: float = option(
        10.0,
        "when save_every is not given: a checkpoint every this many minutes (so a preempted job loses at most "
        "that much), one at the end of warm-up, and one when SIGTERM/SIGINT stops the job",
        minimum=0.0,
    )
    keep_checkpoints: int = option(2, "complete checkpoints kept (the newest always)", minimum=1)
    max_target_length: int = option(32, "longest target in tokens (a truncated target keeps its EOS)", minimum=1)
    pad_to_max_length: bool = option(False, "pad every input to s (the authors' setting; slower, same loss)")
    group_by_length: bool = option(False, "batch rows of similar length together (less padding)")
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "a NaN/inf loss: stop (keep the last good adapter) or skip the step"
    )
    allow_fp16_t5: bool = option(False, "train T5 under an fp16 DeepSpeed config anyway (it overflows: refused)")
    comm_timeout_s: float = option(1800.0, "a collective waiting longer fails (lost or hung rank)", minimum=1.0)
    cpu_threads: int | None = option(
        None,
        "CPU threads per rank (default: 1 for a backbone under 100M parameters, else the rank's share of the "
        "cores or OMP_NUM_THREADS)",
        minimum=1,
    )
    sharding: Literal["auto", "zero3", "replicate"] = option(
        "auto",
        "auto: ZeRO-3 over several ranks, the whole model and a plain step in one process (unless the DeepSpeed "
        "config offloads or is fp16); zero3: ZeRO-3 even in one process; replicate: the whole model on every rank "
        "and a plain step, the trainable gradients averaged (no ZeRO-3 gathers: faster when each rank can hold it)",
    )

    def __post_init__(self):
        if self.on_nonfinite == "skip" and self.grad_accum > 1:
            raise PipelineError(
                "on_nonfinite=skip needs grad_accum 1 (a skipped micro-batch would shift "
                "DeepSpeed's accumulation boundary): use on_nonfinite=stop"
            )
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise PipelineError(
                f"warmup_steps {self.warmup_steps} >= steps {self.steps}: the learning rate "
                "would never leave warm-up; lower warmup_steps (e.g. to steps // 10)"
            )
        if self.batch_size % self.grad_accum:
            raise PipelineError(
                f"batch_size {self.batch_size} is not divisible by grad_accum "
                f"{self.grad_accum}: choose a multiple of {self.grad_accum}"
            )


@dataclass
class DataArgs:
    """What a job trains and evaluates on (recipe section `data:`; stages set tasks and k themselves)."""

    tasks: list[str | dict] = option(
        None,
        "registered task names (several = a source mixture) or custom task mappings / YAML files",
        default_factory=list,
        cli="task",
    )
    train_file: str | None = option(None, "instead of tasks: a JSONL with source/target text columns (no evaluation)")
    data_dir: str | None = option(None, "local <task>/<split>.jsonl root (default $DEPT_DATA_DIR, else the hub)")
    k: int | None = option(None, "k-shot: train on k class-balanced rows drawn with the seed", minimum=1)
    mixture_cap: int = option(100_000, "at most this many rows per task in a mixture", minimum=1)
    max_train_rows: int | None = option(None, "cap the training rows per task (quick runs)", minimum=1)
    max_eval_rows: int | None = option(None, "cap the validation and test rows per task (quick runs)", minimum=1)
    eval_mode: Literal[EVAL_MODES] = option(
        "generate", "generate (greedy decoding, the paper's) or score (rank the label strings by likelihood)"
    )
    evaluate: bool = option(True, "validate and test (false: train only, keep the last adapter)")
    eval_batch_size: int = option(32, "rows per evaluation batch per rank", minimum=1)
    max_new_tokens: int = option(20, "greedy decoding length (the paper's 20)", minimum=1)

    def __post_init__(self):
        if self.train_file and self.tasks:
            raise PipelineError("give tasks (--task / --custom_task) or train_file, not both")
        if self.k is not None and len(self.tasks) > 1:
            raise PipelineError(
                f"k-shot sampling (k) applies to one target task, not to a mixture of {len(self.tasks)}: give one task"
            )
        if self.train_file and self.evaluate:
            self.evaluate = False  # a plain source/target file has no validation split


@dataclass
class JobConfig:
    """One training job: what `dept train` runs, and what each job of a recipe is."""

    model: str = option(MISSING, "hub name, local model directory, or random:<preset> (random:tiny-t5, ...)")
    output_dir: str = option(
        MISSING, "job directory: adapters, checkpoints, results.json (relative to the working directory)"
    )
    ds_config: str = option(
        "auto",
        "DeepSpeed config: a shipped name (zero3_cpu, zero3_gpu, zero3_gpu_bf16, ...), "
        "a JSON path, or auto (GPU config with a GPU, CPU config without)",
    )
    method: Literal[METHODS] = option(
        "dept",
        "dept | pt (vanilla prompt tuning, r = 0) | lora (PEFT's LoRA on the frozen backbone) | finetune (every "
        "backbone weight trains)",
    )
    init_adapter: str | None = option(None, "start from this adapter (ours or the authors'); its shape is the default")
    on_length_mismatch: Literal[LENGTH_POLICIES] = option(
        "error", "the init adapter's s differs from max_length: error | truncate | pad the rows of A"
    )
    save_model: bool = option(False, "finetune: save the trained backbone to <output_dir>/model")
    model_overrides: dict | None = option(None, "config fields of a random:<preset> model, e.g. {num_layers: 4}")
    dept: DeptArgs = option(default_factory=DeptArgs)
    lora: LoraArgs = option(default_factory=LoraArgs)
    train: TrainArgs = option(default_factory=TrainArgs)
    data: DataArgs = option(default_factory=DataArgs)

    def __post_init__(self):
        if self.method == "lora":
            _check_lora_job(self)
        if self.save_model and self.method != "finetune":
            raise PipelineError(
                "save_model applies to method finetune only (DePT and PT leave the backbone "
                "unchanged): remove save_model"
            )
        if self.method == "pt" and self.dept.r:
            raise PipelineError(
                f"method pt is prompt tuning without a low-rank pair: drop r={self.dept.r} (or use method dept)"
            )
        if self.method != "dept" and self.dept.budget_tokens is not None:
            raise PipelineError(f"budget_tokens applies to method dept only, not {self.method}")
        if not self.data.tasks and not self.data.train_file:
            raise PipelineError("a job needs data: --task NAME, --custom_task FILE or --train_file FILE")

    @property
    def max_length(self) -> int:
        """The tokenized input length when no DePT shape says it (finetune; the shape of a prompt method may take
        an init adapter's s: `train.resolve_shape`)."""
        return DEFAULT_S if self.dept.max_length is None else self.dept.max_length


def _check_lora_job(cfg: JobConfig) -> None:
    """DePT's flags that read like LoRA's (--lora_rank, --lora_alpha) are refused on a LoRA job rather than ignored."""
    dept = cfg.dept
    if dept.r is not None or dept.budget_tokens is not None:
        raise PipelineError(
            "method lora: --lora_rank / budget_tokens are DePT's (recipe dept.r); LoRA's rank is --lora_r "
            "(recipe lora.r) or --lora_budget_tokens"
        )
    if dept.lora_alpha != DeptArgs.lora_alpha:
        raise PipelineError(
            "method lora: --lora_alpha is DePT's offset scale (recipe dept.lora_alpha); LoRA's is --alpha (recipe lora.alpha)"
        )
    if dept.num_virtual_tokens:
        raise PipelineError(f"method lora trains no prompt: drop num_virtual_tokens={dept.num_virtual_tokens}")


# ---------------------------------------------------------------------------------------------- recipes

SECTIONS = {
    "dept": DeptArgs,
    "lora": LoraArgs,
    "train": TrainArgs,
    "data": DataArgs,
}  # a recipe's (and stage's) sections


@dataclass
class TrackingArgs:
    """MLflow tracking of a recipe (recipe section `tracking:`)."""

    enabled: bool = option(True, "log to MLflow (rank 0 only)")
    uri: str | None = option(
        None, "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else a sqlite store in the recipe's output directory)"
    )
    experiment: str | None = option(None, "MLflow experiment (default dept-<recipe name>)")


@dataclass
class StageSpec:
    """One stage of a recipe: a `train` stage (one job) or a `transfer` stage (a job per target, k, seed)."""

    name: str = option(MISSING, "unique stage name; also its output subdirectory")
    type: Literal["train", "transfer"] = option("train", "train | transfer")
    method: Literal[METHODS] | None = option(None, "default: the recipe's")
    model: str | None = option(None, "backbone (default: the recipe's); stage:<name> takes a finetune stage's model")
    tasks: list[str | dict] = option(default_factory=list, help="train: task names or custom task mappings")
    init_adapter: str | None = option(None, "train: start from this adapter (path, or stage:<name>)")
    save_model: bool = option(False, "finetune: save the trained backbone for later stages (stage:<name>)")
    source: str | None = option(None, "transfer: the stage (or adapter path) every target starts from")
    targets: list[str | dict] = option(default_factory=list, help="transfer: target tasks")
    k: list[int] = option(default_factory=lambda: [4, 16, 32], help="transfer: k-shot sizes")
    seeds: list[int] = option(default_factory=lambda: [1, 2, 3], help="transfer: seeds per (target, k)")
    control: bool = option(False, "transfer: also train from scratch at each (target, k, seed)")
    on_length_mismatch: Literal[LENGTH_POLICIES] | None = option(
        None, "the source adapter's s differs: error | truncate | pad (default: the recipe's)"
    )
    sweep: dict | None = option(
        None,
        "train: one job (trial) per setting of these keys, the best on validation kept (pipeline/sweep.py): a grid "
        "{train.lr_prompt: [0.3, 0.4], ...}, paired: {...}, or method: tpe with trials and space",
    )
    dept: dict = option(default_factory=dict, help="DeptArgs fields for this stage")
    lora: dict = option(default_factory=dict, help="LoraArgs fields for this stage (method lora)")
    train: dict = option(default_factory=dict, help="TrainArgs fields for this stage")
    data: dict = option(default_factory=dict, help="DataArgs fields for this stage")


@dataclass
class RecipeSpec:
    """A recipe file: defaults for every job, then its stages in order."""

    name: str = option(MISSING, "recipe name (MLflow parent run)")
    model: str = option(MISSING, "backbone of every stage unless a stage names its own")
    output_dir: str = option(MISSING, "where jobs write (relative to the working directory)")
    stages: list[StageSpec] = option(MISSING, "the stages, in order")
    description: str = option("", "what the recipe does (MLflow experiment description)")
    ds_config: str = option("auto", "DeepSpeed config name or path (paths relative to the recipe file)")
    method: Literal[METHODS] = option("dept", "default method of the stages")
    on_length_mismatch: Literal[LENGTH_POLICIES] = option("error", "default for the stages")
    model_overrides: dict | None = option(None, "config fields of a random:<preset> model")
    sweep: dict | str | None = option(
        None,
        "a sweep for every train stage without its own (pipeline/sweep.py): a sweep mapping, or paper: the DePT "
        "authors' grid lr_prompt {0.3, 0.4} x lr_lowrank {1e-4, 5e-4, 1e-3, 5e-3} (`dept run glue_t5_base --sweep paper`)",
    )
    compare_methods: bool = option(
        False, "also summarise the stages side by side: score against trainable parameters and step time (methods.md)"
    )
    dept: dict = option(default_factory=dict, help="DeptArgs defaults")
    lora: dict = option(default_factory=dict, help="LoraArgs defaults (method lora stages)")
    train: dict = option(default_factory=dict, help="TrainArgs defaults")
    data: dict = option(default_factory=dict, help="DataArgs defaults")
    tracking: TrackingArgs = option(default_factory=TrackingArgs)
    parallel: str = option(
        "1",
        "jobs run at once, each in its own worker process with its share of the machine: N, or auto (the cores "
        "or GPUs divided by what one job needs; `dept run --parallel N` overrides)",
    )


# ---------------------------------------------------------------------------------------------- inference


@dataclass
class EvaluateArgs:
    """`dept evaluate`: an adapter's metrics on one split of a task (made by the paper's split rules)."""

    model: str = option(MISSING, "the backbone the adapter was trained on (hub name, local dir or random:<preset>)")
    adapter: str = option(MISSING, "adapter directory (ours, or an authors' DePT adapter)")
    task: str = option(MISSING, "a registered task, or a custom task YAML file (its data_files hold the split)")
    split: Literal["train", "validation", "test"] = option("test", "train | validation | test")
    data_dir: str | None = option(None, "local <task>/<split>.jsonl root (default $DEPT_DATA_DIR, else the hub)")
    eval_mode: Literal[EVAL_MODES] = option("generate", "generate (greedy) | score (rank the labels)", cli="mode")
    batch_size: int = option(32, "rows per batch per rank", minimum=1)
    max_rows: int | None = option(None, "score only the first N rows", minimum=1)
    max_new_tokens: int = option(20, "greedy decoding length", minimum=1)
    seed: int = option(42, "seed a random:<preset> backbone is built with (the training job's seed)", minimum=0)
    ds_config: str = option("auto", "DeepSpeed config for several ranks (one process needs none)")


@dataclass
class PredictArgs:
    """`dept predict`: an adapter's predictions for the rows of a file."""

    model: str = option(MISSING, "the backbone the adapter was trained on")
    adapter: str = option(MISSING, "adapter directory")
    data: str = option(
        MISSING, "JSONL/CSV/parquet rows: a `source` column (and optional `target`, `id`), or hub-schema rows of --task"
    )
    output: str = option(MISSING, "predictions JSONL {id, prediction[, label]}; metrics go to <output>.metrics.json")
    task: str | None = option(
        None,
        "a registered task (rows in its hub schema) or a custom task YAML file (rows in its columns): rendered by "
        "the task's template and scored with its metrics",
    )
    eval_mode: Literal[EVAL_MODES] = option("generate", "generate | score (needs --task with labels)", cli="mode")
    batch_size: int = option(32, "rows per batch per rank", minimum=1)
    max_new_tokens: int = option(20, "greedy decoding length", minimum=1)
    seed: int = option(42, "seed a random:<preset> backbone is built with (the training job's seed)", minimum=0)
    ds_config: str = option("auto", "DeepSpeed config for several ranks (one process needs none)")


# ---------------------------------------------------------------------------------------------- other commands


@dataclass
class RunArgs:
    """`dept run`: every stage of a recipe; `--key=value` (or `key=value`) overrides any recipe key."""

    recipe: str = option(
        "quickstart", "a shipped recipe name (quickstart, glue_t5_base, ...) or a YAML path", positional=True
    )
    dry_run: bool = option(False, "validate, check feasibility and print the plan; train nothing")
    rerun_changed: bool = option(False, "re-run jobs whose settings changed since they ran (default: refuse)")
    join: bool = option(
        False,
        "join a run another `dept run` started in the same output folder (a shared file system, the same "
        "tracking URI): take jobs nobody runs, exit when all are done; the first launcher writes the summary",
    )


@dataclass
class SyncTrackingArgs:
    """`dept sync-tracking`: send the MLflow records a job kept while its tracking server did not answer. #21"""

    output_dir: str = option(
        MISSING, "a job's or a recipe's output folder: every tracking-pending.jsonl under it is sent", positional=True
    )
    uri: str | None = option(None, "send to this tracking URI instead of the one each record names (a moved server)")


@dataclass
class ImportAdapterArgs:
    """`dept import-adapter`: a DePT adapter released by the paper's authors into this pipeline's format."""

    src: str = option(
        MISSING, "the authors' adapter directory (adapter_config.json + adapter_model.bin)", positional=True
    )
    out: str = option(MISSING, "where to write the converted adapter", positional=True)
    allow_missing_lowrank: bool = option(False, "import a file without A/B as prompt tuning (B = 0, r kept)")


@dataclass
class ExportAdapterArgs:
    """`dept export-adapter`: a prompt tuning adapter (method pt) as a PEFT PROMPT_TUNING adapter."""

    adapter: str = option(MISSING, "an adapter written by this pipeline (or an authors' adapter)", positional=True)
    out: str = option(MISSING, "the directory to write", positional=True)
    format: Literal["peft"] = option("peft", "peft (PeftModel.from_pretrained(base_model, out))")
    base_model: str | None = option(None, "the backbone's name or directory (default: the one the adapter records)")


# ---------------------------------------------------------------------------------------------- quick tries

MAX_STEPS_ENV = "DEPT_MAX_STEPS"
MAX_EVAL_ROWS_ENV = "DEPT_MAX_EVAL_ROWS"


def _env_cap(name: str) -> int | None:
    import os

    text = os.environ.get(name, "").strip()
    if not text:
        return None
    cap = coerce(text, int, name)
    if cap < 1:
        raise PipelineError(f"{name}={text}: give a positive number or unset it")
    return cap


def capped(cfg: JobConfig) -> JobConfig:
    """`cfg` shrunk for trying commands quickly (results are not the recipe's): at most $DEPT_MAX_STEPS steps, at
    most $DEPT_MAX_EVAL_ROWS validation and test rows per task.

    Warm-up, evaluation and checkpoint cadence shrink with the steps, so the schedule keeps its shape. The capped
    values are what the job records (results.json, MLflow, fingerprint): a later uncapped run does not reuse it.
    """
    steps, rows = _env_cap(MAX_STEPS_ENV), _env_cap(MAX_EVAL_ROWS_ENV)
    if rows is not None and (cfg.data.max_eval_rows is None or cfg.data.max_eval_rows > rows):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_eval_rows=rows))
    train = cfg.train
    if steps is None or train.steps <= steps:
        return cfg
    ratio = steps / train.steps

    def scaled(value: int | None) -> int | None:
        return value if not value else max(1, int(value * ratio))

    warmup = min(scaled(train.warmup_steps), steps - 1) if train.warmup_steps else 0
    new = dataclasses.replace(
        train,
        steps=steps,
        warmup_steps=warmup,
        eval_every=scaled(train.eval_every),
        save_every=scaled(train.save_every),
        log_every=min(train.log_every, steps),
    )
    return dataclasses.replace(cfg, train=new)
