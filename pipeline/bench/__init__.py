"""`dept bench`: what DePT's shorter prompt buys in step time, memory and inference, measured on the real step.

Two modes:

  compare (default)  one backbone geometry; PT with `l` tokens and DePT at the same budget for every m in `ms`
                     (r from `rank_for_budget`), each through the real training step (DePTPrompt + backbone +
                     DeepSpeed ZeRO-3 engine: forward, backward, optimizer step), next to reference rows:
                       bare    the backbone alone on an input of the same total length (L + m): the floor for any
                               prompt method, run through the same engine (one trainable vector [d] added to every
                               input embedding so that the backward pass reaches the input, as a prompt's does);
                       eager   the bare backbone and our PT module without DeepSpeed (plain PyTorch loop);
                       peft    PEFT's PromptTuning with `l` tokens, num_transformer_submodules=1 (encoder only:
                               PEFT's seq2seq default also prompts the decoder, which doubles the budget), without
                               DeepSpeed, on a copy of the same backbone weights and the same batches;
                       padded  PT with `l` tokens with every input padded to s (the authors' setting), when the main
                               rows use dynamic padding on real lengths.
  scale              a LLaMA-architecture backbone of a chosen size built directly sharded under ZeRO-3 over the
                     launched ranks; a few DePT steps; per-rank bytes held, peak memory, load time, step time and
                     the RAM headroom left.

Honest timing on a noisy machine: every configuration runs inside one process on one set of weights, and the
steps are interleaved round-robin (round i runs one step of every configuration, starting at a rotating position)
so that a slow spell of the machine hits all configurations alike; each round uses the next batch of the
epoch order, the same batch for every configuration. Medians are reported with min-max, and ratios are computed
per round from steps taken side by side (then the median of those paired ratios).

Modules: settings (flags, presets, defaults), compare (the compare run), compare_report (its table, targets, notes,
plot), scale (the scale run and its report), measure (timing and memory helpers), output (files, formatting,
MLflow). They import only the standard library at import time (the CLI imports this package for `--help`); torch,
DeepSpeed, PEFT, matplotlib and MLflow are imported when the command runs.
"""

from __future__ import annotations

import logging
import os

from pipeline.bench.compare import run_compare
from pipeline.bench.scale import run_scale
from pipeline.bench.settings import model_overrides, resolve_settings


def bench(
    preset: str = "",
    mode: str | None = None,
    model: str | None = None,
    ms: str | int | list | tuple | None = None,
    pt_tokens: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    lengths: str | None = None,
    refs: str | list | tuple | None = None,
    infer_tokens: int | None = None,
    infer_repeats: int | None = None,
    group_by_length: bool = False,
    memory_profile: bool = True,
    tokenizer: str | None = None,
    data_dir: str = "",
    hidden: int | None = None,
    layers: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    overrides: dict | str | None = None,
    output_dir: str = "bench_out",
    ds_config: str | None = None,
    lr_prompt: float = 0.3,
    lr_lowrank: float = 1e-4,
    mlflow_uri: str = "",
    experiment: str = "dept-bench",
    seed: int = 42,
) -> None:
    """Benchmark DePT against prompt tuning at equal budget (compare), or find the largest backbone that fits (scale).

    Writes bench.md (Markdown table + notes), bench.json (every number, per-step times included) and bench.png
    (time and memory vs m; memory over time in scale mode) to OUTPUT_DIR, prints the table, and logs all of it to
    MLflow when --mlflow_uri is given (pipeline.tracking.Tracker; one run per invocation). Explicit flags override
    the preset's values. Under ./launch.sh every rank runs the command; rank 0 writes.

    Args:
        preset: paper (T5-base geometry, l=100, s=256, padded, batch 32, m in 0..100), paper-rte and paper-boolq
            (the same with dynamic padding on real lengths), paper-t5-small, paper-t5-large, scale-dev (LLaMA,
            hidden 256, 4 layers), scale-llama-1b, scale-llama-3b, scale-llama-7b. Empty for the mode's defaults.
        mode: compare (default) or scale.
        model: random:t5-base (compare default), random:t5-small, random:t5-large, random:llama-7b (scale default),
            random:tiny-t5 or another backbone preset, built from its config with random weights; or a local model
            directory.
        ms: prompt lengths m to run, comma-separated (default 0,20,40,60,80,100; scale mode uses the first, 60).
            Each gets r = rank_for_budget(l, m, s, d); m = l is vanilla PT (r = 0).
        pt_tokens: l, the vanilla prompt length that sets the budget (default 100). Named pt_tokens, not l, since
            the deepspeed launcher would take --l for its own --launcher.
        max_length: s, the longest input and the rows of A (default 256 compare, 64 scale).
        batch_size: global batch over all ranks (default 8 compare, 1 per rank in scale mode, 32 in the
            paper presets).
        grad_accum: micro-batches per step and rank; a step = grad_accum forward/backward passes, then one optimizer
            step (default 1; the paper presets use 4, t5-large 8, so that batch 32 fits in 24 GB of RAM).
        steps: timed steps (rounds) per configuration (default 5 compare, 3 scale).
        warmup: untimed rounds before them (default 1).
        lengths: padded (every input padded to s, the paper's setting), rte or boolq (dynamic padding to the longest
            input of each batch, on the shipped task rendered by the task registry and tokenized; batches follow
            the epoch order, and an epoch-time estimate is reported).
        refs: reference rows, comma-separated from bare,eager,peft,padded (default all of them; none for none).
        infer_tokens: inference = one evaluation batch with this many greedy tokens generated (min = max, so every
            configuration generates the same number); 0 = one eval-mode forward pass instead (default 2).
        infer_repeats: inference timings per configuration, interleaved (default 3; 0 skips inference).
        group_by_length: batch rows of similar length together (the epoch order of `dept train --group_by_length`:
            chunks of 50 batches sorted by length, batches shuffled), so that dynamic padding wastes little.
        memory_profile: take one extra untimed step per configuration to measure the peak of its tensors (on CPU
            from the torch.profiler memory events, on GPU from the allocator's peak). Default on.
        tokenizer: tokenizer whose token counts set the lengths (hub name or local directory; its token ids are
            folded into the backbone's vocabulary), or data-32k: a 32k-piece SentencePiece (T5's size) trained on
            the task data in --data_dir, which the paper-rte/paper-boolq presets use. Default the backbone's own;
            the random presets ship a 1,000-piece test tokenizer, which cuts English about 3x finer than T5's.
        data_dir: folder with <task>/<split>.jsonl (default $DEPT_DATA_DIR, else ../shared/data next to the repo).
        hidden: backbone width override (LLaMA hidden_size, T5 d_model); heads follow at 128 (LLaMA) or 64 (T5)
            per head unless --heads is given.
        layers: layer count override (LLaMA num_hidden_layers; T5 encoder and decoder layers).
        intermediate: feed-forward width override (LLaMA intermediate_size, T5 d_ff).
        heads: attention heads override (LLaMA also sets num_key_value_heads).
        overrides: any other config fields, as a dict or JSON such as '{"num_key_value_heads": 8}'.
        output_dir: where bench.md, bench.json and bench.png go (default bench_out).
        ds_config: DeepSpeed JSON (default ds_configs/zero3_cpu.json in compare mode, zero3_cpu_bf16.json in scale).
        lr_prompt: learning rate of the prompts (0.3). Timing does not depend on it.
        lr_lowrank: learning rate of A and B (1e-4).
        mlflow_uri: MLflow tracking URI such as sqlite:///mlflow.db; empty for no tracking.
        experiment: MLflow experiment name (default dept-bench).
        seed: seed of the random backbone, the prompts and the batch order (default 42).
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # torch.profiler's per-start/stop lines on stderr
    explicit = dict(mode=mode, model=model, ms=ms, pt_tokens=pt_tokens, max_length=max_length,
                    batch_size=batch_size, grad_accum=grad_accum, steps=steps, warmup=warmup, lengths=lengths,
                    refs=refs,
                    infer_tokens=infer_tokens, infer_repeats=infer_repeats, ds_config=ds_config, hidden=hidden,
                    layers=layers, intermediate=intermediate, heads=heads, tokenizer=tokenizer)
    settings = resolve_settings(preset, explicit)
    settings.update(memory_profile=bool(memory_profile), group_by_length=bool(group_by_length), data_dir=data_dir,
                    output_dir=output_dir, lr_prompt=float(lr_prompt), lr_lowrank=float(lr_lowrank),
                    mlflow_uri=mlflow_uri, experiment=experiment, seed=int(seed), preset=preset)
    settings["overrides"] = model_overrides(settings, overrides)
    _quiet_libraries()
    if settings["mode"] == "scale":
        run_scale(settings)
    else:
        run_compare(settings)



def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "peft", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
