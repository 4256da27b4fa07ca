"""`dept`: the command line, straight from typed function signatures (python-fire).

    dept train --model random:tiny-t5 --train_file data.jsonl --output_dir runs/x     # one process
    ./launch.sh train --model random:tiny-t5 --train_file data.jsonl --output_dir runs/x   # all local ranks
    dept COMMAND --help

Bad input ends with one line on stderr (`error: ...`) and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_DS_CONFIG = str(Path(__file__).resolve().parent.parent / "ds_configs" / "zero3_cpu.json")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _refuse_finished_run(output_dir: str, overwrite: bool) -> None:
    """A finished run is never overwritten silently; an unfinished one resumes from its checkpoint."""
    results = Path(output_dir) / "results.json"
    if results.exists() and not overwrite:
        raise PipelineError(f"{output_dir} already holds a finished run (results.json): pass --overwrite to "
                            "replace it or choose another --output_dir")
    if results.exists() and overwrite and int(os.environ.get("RANK", "0")) == 0:
        import shutil

        shutil.rmtree(output_dir)


def train(
    model: str,
    output_dir: str,
    train_file: str = "",
    ds_config: str = DEFAULT_DS_CONFIG,
    method: str = "dept",
    num_virtual_tokens: int = 60,
    r: int = 30,
    max_length: int = 256,
    lr_prompt: float = 0.3,
    lr_lowrank: float = 1e-4,
    lr: float = 1e-4,
    batch_size: int = 32,
    grad_accum: int = 1,
    steps: int = 1000,
    warmup_steps: int = 500,
    seed: int = 42,
    save_every: int = 0,
    log_every: int = 10,
    prompt_init: str = "TEXT",
    init_adapter: str = "",
    pad_to_max_length: bool = False,
    model_overrides: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Train DePT (or `pt`, or `finetune`) on a JSONL file with `source`/`target` text columns.

    Args:
        model: hub name, local model directory, or random:<preset> (random:tiny-t5, random:tiny-llama, ...).
        output_dir: run directory; an unfinished run there resumes from its last checkpoint.
        train_file: JSONL with source/target columns.
        ds_config: DeepSpeed JSON (ds_configs/zero3_cpu.json on CPU, zero3_gpu_bf16.json on GPUs).
        method: dept | pt | finetune.
        num_virtual_tokens: m, the prompt length; r: rank of the offset; max_length: s, the longest input in tokens.
        lr_prompt: learning rate of the prompt; lr_lowrank: of A and B; lr: of the backbone (finetune).
        batch_size: global batch over all ranks and accumulation steps.
    """
    from pipeline.data import read_source_target
    from pipeline.train import TrainConfig, train as run_training

    if not train_file:
        raise PipelineError("train needs --train_file (a JSONL file with source/target columns)")
    _refuse_finished_run(output_dir, overwrite)
    cfg = TrainConfig(model=model, output_dir=output_dir, ds_config=ds_config, method=method,
                      num_virtual_tokens=num_virtual_tokens, r=r, max_length=max_length, lr_prompt=lr_prompt, lr_lowrank=lr_lowrank,
                      lr=lr, batch_size=batch_size, grad_accum=grad_accum, steps=steps, warmup_steps=warmup_steps,
                      seed=seed, save_every=save_every, log_every=log_every, prompt_init=prompt_init,
                      init_adapter=init_adapter or None, pad_to_max_length=pad_to_max_length,
                      model_overrides=model_overrides)
    rows = read_source_target(train_file)
    result = run_training(cfg, rows)["results"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: final loss {result['final_loss']:.4f}; adapter in {Path(output_dir) / 'adapter'}")


COMMANDS = {"train": train}


def main(argv: list[str] | None = None) -> int:
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _setup_logging()
    try:
        fire.Fire(COMMANDS, command=argv, name="dept")
    except PipelineError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
