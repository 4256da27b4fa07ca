"""The configurations of a compare table: DePT/PT at equal budget for every m, then the reference rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.bench.settings import CompareArgs
from pipeline.dept import count_trainable, rank_for_budget
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.bench")


@dataclass
class Variant:
    """One configuration of the table and what was measured on it."""

    key: str  # slug: json / MLflow key
    label: str  # table label
    kind: str  # dept | bare | peft
    harness: str  # engine | eager (a plain PyTorch loop)
    m: int = 0  # prompt length (bare: extra input tokens)
    r: int = 0
    trainable: int = 0
    pad_to: int | None = None
    module: str = ""  # prompt module name inside its loop
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    enc_tokens: list = field(default_factory=list)
    real_tokens: list = field(default_factory=list)
    infer: list = field(default_factory=list)
    step_peak_mb: float | None = None
    alloc_peak_mb: float | None = None
    rss_peak_mb: float | None = None

    @property
    def loop(self) -> str:
        """The loop that runs it: engine, eager (our modules, plain PyTorch) or peft (PEFT's model)."""
        return "peft" if self.kind == "peft" else self.harness

    def record(self, seconds: float, loss: float, real_tokens: int, width: float) -> None:
        """One timed step."""
        self.times.append(seconds)
        self.losses.append(loss)
        self.real_tokens.append(real_tokens)
        self.enc_tokens.append(width)


def plan_variants(args: CompareArgs, d_model: int) -> list[Variant]:
    """DePT/PT rows at the budget of l for every m, then the reference rows asked for in --refs."""
    rows = [budget_variant(args, m, d_model) for m in args.ms]
    return rows + reference_variants(args, rows, d_model)


def budget_variant(args: CompareArgs, m: int, d_model: int) -> Variant:
    """DePT with m tokens and the rank that spends the budget of l tokens (PT when r = 0)."""
    s, budget = args.max_length, args.pt_tokens  # budget: l, the vanilla prompt length
    r = rank_for_budget(budget, m, s, d_model)
    if r > min(s, d_model):
        log.warning(
            "m=%d: the budget of l=%d gives r=%d > min(s, d) = %d; r is capped (fewer parameters than PT)",
            m,
            budget,
            r,
            min(s, d_model),
        )
        r = min(s, d_model)
    if m == 0 and r == 0:
        raise PipelineError(
            f"m=0 gets rank r=0 at l={budget}, s={s}, d={d_model}: nothing to train; drop 0 from "
            "--ms or raise --pt_tokens"
        )
    label = f"PT l={m}" if r == 0 else f"DePT m={m} r={r}"
    key = f"pt_l{m}" if r == 0 else f"dept_m{m}_r{r}"
    pad_to = s if args.lengths == "padded" else None
    return Variant(key, label, "dept", "engine", m, r, count_trainable(m, r, s, d_model), pad_to, key)


def reference_variants(args: CompareArgs, main: list[Variant], d_model: int) -> list[Variant]:
    """padded PT (dynamic lengths only), bare at every main length, the no-engine rows and PEFT, as asked."""
    s, l = args.max_length, args.pt_tokens  # noqa: E741 (l: the paper's name for the vanilla prompt length)
    pad_main = s if args.lengths == "padded" else None
    pt_trainable = count_trainable(l, 0, s, d_model)
    out: list[Variant] = []
    if "padded" in args.refs and pad_main is None:
        pt = next((v for v in main if v.m == l), None)  # the same PT module, fed padded batches
        out.append(
            Variant(
                f"pt_l{l}_pad{s}",
                f"PT l={l}, padded to s={s}",
                "dept",
                "engine",
                l,
                0,
                pt_trainable,
                s,
                pt.module if pt else f"pt_l{l}",
            )
        )
    if "bare" in args.refs:
        for m in sorted({v.m for v in main}):
            out.append(Variant(f"bare_p{m}", f"bare, input L+{m}", "bare", "engine", m, 0, d_model, pad_main, "bare"))
    if "eager" in args.refs:
        out.append(
            Variant(
                f"eager_bare_p{l}", f"bare, input L+{l}, no engine", "bare", "eager", l, 0, d_model, pad_main, "bare"
            )
        )
        out.append(
            Variant(f"eager_pt_l{l}", f"PT l={l}, no engine", "dept", "eager", l, 0, pt_trainable, pad_main, f"pt_l{l}")
        )
    if "peft" in args.refs:
        out.append(
            Variant(
                f"peft_pt_l{l}",
                f"PEFT PT l={l} (1 submodule), no engine",
                "peft",
                "eager",
                l,
                0,
                l * d_model,
                pad_main,
                "peft",
            )
        )
    return out
