"""`dept`: the command line. Every command's flags and `--help` are derived from the typed configuration
(pipeline/config.py); `COMMANDS` is the command table, `parse` accounts for every word, and each value is parsed
once, by the options machinery (pipeline/options.py), into the command's dataclass.

    dept run quickstart                                   # a shipped recipe, one process
    dept run recipes/fewshot_small.yaml train.steps=10    # overrides: --train.steps=10 or train.steps=10
    ./launch.sh run quickstart --output_dir=runs/qs2      # every local rank (2 CPU ranks without GPUs)
    dept train --model random:tiny-t5 --task rte --output_dir runs/x --steps 50 --warmup_steps 5
    dept COMMAND --help ; dept --version

Unknown flags, stray words and bad values are refused before anything runs: one line on stderr (`error: ...`, with
a "did you mean" for near misses), exit status 2; `--debug` shows the traceback. The console shows this
pipeline's messages and other libraries' warnings; `--verbose` adds the libraries' messages and progress bars,
which a job's `job.log` always keeps (pipeline/logs.py).

python-fire dispatches the command table (`COMMANDS`): our strict `parse` runs first and accounts for every
word, and fire is handed the command with its values already bound, so it parses nothing itself (fire's own
value rules are Python literals, which differ from the YAML rules recipes use: `--init_text True` would become a
bool, `--model 123` a number), and each value is parsed exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
from pathlib import Path

import fire
import yaml

from pipeline import distributed, interrupts, logs
from pipeline._version import __version__
from pipeline.atomic import disk_full_message
from pipeline.config import (
    EvaluateArgs,
    ExportAdapterArgs,
    ImportAdapterArgs,
    JobConfig,
    PredictArgs,
    RecipeSpec,
    RunArgs,
    SyncTrackingArgs,
    capped,
)
from pipeline.errors import PipelineError
from pipeline.options import FALSE_WORDS, TRUE_WORDS, build, coerce, describe, did_you_mean, flat_fields, from_flags

CUSTOM_TASK_HELP = (
    "a custom task YAML file (or mapping): name, data_files, input_columns, label_column, metric [, template, "
    "label_words]"
)
CLI_ONLY_TRAIN = {
    "overwrite": "replace a finished job in output_dir (otherwise refused)",
    "custom_task": CUSTOM_TASK_HELP,
    "sweep": "one job per setting, the best on validation kept (README: Sweeps): paper, or a sweep mapping such as "
    '"{train.lr_prompt: [0.3, 0.4]}"; runs as a one-stage recipe in output_dir',
}
CLI_ONLY_INFERENCE = {
    "custom_task": "a custom task YAML file, as with --task FILE: its template renders the rows, its metric scores them"
}
GLOBAL_FLAGS = ("debug", "verbose", "local_rank", "help")
ALIAS_REASONS = {
    "lora_rank": " (the deepspeed launcher and torchrun own a flag named r)",
    # method lora's section behind a lora_ prefix (DePT's section has r and budget_tokens already); LoRA's alpha is
    # --alpha, DePT's offset scale --lora_alpha
    **{
        f"lora_{name}": f" of the lora section (recipe lora.{field})"
        for name, field in (
            ("r", "r"),
            ("dropout", "dropout"),
            ("targets", "target_modules"),
            ("budget_tokens", "budget_tokens"),
            ("budget_params", "budget_params"),
        )
    },
}


# ----------------------------------------------------------------------------------------------- commands


def run(recipe: str = "quickstart", **flags) -> None:
    from pipeline.runner import run_recipe

    own = {k: flags.pop(k) for k in ("dry_run", "rerun_changed", "join") if k in flags}
    args = build(RunArgs, {"recipe": recipe, **own}, "run")
    held = contextlib.nullcontext()
    if not (args.dry_run or args.join):  # --join workers share the run: each job folder is locked by its runner
        from pipeline.config import TrainArgs
        from pipeline.recipe import load_recipe

        recipe = load_recipe(args.recipe, dict(flags))
        # The process group may start here (every rank must hear rank 0's answer), and its timeout then bounds every
        # collective of the run: the recipe's, or a cut link hangs for the default 30 min instead of failing.
        timeout_s = float(recipe.spec.train.get("comm_timeout_s", TrainArgs().comm_timeout_s))
        held = holding_folder(recipe.output_dir, "dept run", timeout_s)
    with held:
        run_recipe(args.recipe, flags, dry_run=args.dry_run, rerun_changed=args.rerun_changed, join=args.join)


def train(**flags) -> None:
    from pipeline.job import run_job
    from pipeline.preflight import check_job

    overwrite = coerce(flags.pop("overwrite", False), bool, "--overwrite")
    swept = flags.pop("sweep", None)
    if "custom_task" in flags:
        if "task" in flags:
            raise PipelineError("give --task or --custom_task, not both")
        flags["task"] = [_custom_task(flags.pop("custom_task"))]
    cfg = capped(from_flags(JobConfig, flags, ""))
    if swept is not None:  # a sweep is a one-stage recipe: its trials, study and summary in output_dir (#19)
        from pipeline import atomic
        from pipeline.recipe import train_as_recipe
        from pipeline.runner import run_recipe

        raw = train_as_recipe(cfg, yaml.safe_load(swept) if isinstance(swept, str) else swept)
        path = Path(cfg.output_dir) / "sweep_recipe.yaml"
        if distributed.rank() == 0:
            atomic.write_text(path, yaml.safe_dump(raw, sort_keys=False))
        distributed.barrier()
        run_recipe(str(path), {})
        return
    check_job(cfg)
    with holding_folder(Path(cfg.output_dir), "dept train", cfg.train.comm_timeout_s):
        prepare_output_dir(cfg, overwrite)
        result = run_job(cfg)
    if distributed.rank() == 0:
        line = f"done: final loss {result['final_loss']:.4f}"
        if result.get("test"):
            line += f"; best step {result['best_step']}, test {_main_metrics(result['test'])}"
        print(f"{line}; results in {Path(cfg.output_dir) / 'results.json'}")


def evaluate(**flags) -> None:
    import json

    from pipeline.inference import evaluate_adapter

    metrics = evaluate_adapter(from_flags(EvaluateArgs, _custom_task_as_task(flags), ""))
    if distributed.rank() == 0:
        print(json.dumps(metrics, indent=2))


def predict(**flags) -> None:
    from pipeline.inference import metrics_path
    from pipeline.inference import predict as run_prediction

    args = from_flags(PredictArgs, _custom_task_as_task(flags), "")
    metrics = run_prediction(args)
    if distributed.rank() == 0:
        extra = f"; {_main_metrics(metrics)} (in {metrics_path(args.output)})" if metrics else ""
        print(f"predictions in {args.output}{extra}")


def import_adapter(src: str, out: str, **flags) -> None:
    from pipeline.interop import import_authors_adapter

    args = build(ImportAdapterArgs, {"src": src, "out": out, **flags}, "import-adapter")
    config, _, meta = import_authors_adapter(args.src, args.out, args.allow_missing_lowrank)
    note = " (A/B missing: zero offset, behaves as prompt tuning)" if meta.get("lowrank_missing") else ""
    print(
        f"imported {args.src} -> {args.out}: m={config.num_virtual_tokens}, r={config.r}, "
        f"s={config.max_length}, d={config.d_model}, backbone {meta.get('backbone') or '?'}{note}"
    )


def export_adapter(adapter: str, out: str, **flags) -> None:
    from pipeline.interop import export_peft

    args = build(ExportAdapterArgs, {"adapter": adapter, "out": out, **flags}, "export-adapter")
    written = export_peft(args.adapter, args.out, args.base_model)
    print(f"exported {args.adapter} -> {written} (PEFT PROMPT_TUNING)")


def sync_tracking(output_dir: str, **flags) -> None:
    from pipeline.tracking import PENDING_FILE, check_reachable, resolve_tracking_uri, send_pending

    args = build(SyncTrackingArgs, {"output_dir": output_dir, **flags}, "sync-tracking")
    files = sorted(Path(args.output_dir).rglob(PENDING_FILE))
    if not files:
        print(f"nothing to send: no {PENDING_FILE} under {args.output_dir}")
    client = None
    if files and args.uri:
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(args.uri, Path.cwd())
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
    for path in files:
        print(f"sent {send_pending(path, client)} record(s) from {path}")


def bench(**flags) -> None:
    from pipeline.bench import bench as run_bench

    run_bench(**flags)


def _custom_task_as_task(flags: dict) -> dict:
    """evaluate/predict: `--custom_task FILE` is `--task FILE` (a task file's template renders the rows)."""
    if "custom_task" in flags:
        if "task" in flags:
            raise PipelineError("give --task or --custom_task, not both")
        flags["task"] = flags.pop("custom_task")
    return flags


def _custom_task(value) -> dict:
    """--custom_task: a YAML file, or the mapping itself (`--custom_task "{name: pets, data_files: ...}"`)."""
    from pipeline.tasks.specs import read_task_file

    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = coerce(value, dict, "--custom_task")
    if isinstance(value, dict):
        return value
    return read_task_file(str(value))


def _main_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, float) and k != "score")


@contextlib.contextmanager
def holding_folder(out: Path, what: str, comm_timeout_s: float):
    """One `dept train` (or launching `dept run`) per output folder: rank 0 holds its lock while the command runs
    (`folder_lock`: a killed run's lock goes with it); a second launch is refused at once, on every rank alike,
    naming the process that holds it. A refused or failed start leaves no folder behind that it created. #21"""
    from pipeline import engine, folder_lock

    if distributed.world_size() > 1:
        engine.init_distributed(comm_timeout_s)  # so that every rank hears rank 0's answer
    out = Path(out)
    existed = out.exists()
    with contextlib.ExitStack() as stack:
        distributed.decided_on_rank0(
            lambda: stack.enter_context(folder_lock.hold(out, what)) and None, what="locking --output_dir"
        )
        try:
            yield
        except BaseException:
            if not existed and distributed.rank() == 0 and out.is_dir():
                if {p.name for p in out.iterdir()} <= {folder_lock.LOCK_NAME, "job.log"}:  # nothing trained yet
                    stack.close()
                    shutil.rmtree(out, ignore_errors=True)
            raise


def prepare_output_dir(cfg: JobConfig, overwrite: bool) -> None:
    """A finished job is never overwritten silently; a checkpointed one resumes only with the same settings."""
    from pipeline.fingerprint import recorded_state
    from pipeline.folder_lock import LOCK_NAME

    out = Path(cfg.output_dir)
    state, changed = recorded_state(cfg)
    if state == "finished" and not overwrite:
        raise PipelineError(
            f"{out} already holds a finished job (results.json): pass --overwrite to replace it or "
            "choose another --output_dir"
        )
    if state == "changed" and not overwrite:
        raise PipelineError(
            f"{out} holds a checkpointed job started with other settings ({', '.join(changed[:5])}): "
            "pass --overwrite to start over or choose another --output_dir"
        )
    if overwrite and out.exists() and distributed.rank() == 0:
        for entry in out.iterdir():  # all but the lock this command holds (a new lock file would be another lock)
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


# ----------------------------------------------------------------------------------------------- the flags


@dataclasses.dataclass
class Command:
    function: object
    args: type | None  # the dataclass its flags come from
    summary: str
    extra: dict = dataclasses.field(default_factory=dict)  # CLI-only flags: {name: help}
    overrides: bool = False  # accepts dotted recipe keys as --key=value / key=value


COMMANDS = {
    "run": Command(
        run,
        RunArgs,
        "every stage of a recipe (source pretraining -> few-shot transfer), tracked in MLflow",
        overrides=True,
    ),
    "train": Command(
        train, JobConfig, "one training job on a task, a custom task or a source/target file", extra=CLI_ONLY_TRAIN
    ),
    "evaluate": Command(evaluate, EvaluateArgs, "an adapter's metrics on a task's split", extra=CLI_ONLY_INFERENCE),
    "predict": Command(
        predict, PredictArgs, "an adapter's predictions for the rows of a file", extra=CLI_ONLY_INFERENCE
    ),
    "sync-tracking": Command(
        sync_tracking, SyncTrackingArgs, "send the MLflow records kept while the tracking server did not answer"
    ),
    "bench": Command(bench, None, "time and memory of DePT vs prompt tuning; ZeRO-3 scale test"),
    "import-adapter": Command(import_adapter, ImportAdapterArgs, "the DePT authors' released adapters in"),
    "export-adapter": Command(export_adapter, ExportAdapterArgs, "prompt tuning adapters out, as PEFT"),
}


def known_flags(command: Command) -> tuple[dict[str, object], list[str]]:
    """({flag: type}, [positional names]) of a command."""
    if command.args is None:  # bench: flags from its typed signature
        from pipeline.bench import bench_flags

        return bench_flags(), []
    flags, positionals = {}, []
    for flag, (_, spec, tp) in flat_fields(command.args).items():
        if spec.metadata.get("positional"):
            positionals.append(spec.name)
        else:
            flags[flag] = tp
    flags.update({name: (bool if name == "overwrite" else object) for name in command.extra})
    return flags, positionals


def parse(argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """(command, positionals, {flag: raw value}) with every word accounted for; unknown flags and stray words
    are refused before anything runs."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise SystemExit(print(overview()) or 0)
    if argv[0] in ("--version", "-V", "version"):
        raise SystemExit(print(f"dept-pipeline {__version__}") or 0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise PipelineError(
            f"unknown command {name!r}{did_you_mean(name, COMMANDS)}; commands: {', '.join(COMMANDS)} (dept --help)"
        )
    command = COMMANDS[name]
    if any(word in ("-h", "--help") for word in rest):
        raise SystemExit(print(help_text(name)) or 0)
    flags, positionals = known_flags(command)
    bools = {flag for flag, tp in flags.items() if tp is bool}
    recipe_keys = list(RecipeSpec.__dataclass_fields__) if command.overrides else []

    def check(key: str) -> None:
        if key in flags or (command.overrides and ("." in key or key in recipe_keys)):
            return  # recipe overrides are checked by the recipe loader, which names their path
        raise PipelineError(
            f"{name}: unknown flag --{key}{did_you_mean(key, list(flags) + recipe_keys)} "
            f"(dept {name} --help lists the flags)"
        )

    words, values, i = [], {}, 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--"):
            key, has_value, value = word[2:].partition("=")
            key = key.replace("-", "_") if "." not in key else key
            check(key)
            if not has_value:
                following = rest[i + 1] if i + 1 < len(rest) else None
                if key in bools and (following is None or following.lower() not in TRUE_WORDS + FALSE_WORDS):
                    value = "true"  # a bare boolean flag
                elif following is not None:
                    value, i = following, i + 1
                else:
                    raise PipelineError(f"{name}: --{key} needs a value")
            values[key] = value
        elif "=" in word and command.overrides and not word.startswith("="):  # `train.steps=10`, torchtune style
            key, _, value = word.partition("=")
            check(key)
            values[key] = value
        else:
            words.append(word)
        i += 1
    if len(words) > len(positionals):
        stray = words[len(positionals)]
        hint = " (did you mean --" + stray + "?)" if "=" in stray else ""
        raise PipelineError(
            f"{name}: unexpected word {stray!r}{hint}; dept {name} takes "
            f"{len(positionals)} positional argument(s) ({', '.join(positionals) or 'none'})"
        )
    required = [p for p in positionals if command.args.__dataclass_fields__[p].default is dataclasses.MISSING]
    if len(words) < len(required):
        missing = " ".join(p.upper() for p in required[len(words) :])
        raise PipelineError(
            f"{name}: missing {missing} (usage: dept {name} {' '.join(p.upper() for p in positionals)})"
        )
    return name, words, values


def overview() -> str:
    lines = [
        f"dept-pipeline {__version__}: Decomposed Prompt Tuning on DeepSpeed ZeRO-3",
        "",
        "usage: dept COMMAND [ARGS] [--flag value ...]   (dept COMMAND --help for its flags)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<15} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "Under several ranks: ./launch.sh COMMAND ... (the deepspeed launcher; HOSTFILE=... for nodes)."]
    return "\n".join(lines)


def help_text(name: str) -> str:
    command = COMMANDS[name]
    if command.args is None:
        from pipeline.bench import bench_help

        return bench_help()
    _, positionals = known_flags(command)
    usage = f"usage: dept {name} {' '.join(p.upper() for p in positionals)} [--flag value ...]".replace("  ", " ")
    lines = [usage, "", command.summary + ".", ""] + describe(command.args, "flags")
    if command.extra:
        lines += ["", "command-line only:"] + [f"  --{flag:<22} {text}" for flag, text in command.extra.items()]
    if command.overrides:
        from pipeline.resources import shipped_names

        lines += [
            "",
            "recipe overrides (the command line wins over the file):",
            "  --train.steps=100 / train.steps=100     every stage's steps (dept., train., data. sections)",
            "  --stages.NAME.train.steps=40            one stage's value (stages by name or index)",
            "  --output_dir=DIR --model=NAME --ds_config=NAME   any top-level recipe key",
            "",
            f"shipped recipes: {', '.join(shipped_names('recipe'))}",
        ]
    aliases = [
        f"--{flag} is {spec.name}{ALIAS_REASONS.get(flag, '')}"
        for flag, (_, spec, _) in flat_fields(command.args).items()
        if flag != spec.name and not spec.metadata.get("positional")
    ]
    if aliases:
        lines += ["", "flags named otherwise in the configuration (pipeline/config.py): " + "; ".join(aliases) + "."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    debug = "--debug" in argv
    verbose = "--verbose" in argv  # library messages and progress bars on the console too (always in the logs)
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    world = distributed.world_size()
    who = f" (rank {distributed.rank()})" if world > 1 else ""
    try:
        name, positionals, values = parse(argv)
        logs.setup(distributed.rank(), verbose)
        # Raw strings: the command's dataclass parses each (options.py); recipe overrides are parsed by the recipe
        # loader (yaml.safe_load), which names their path.
        bound = functools.partial(COMMANDS[name].function, *positionals, **values)
        with interrupts.handled():  # SIGTERM/SIGINT: stop at a step boundary with a checkpoint (interrupts.py)
            fire.Fire({name: bound}, command=[name], name="dept")
    except SystemExit as stop:
        return int(stop.code or 0)
    except interrupts.Interrupted as stop:
        if debug:
            raise
        if distributed.local_rank() == 0:  # one line per node: every rank stopped at the same step
            print(stop, file=sys.stderr, flush=True)
        return stop.exit_status
    except BrokenPipeError:  # `dept train --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PipelineError as err:
        if debug:
            raise
        print(f"error{who}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        message = disk_full_message(err)
        if message is None or debug:
            raise
        print(f"error{who}: {message}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a peer rank died or hangs: gloo/NCCL errors and collective timeouts
        text = str(err)
        if (
            debug
            or world == 1
            or not any(
                w in text.lower()
                for w in ("timeout", "timed out", "closed by peer", "connection reset", "nccl", "gloo")
            )
        ):
            raise
        lost = distributed.name_lost_peers(err)  # checks in with the rendezvous store: a few seconds at most
        print(
            f"error{who}: lost contact with {lost} ({text.splitlines()[0][:160]}); that rank's own log names the "
            "cause; re-run the same command to resume from the last checkpoint, or raise comm_timeout_s if steps "
            "are just slow",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
