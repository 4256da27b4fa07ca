"""The compare mode's report: table rows, the paired ratios that answer the bench's questions, notes, Markdown and
the plot. It measures and reports; the thresholds an issue set for these ratios live in docs/bench.md (#23)."""
# ruff: noqa: E741  (`l` is the paper's name for the vanilla prompt length, as in every label of the table)

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.bench.measure import paired, summary
from pipeline.bench.output import fmt, fmt_ratio, settings_record
from pipeline.bench.settings import CompareArgs
from pipeline.resources import ds_config_path

if TYPE_CHECKING:
    from pipeline.bench.compare import Bench
    from pipeline.bench.variants import Variant

COLUMNS = [
    "config",
    "harness",
    "m",
    "r",
    "trainable",
    "enc_tokens",
    "step_s",
    "step_range_s",
    "tokens_per_s",
    "x_pt",
    "x_bare_same_len",
    "step_tensor_peak_mb",
    "rss_peak_mb",
    "infer_s",
    "epoch_s",
]
HEADERS = {
    "config": "configuration",
    "harness": "harness",
    "m": "m",
    "r": "r",
    "trainable": "trainable params",
    "enc_tokens": "input tokens (m + L)",
    "step_s": "step s (median)",
    "step_range_s": "step s (min .. max)",
    "tokens_per_s": "tokens/s",
    "x_pt": "time / PT l",
    "x_bare_same_len": "time / bare same length",
    "step_tensor_peak_mb": "step tensor peak MB",
    "rss_peak_mb": "RSS peak MB",
    "infer_s": "inference s (median)",
    "epoch_s": "epoch est. s",
}


def compare_report(bench: Bench, per_rank: list[dict], total_ram: int, cpu: bool) -> dict:
    """Everything measured: the table rows and the paired ratios."""
    args, variants = bench.args, bench.variants
    merge_ranks(variants, per_rank)
    refs = References.find(args, variants)
    table = [table_row(v, refs, bench.length_info["batches_per_epoch"]) for v in variants]
    return {
        "mode": "compare",
        "settings": settings_record(args),
        "world_size": bench.world,
        "d_model": bench.d_model,
        "dtype": bench.dtype,
        "device": "cpu" if cpu else "accelerator",
        "load_s": bench.load_s,
        "lengths": bench.length_info,
        "rows": table,
        "ratios": compare_ratios(args, variants, refs),
        "total_ram_mb": total_ram / 2**20,
        "ranks": [
            {"rank": r["rank"], "ru_maxrss_mb": r["ru_maxrss_mb"], "min_available_mb": r["min_available_mb"]}
            for r in per_rank
        ],
        "notes": compare_notes(args, bench.length_info, bench.world, cpu, bench.is_encoder_decoder),
    }


def merge_ranks(variants: list[Variant], per_rank: list[dict]) -> None:
    """Every rank's numbers into the variants: a step ends when the slowest rank ends (max over ranks per step),
    peaks are the highest rank's, real tokens add up."""
    for v in variants:
        v.times = [max(r["times"][v.key][i] for r in per_rank) for i in range(len(v.times))]
        v.infer = [max(r["infer"][v.key][i] for r in per_rank) for i in range(len(v.infer))]
        peaks = [r["step_peak"][v.key] for r in per_rank if r["step_peak"][v.key] is not None]
        v.step_peak_mb = max(peaks) if peaks else None
        v.rss_peak_mb = max(r["rss_peak"][v.key] for r in per_rank)
        v.real_tokens = [sum(r["real"][v.key][i] for r in per_rank) for i in range(len(v.real_tokens))]


@dataclass
class References:
    """The rows others are compared with: PT l through the engine, bare at each length, the no-engine rows."""

    l: int
    pt: Variant | None
    bare: dict[int, Variant]
    eager_pt: Variant | None
    eager_bare: Variant | None
    peft: Variant | None

    @classmethod
    def find(cls, args: CompareArgs, variants: list[Variant]) -> References:
        by_key = {v.key: v for v in variants}
        l = args.pt_tokens
        pad_main = args.max_length if args.lengths == "padded" else None
        pt = next(
            (v for v in variants if v.harness == "engine" and v.m == l and v.r == 0 and v.pad_to == pad_main), None
        )
        bare = {v.m: v for v in variants if v.kind == "bare" and v.harness == "engine"}
        return cls(
            l, pt, bare, by_key.get(f"eager_pt_l{l}"), by_key.get(f"eager_bare_p{l}"), by_key.get(f"peft_pt_l{l}")
        )

    def time_base(self, v: Variant) -> Variant | None:
        """What `time / PT l` divides by: PT l (or bare L+l for bare rows), on the row's own harness."""
        if v.harness == "eager":
            return self.eager_pt if v.kind != "bare" else self.eager_bare
        return self.bare.get(self.l) if v.kind == "bare" else self.pt

    def same_length_bare(self, v: Variant) -> Variant | None:
        """The bare backbone at the row's total input length, on the row's own harness."""
        return self.eager_bare if v.harness == "eager" and v.kind != "bare" else self.bare.get(v.m)


def table_row(v: Variant, refs: References, batches_per_epoch: int) -> dict:
    step = summary(v.times)
    base = refs.time_base(v)
    x_pt = paired(v.times, base.times) if base not in (None, v) else None
    same = refs.same_length_bare(v)
    x_bare = paired(v.times, same.times) if same is not None and same is not v and v.kind != "bare" else None
    inference = summary(v.infer)
    return {
        "key": v.key,
        "config": v.label,
        "harness": "DeepSpeed ZeRO-3" if v.harness == "engine" else "plain PyTorch",
        "kind": v.kind,
        "m": v.m,
        "r": v.r,
        "trainable": v.trainable,
        "pad_to": v.pad_to,
        "enc_tokens": statistics.fmean(v.enc_tokens) if v.enc_tokens else None,
        "step_s": step["median"],
        "step_min_s": step["min"],
        "step_max_s": step["max"],
        "step_mean_s": step["mean"],
        "tokens_per_s": statistics.fmean(v.real_tokens) / step["median"] if v.times and step["median"] else None,
        "x_pt": x_pt,
        "x_bare_same_len": x_bare,
        "step_tensor_peak_mb": v.step_peak_mb,
        "rss_peak_mb": v.rss_peak_mb,
        "alloc_peak_mb": v.alloc_peak_mb,
        "infer_s": inference["median"],
        "infer_range_s": [inference["min"], inference["max"]],
        "epoch_s": step["mean"] * batches_per_epoch if step["mean"] else None,
        "times_s": v.times,
        "infer_times_s": v.infer,
        "losses": v.losses,
        "loss_finite": all(math.isfinite(x) for x in v.losses),
    }


class Ratios(list):
    """The bench's questions, one row each: `value` = median of the ratios of steps taken in the same round (with
    min and max over rounds). `key` names the MLflow metric. No thresholds: docs/bench.md quotes them."""

    def add(self, key: str, name: str, value: dict | None, note: str = "") -> None:
        self.append({"key": key, "name": name, "value": value, "note": note})


def compare_ratios(args: CompareArgs, variants: list[Variant], refs: References) -> list[dict]:
    # The paper's two settings at l = 100 (m = 60, r = 30 and m = 40, r = 45); scaled with l otherwise.
    l = args.pt_tokens
    m60, m40 = round(0.6 * l), round(0.4 * l)
    pad_main = refs.pt.pad_to if refs.pt else None
    dept_at = {v.m: v for v in variants if v.harness == "engine" and v.kind == "dept" and v.pad_to == pad_main}
    out = Ratios()
    for m in (m60, m40):
        if dept_at.get(m) is not None and refs.pt is not None and dept_at[m] is not refs.pt:
            budget_ratios(out, dept_at[m], refs)
    for v in (refs.pt, dept_at.get(m60), dept_at.get(m40)):
        if v is not None and v.m in refs.bare and v.kind == "dept":
            overhead = summary([100 * (a / b - 1) for a, b in zip(v.times, refs.bare[v.m].times) if b])
            out.add(
                f"overhead.{v.key}_pct",
                f"pipeline overhead: {v.label} vs bare backbone at the same length (%)",
                overhead,
                "both through the same DeepSpeed engine, so this is the DePT module and its optimizer step",
            )
    harness_ratios(out, refs)
    padded = next((v for v in variants if v.key == f"pt_l{l}_pad{args.max_length}"), None)
    if padded is not None and dept_at.get(m60) is not None:
        epoch_ratio(out, args, dept_at[m60], padded)
    return out


def budget_ratios(out: Ratios, dept: Variant, refs: References) -> None:
    """DePT m vs PT l: step time, the bare backbone's floor for that ratio and the gap to it, memory."""
    m, l, pt, bare = dept.m, refs.l, refs.pt, refs.bare
    ratio = paired(dept.times, pt.times)
    out.add(
        f"time.dept_m{m}_over_pt",
        f"step time DePT m={m} r={dept.r} / PT l={l}",
        ratio,
    )
    if m in bare and l in bare:
        floor = paired(bare[m].times, bare[l].times)
        out.add(
            f"time.bare_p{m}_over_bare_p{l}",
            f"bare backbone, input L+{m} / L+{l} (the floor for the ratio above)",
            floor,
            "what the shorter input alone saves",
        )
        gap = summary(
            [100 * (a / b - c / e) for a, b, c, e in zip(dept.times, pt.times, bare[m].times, bare[l].times) if b and e]
        )
        out.add(
            f"gap.dept_m{m}_minus_bare_points",
            f"DePT m={m} ratio minus bare ratio (points)",
            gap,
        )
    if dept.step_peak_mb and pt.step_peak_mb:
        memory = {"median": dept.step_peak_mb / pt.step_peak_mb, "min": None, "max": None, "n": 1}
        out.add(
            f"memory.dept_m{m}_over_pt",
            f"step tensor peak DePT m={m} / PT l={l}",
            memory,
            "one profiled step each",
        )


def harness_ratios(out: Ratios, refs: References) -> None:
    """Our PT vs PEFT's (like for like, no engine), and what the engine costs."""
    l = refs.l
    if refs.eager_pt is not None and refs.peft is not None:
        ratio = summary([100 * (a / b - 1) for a, b in zip(refs.eager_pt.times, refs.peft.times) if b])
        out.add(
            "peft.our_pt_vs_peft_pct",
            f"our PT l={l} vs PEFT PT l={l}, both without engine (%)",
            ratio,
            "PEFT with num_transformer_submodules=1",
        )
    if refs.pt is not None and refs.peft is not None:
        out.add(
            "peft.our_pt_engine_over_peft",
            f"our PT l={l} through DeepSpeed ZeRO-3 / PEFT PT l={l} in a plain loop",
            paired(refs.pt.times, refs.peft.times),
            "what a user sees, engine cost included",
        )
    if refs.bare.get(l) is not None and refs.eager_bare is not None:
        out.add(
            "engine.bare_engine_over_plain",
            f"ZeRO-3 engine cost: bare L+{l} through the engine / without",
            paired(refs.bare[l].times, refs.eager_bare.times),
        )


def epoch_ratio(out: Ratios, args: CompareArgs, dept: Variant, padded: Variant) -> None:
    """DePT with dynamic padding vs PT padded to s, over the same sampled batches of the epoch order."""
    per_round = paired(dept.times, padded.times)
    ratio = {
        "median": sum(dept.times) / sum(padded.times),
        "min": per_round["min"],
        "max": per_round["max"],
        "n": len(dept.times),
    }
    out.add(
        f"epoch.dept_m{dept.m}_dynamic_over_pt_padded",
        f"epoch time DePT m={dept.m} ({args.lengths} lengths, "
        f"dynamic padding) / PT l={args.pt_tokens} padded to s={args.max_length}",
        ratio,
        "sum over the same sampled batches of the epoch order; [min .. max] per batch",
    )


def compare_notes(args: CompareArgs, info: dict, world: int, cpu: bool, is_encoder_decoder: bool) -> list[str]:
    """How each number was made, for the Markdown's notes."""
    s, l = args.max_length, args.pt_tokens
    overrides = f" and overrides {json.dumps(args.overrides)}" if args.overrides else ""
    padding = "every input padded to s" if args.lengths == "padded" else "each batch padded to its longest input"
    if args.group_by_length:
        padding += ", batches of similar lengths (--group_by_length, as `dept train --group_by_length`)"
    rows_per_eval = args.batch_size // (world * args.grad_accum)
    notes = [
        f"Backbone {args.model} with random weights{overrides}; "
        f"l={l}, s={s}, global batch {args.batch_size} over {world} rank(s) x {args.grad_accum} "
        f"micro-batch(es) per step; DeepSpeed config "
        f"{ds_config_path(args.ds_config).name}.",
        f"Lengths: {args.lengths} ({padding}); "
        f"data {info['source']}; tokenizer {info['tokenizer']}: median {info['median']}, p90 {info['p90']}, max "
        f"{info['max']} tokens, {100 * info['at_s_fraction']:.0f}% at s (truncated); {info['batches_per_epoch']} "
        "batches per epoch.",
        f"Timing: {args.warmup} warm-up + {args.steps} timed rounds; each round runs one step of every "
        "configuration (round-robin, starting position rotating) on the same batch, the next batch of the epoch "
        "order. step s = forward + backward + optimizer step, median over rounds (min-max beside it); with several "
        "ranks a step's time is that of the slowest rank. Ratios (time / PT l, time / bare, paired ratios) are medians of "
        "ratios taken within each round, i.e. of steps run side by side.",
        "Rows through DeepSpeed ZeRO-3 share one engine over one sharded backbone (all prompt modules in one "
        "module tree), so the optimizer step covers every configuration's few trainable tensors (< 0.1% of a "
        "step at T5-base size) and ZeRO-3's prefetch trace is rebuilt when the module order changes between "
        "rounds; the bare rows pay both the same way, so the pipeline-overhead ratio isolates the DePT module.",
        "bare = the backbone alone, fed an input of the same total length (m extra tokens in place of the prompt) "
        "with one trainable [d] vector added to the input embeddings, so that its backward pass also reaches "
        "the input: the floor for any prompt method. Engine bare rows give the pipeline overhead (same engine); "
        "the no-engine rows (bare, our PT module, PEFT) run a plain PyTorch loop (AdamW) on a copy of the same "
        "weights and the same batches: our PT vs PEFT is compared there, like for like.",
        f"LoRA = PEFT's LoRA (method lora) on the same engine and backbone, at the rank that spends the budget of "
        f"l={l} prompt tokens (PEFT's target modules for the architecture); its input is L tokens (no prompt), and "
        "its pairs are switched off while the other rows run.",
        f"PEFT PromptTuning uses num_transformer_submodules=1: prompts on the encoder only, {l} x d parameters. PEFT's "
        "seq2seq default (2) also prompts the decoder, i.e. twice the parameters and not the same budget."
        if is_encoder_decoder
        else "PEFT PromptTuning (CAUSAL_LM) with l tokens.",
        "tokens/s = real (non-pad) source tokens of the global batch (mean over rounds) / median step time.",
        (
            "Memory: 'step tensor peak MB' = the highest amount of CPU tensor memory one training step held above "
            "what was live when it started (torch.profiler memory events: allocations minus frees, in order; "
            "activations, gathered ZeRO-3 parameters, gradients, optimizer temporaries), from one extra untimed step; "
            "'RSS peak MB' = the process's resident memory, sampled every 10 ms while that configuration ran "
            "(process-wide: the model, the plain copy, and pages the allocator keeps after earlier configurations, so "
            "it differs little between rows). Max over ranks."
            if cpu
            else "Memory: 'step tensor peak MB' = the accelerator allocator's max_memory_allocated during one extra step "
            "minus memory_allocated before it; 'RSS peak MB' = host resident memory while the configuration ran."
        ),
        (
            f"Inference = one evaluation batch (this rank's {rows_per_eval} rows), "
            + (
                f"exactly {args.infer_tokens} greedy tokens generated (min_new_tokens = max_new_tokens)"
                if args.infer_tokens
                else "one eval-mode forward pass with the targets"
            )
            + f", median of {args.infer_repeats} interleaved repeats."
        ),
        "epoch est. s = mean step time over the sampled batches x batches per epoch.",
    ]
    if not args.tokenizer and args.model.startswith("random:") and args.lengths != "padded":
        notes.append(
            "The random: presets' 1,000-piece test tokenizer makes English text about 3x longer than T5's "
            "32k SentencePiece; pass --tokenizer (a T5 tokenizer directory) for T5's real lengths."
        )
    return notes


def compare_markdown(result: dict) -> str:
    st = result["settings"]
    lines = [
        f"# dept bench: {st['model']}, l={st['pt_tokens']}, s={st['max_length']}, "
        f"lengths={st['lengths']}, batch {st['batch_size']}, {result['world_size']} rank(s), {result['dtype']}",
        "",
        "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in result["rows"]:
        cells = []
        for c in COLUMNS:
            if c == "step_range_s":
                cells.append(f"{fmt(row['step_min_s'])} .. {fmt(row['step_max_s'])}")
            elif c in ("x_pt", "x_bare_same_len"):
                cells.append(fmt_ratio(row[c]))
            elif c == "enc_tokens":
                cells.append(fmt(row[c], 4))
            else:
                cells.append(fmt(row[c]) if not isinstance(row[c], str) else row[c])
        lines.append("| " + " | ".join(cells) + " |")
    if result["ratios"]:
        lines += ["", "## Paired ratios", "", "| question | value: median [min .. max] |", "|---|---|"]
        for t in result["ratios"]:
            lines.append(f"| {t['name']} | {fmt_ratio(t['value'])} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    pad_main = result["settings"]["max_length"] if result["settings"]["lengths"] == "padded" else None
    main = [r for r in rows if r["kind"] == "dept" and r["harness"].startswith("DeepSpeed") and r["pad_to"] == pad_main]
    bare = [r for r in rows if r["kind"] == "bare" and r["harness"].startswith("DeepSpeed")]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for series, label, style in ((main, "DePT / PT (engine)", "o-"), (bare, "bare backbone, input L+m", "s--")):
        series = sorted(series, key=lambda r: r["m"])
        if not series:
            continue
        xs = [r["m"] for r in series]
        med = [r["step_s"] for r in series]
        err = [[r["step_s"] - r["step_min_s"] for r in series], [r["step_max_s"] - r["step_s"] for r in series]]
        ax_t.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)
        peaks = [r["step_tensor_peak_mb"] for r in series]
        if all(p is not None for p in peaks):
            ax_m.plot(xs, peaks, style, label=f"{label}: step tensor peak")
    refs = [
        r
        for r in rows
        if r["harness"].startswith("plain") or r["kind"] == "lora" or (r["kind"] == "dept" and r not in main)
    ]
    for i, r in enumerate(refs):  # rows without an m axis: horizontal lines, labels staggered so they don't overlap
        ax_t.axhline(r["step_s"], linestyle=":", linewidth=1, color="grey")
        ax_t.text(
            0.01 + 0.33 * (i % 3),
            r["step_s"],
            r["config"],
            transform=ax_t.get_yaxis_transform(),
            fontsize=6.5,
            color="dimgrey",
            va="bottom",
        )
    rss = sorted(main, key=lambda r: r["m"])
    if rss:
        ax_r = ax_m.twinx()
        ax_r.plot(
            [r["m"] for r in rss],
            [r["rss_peak_mb"] for r in rss],
            "^:",
            color="tab:green",
            label="RSS peak, process (right axis)",
        )
        ax_r.set_ylabel("RSS MB")
        ax_r.set_ylim(0, 1.5 * max(r["rss_peak_mb"] or 0 for r in rss) + 1)  # below the legends
        ax_r.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax_r.legend(fontsize=7, loc="lower right")
    st = result["settings"]
    ax_t.set(
        xlabel=f"m (prompt length; r from the budget of l={st['pt_tokens']})",
        ylabel="step time, s (median, min-max)",
        title=f"{st['model']}, lengths={st['lengths']}, batch {st['batch_size']}",
    )
    ax_m.set(xlabel="m", ylabel="step tensor peak MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
