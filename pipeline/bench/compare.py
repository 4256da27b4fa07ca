"""`dept bench` compare mode: PT and DePT at equal budget plus reference rows, interleaved on one sharded backbone."""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field

from pipeline.bench.compare_report import compare_markdown, compare_report, plot_compare
from pipeline.bench.measure import MemorySampler, rss_mb, sync, tensor_peak
from pipeline.bench.output import track, write_outputs
from pipeline.bench.settings import LENGTHS, data_folder

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.bench")

DATA_TOKENIZER = "data-32k"  # --tokenizer value: a 32k SentencePiece trained on the task data (no hub here)
FILLER_ID = 5  # token id of the extra inputs of bare rows (content does not change the work)



def bench_modules():
    """Module classes built on first use (torch is imported only when the command runs)."""
    global BareInput, BenchModel
    if "BareInput" in globals():
        return BareInput, BenchModel
    import torch
    from torch import nn

    from pipeline.backbone import DePTModel

    class _BareInput(nn.Module):
        """No prompt: one trainable vector [d], zero at start, added to every input embedding. It makes the backward
        pass run through the whole encoder to the input, as it must for any prompt method, and gives the engine
        something to optimise; its cost is one addition."""

        def __init__(self, d_model: int):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(d_model))

        def forward(self, inputs_embeds, attention_mask, labels=None):
            return inputs_embeds + self.bias.to(inputs_embeds.dtype), attention_mask, labels

    class _BenchModel(DePTModel):
        """`DePTModel` with several prompt modules over one backbone: `forward(variant, ...)` makes the named one
        the model's prompt and runs `DePTModel.forward` unchanged. One module tree means one ZeRO-3 engine over one
        sharded backbone (a second engine on the same backbone would hook it twice)."""

        def __init__(self, backbone, prompts: dict, is_encoder_decoder: bool):
            super().__init__(backbone, None, is_encoder_decoder)
            self.prompts = nn.ModuleDict(prompts)

        def use(self, variant: str) -> "_BenchModel":
            self.prompt = self.prompts[variant]
            return self

        def forward(self, variant, input_ids, attention_mask, labels=None):
            return self.use(variant).forward_with_prompt(input_ids, attention_mask, labels)

        def forward_with_prompt(self, input_ids, attention_mask, labels=None):
            return DePTModel.forward(self, input_ids, attention_mask, labels)

    BareInput, BenchModel = _BareInput, _BenchModel
    return BareInput, BenchModel



@dataclass
class Variant:
    """One configuration of the table."""

    key: str                 # slug: json / MLflow key
    label: str               # table label
    kind: str                # dept | bare | peft
    harness: str             # engine | eager
    m: int = 0               # prompt length (bare: extra input tokens)
    r: int = 0
    trainable: int = 0
    pad_to: int | None = None
    module: str = ""         # prompt module name inside the harness
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    enc_tokens: list = field(default_factory=list)
    real_tokens: list = field(default_factory=list)
    infer: list = field(default_factory=list)
    step_peak_mb: float | None = None
    alloc_peak_mb: float | None = None
    rss_peak_mb: float | None = None



def plan_variants(settings: dict, d_model: int) -> list[Variant]:
    """The configurations of a compare run: DePT/PT rows at equal budget, then the reference rows."""
    from pipeline.dept import count_trainable, rank_for_budget

    s, l = settings["max_length"], settings["pt_tokens"]
    refs = settings["refs"]
    pad_main = s if settings["lengths"] == "padded" else None
    rows: list[Variant] = []
    for m in settings["ms"]:
        r = rank_for_budget(l, m, s, d_model)
        if r > min(s, d_model):
            log.warning("m=%d: the budget of l=%d gives r=%d > min(s, d) = %d; r is capped (fewer parameters than PT)",
                        m, l, r, min(s, d_model))
            r = min(s, d_model)
        if m == 0 and r == 0:
            raise PipelineError(f"m=0 gets rank r=0 at l={l}, s={s}, d={d_model}: nothing to train; drop 0 from --ms "
                                "or raise --pt_tokens")
        label = f"PT l={m}" if r == 0 else f"DePT m={m} r={r}"
        key = f"pt_l{m}" if r == 0 else f"dept_m{m}_r{r}"
        rows.append(Variant(key, label, "dept", "engine", m, r, count_trainable(m, r, s, d_model), pad_main, key))
    pt = next((v for v in rows if v.m == l), None)
    if "padded" in refs and pad_main is None:
        rows.append(Variant(f"pt_l{l}_pad{s}", f"PT l={l}, padded to s={s}", "dept", "engine", l, 0,
                            count_trainable(l, 0, s, d_model), s, pt.module if pt else f"pt_l{l}"))
    if "bare" in refs:
        for m in sorted({v.m for v in rows if v.harness == "engine" and v.pad_to == pad_main}):
            rows.append(Variant(f"bare_p{m}", f"bare, input L+{m}", "bare", "engine", m, 0, d_model, pad_main, "bare"))
    if "eager" in refs:
        rows.append(Variant(f"eager_bare_p{l}", f"bare, input L+{l}, no engine", "bare", "eager", l, 0, d_model,
                            pad_main, "bare"))
        rows.append(Variant(f"eager_pt_l{l}", f"PT l={l}, no engine", "dept", "eager", l, 0,
                            count_trainable(l, 0, s, d_model), pad_main, f"pt_l{l}"))
    if "peft" in refs:
        rows.append(Variant(f"peft_pt_l{l}", f"PEFT PT l={l} (1 submodule), no engine", "peft", "eager", l, 0,
                            l * d_model, pad_main, "peft"))
    return rows



def tokenized_rows(settings: dict, backbone, world: int) -> tuple[list[dict], dict]:
    """Rendered rows of the chosen task, tokenized to s, with a description of their length distribution."""
    from pipeline.backbone import load_tokenizer
    from pipeline.data import tokenize
    from pipeline.tasks import get_task, load_raw_split

    task_name = LENGTHS[settings["lengths"]]
    folder = data_folder(settings["data_dir"])
    raw, where, errors = None, "", []
    for split in ("train", "validation"):
        try:
            raw = load_raw_split(task_name, split, folder)
            where = f"{task_name} {split} ({len(raw)} rows, {folder or 'hub'})"
            break
        except PipelineError as err:
            errors.append(str(err))
    if raw is None:
        if settings["lengths"] != "padded":
            raise PipelineError(f"no {task_name} data for --lengths {settings['lengths']}: {errors[-1]}")
        raw, where = None, "synthetic rows (no RTE data found); every input is padded to s"
    if raw is None:
        import random

        from pipeline.tokenizer import words

        rng, vocab = random.Random(settings["seed"]), words()
        rows = [{"source": " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120))), "target": "1"}
                for _ in range(max(256, settings["batch_size"] * 4))]
    else:
        task = get_task(task_name)
        rows = [task.render(row) for row in raw]
    if settings["tokenizer"] == DATA_TOKENIZER:
        if folder is None:
            raise PipelineError(f"--tokenizer {DATA_TOKENIZER} trains on the task data: pass --data_dir or set "
                                "$DEPT_DATA_DIR")
        from pipeline.tokenizer import data_tokenizer

        tok = data_tokenizer(folder, 32000, os.environ.get("DEPT_CACHE"))
    elif settings["tokenizer"]:
        tok = load_tokenizer(settings["tokenizer"], os.environ.get("DEPT_CACHE"))
    else:
        tok = backbone.tokenizer
    tokenized = tokenize(rows, tok, backbone.is_encoder_decoder, settings["max_length"], max_target_length=8)
    vocab = backbone.model.get_input_embeddings().num_embeddings
    if settings["tokenizer"]:
        for row in tokenized:  # another tokenizer's ids, folded into this backbone's vocabulary
            for key in ("input_ids", "labels", "prompt_ids"):
                row[key] = [t % vocab if t >= 0 else t for t in row[key]]
    lens = sorted(len(r["input_ids"]) for r in tokenized)
    n = len(lens)
    info = {"source": where, "tokenizer": settings["tokenizer"] or f"{settings['model']}'s own",
            "rows": n, "median": lens[n // 2], "p90": lens[min(n - 1, int(0.9 * n))], "max": lens[-1],
            "at_s_fraction": sum(x >= settings["max_length"] for x in lens) / n,
            "batches_per_epoch": max(n // settings["batch_size"], 1)}
    if settings["batch_size"] % world:
        raise PipelineError(f"batch_size {settings['batch_size']} is not divisible by the {world} ranks")
    return tokenized, info



def _batch(rows: list[dict], ids: list[int], variant: Variant, pad_id: int, is_ed: bool, generation=False):
    """The variant's tensors for rows `ids`: padded as the variant pads; bare rows get m extra real-length inputs
    (mask 1, label -100), so the backbone sees exactly the tensor shape the prompt methods give it."""
    import torch

    from pipeline.data import IGNORE, collate

    batch = collate([rows[i] for i in ids], pad_id, is_ed, variant.pad_to, for_generation=generation)
    real = int(batch["attention_mask"].sum())
    if variant.kind == "bare" and variant.m:
        b, m = batch["input_ids"].shape[0], variant.m
        batch["input_ids"] = torch.cat([torch.full((b, m), FILLER_ID, dtype=torch.long), batch["input_ids"]], 1)
        batch["attention_mask"] = torch.cat([torch.ones(b, m, dtype=torch.long), batch["attention_mask"]], 1)
        if not is_ed and "labels" in batch:
            batch["labels"] = torch.cat([torch.full((b, m), IGNORE, dtype=torch.long), batch["labels"]], 1)
    width = batch["input_ids"].shape[1] + (variant.m if variant.kind != "bare" else 0)
    return batch, real, width



def run_compare(settings: dict) -> dict | None:
    import deepspeed
    import torch

    from pipeline import distributed
    from pipeline.backbone import embedding_rows, load_backbone
    from pipeline.data import global_batch
    from pipeline.dept import DeptConfig, DePTPrompt, init_prompt_, prompt_init_ids
    from pipeline.train import (
        TrainConfig,
        ds_dtype,
        load_ds_config,
        param_groups,
        warmup_then_linear_decay,
    )

    rank, world = distributed.init()
    bare_cls, bench_cls = bench_modules()
    s, l = settings["max_length"], settings["pt_tokens"]
    tcfg = TrainConfig(model=settings["model"], output_dir=settings["output_dir"], ds_config=settings["ds_config"],
                       method="dept", max_length=s, batch_size=settings["batch_size"],
                       grad_accum=settings["grad_accum"], lr_prompt=settings["lr_prompt"],
                       lr_lowrank=settings["lr_lowrank"], steps=10**6, warmup_steps=0, seed=settings["seed"],
                       model_overrides=settings["overrides"])
    ds = load_ds_config(settings["ds_config"], tcfg, world)
    dtype = ds_dtype(ds)
    cache = os.environ.get("DEPT_CACHE")
    needs_plain = bool({"eager", "peft"} & set(settings["refs"]))

    with MemorySampler() as sampler:
        tick = time.perf_counter()
        plain = None
        if needs_plain:  # built first, while no HfDeepSpeedConfig is alive, so it is an ordinary (unsharded) model
            torch.manual_seed(settings["seed"])
            plain = load_backbone(settings["model"], None, dtype, settings["overrides"], cache_dir=cache)
        torch.manual_seed(settings["seed"])
        backbone = load_backbone(settings["model"], ds, dtype, settings["overrides"], cache_dir=cache)
        load_s = time.perf_counter() - tick
        d = backbone.d_model
        variants = plan_variants(settings, d)
        rows, length_info = tokenized_rows(settings, backbone, world)

        # Engine rows: one DePTPrompt per (m, r), initialised as `train.build_model` does (TEXT init), plus `bare`.
        prompts, groups = {}, []
        for v in variants:
            if v.harness != "engine" or v.module in prompts:
                continue
            if v.kind == "bare":
                prompts[v.module] = bare_cls(d)
                groups.append({"name": "bare", "params": [prompts[v.module].bias], "lr": settings["lr_lowrank"]})
                continue
            cfg = DeptConfig(num_virtual_tokens=v.m, r=v.r, max_length=s, d_model=d)
            torch.manual_seed(settings["seed"])
            prompt = DePTPrompt(cfg)
            vocab = backbone.model.get_input_embeddings().num_embeddings
            ids = prompt_init_ids(cfg, backbone.tokenizer, vocab, settings["seed"])
            init_prompt_(prompt, None if ids is None else embedding_rows(backbone, ids), settings["seed"])
            prompts[v.module] = prompt
        model = bench_cls(backbone.model, prompts, backbone.is_encoder_decoder)
        for name, prompt in prompts.items():
            if isinstance(prompt, DePTPrompt):
                groups += param_groups(model.use(name), tcfg)
        model.prompt = None
        optimizer = torch.optim.AdamW(groups, eps=1e-6, weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_linear_decay(0, 10**6)),
        )
        device = engine.device

        eager_model = peft_model = eager_opt = peft_opt = None
        if plain is not None:
            _copy_weights(backbone.model, plain.model)
            plain.model.to(device)
            eager_prompts = {}
            if "eager" in settings["refs"]:
                torch.manual_seed(settings["seed"])
                eager_prompts = {"bare": bare_cls(d),
                                 f"pt_l{l}": DePTPrompt(DeptConfig(num_virtual_tokens=l, r=0, max_length=s, d_model=d,
                                                                   prompt_init="RANDOM"))}
                init_prompt_(eager_prompts[f"pt_l{l}"], None, settings["seed"])
            eager_model = bench_cls(plain.model, eager_prompts, plain.is_encoder_decoder).to(device)
            if eager_prompts:
                eager_opt = torch.optim.AdamW([p for p in eager_model.prompts.parameters()], lr=settings["lr_lowrank"],
                                              eps=1e-6, weight_decay=0.0)
            if "peft" in settings["refs"]:
                peft_model = _peft(plain, l, settings["seed"]).to(device)
                peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                             lr=settings["lr_prompt"], eps=1e-6, weight_decay=0.0)
        if rank == 0:
            log.info("bench: %d configurations, %d warm-up + %d timed rounds, lengths=%s (%s)", len(variants),
                     settings["warmup"], settings["steps"], settings["lengths"], length_info["source"])

        pad_id = backbone.tokenizer.pad_token_id
        is_ed = backbone.is_encoder_decoder
        accum = settings["grad_accum"]
        micro = settings["batch_size"] // (world * accum)

        def step_fn(v: Variant, batches: list[dict]):
            """One optimizer step over this rank's micro-batches; returns the mean loss (a tensor)."""
            if v.harness == "engine":  # DeepSpeed steps the optimizer at the accumulation boundary
                def run():
                    total = 0.0
                    for batch in batches:
                        out = engine(variant=v.module, **batch)
                        engine.backward(out.loss)
                        engine.step()
                        total = total + out.loss.detach() / len(batches)
                    return total
                return run
            model, opt = (peft_model, peft_opt) if v.kind == "peft" else (eager_model, eager_opt)
            call = (lambda batch: model(**batch)) if v.kind == "peft" else (lambda batch: model(v.module, **batch))

            def run():
                total = 0.0
                for batch in batches:
                    loss = call(batch).loss
                    (loss / len(batches)).backward()
                    total = total + loss.detach() / len(batches)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return total
            return run

        grouped_lengths = [len(r["input_ids"]) for r in rows] if settings["group_by_length"] else None

        def rank_slice(step: int) -> list[list[int]]:
            """This rank's micro-batches of global batch `step` (the layout of train.py)."""
            ids = global_batch(len(rows), settings["batch_size"], step, settings["seed"], grouped_lengths)
            return [ids[(a * world + rank) * micro:(a * world + rank + 1) * micro] for a in range(accum)]

        def tensors(parts: list[list[int]], v: Variant, generation: bool = False):
            made = [_batch(rows, ids, v, pad_id, is_ed, generation) for ids in parts]
            batches = [{k: t.to(device) for k, t in b.items()} for b, _, _ in made]
            return batches, sum(real for _, real, _ in made), statistics.fmean(w for _, _, w in made)

        # Round-robin: each round one step of every configuration on the same batch, starting position rotating.
        total_rounds = settings["warmup"] + settings["steps"]
        n = len(variants)
        for round_index in range(total_rounds):
            parts = rank_slice(round_index)
            timed = round_index >= settings["warmup"]
            for j in range(n):
                v = variants[(round_index + j) % n]
                batches, real, width = tensors(parts, v)
                run = step_fn(v, batches)
                sampler.label = v.key
                sync()
                start = time.perf_counter()
                loss = run()
                sync()
                elapsed = time.perf_counter() - start
                sampler.label = "between"
                if timed:
                    v.times.append(elapsed)
                    v.losses.append(float(loss.detach().float().item()))
                    v.real_tokens.append(real)
                    v.enc_tokens.append(width)
            if rank == 0:
                log.info("round %d/%d done%s", round_index + 1, total_rounds, "" if timed else " (warm-up)")

        if settings["memory_profile"]:
            parts = rank_slice(0)
            for v in variants:
                batches, _, _ = tensors(parts, v)
                sampler.label = v.key
                v.step_peak_mb, v.alloc_peak_mb = tensor_peak(step_fn(v, batches))
                sampler.label = "between"

        if settings["infer_repeats"]:
            engine.module.eval()
            if eager_model is not None:
                eager_model.eval()
            if peft_model is not None:
                peft_model.eval()
            parts = rank_slice(0)[:1]  # one evaluation batch: this rank's first micro-batch
            for repeat in range(settings["infer_repeats"]):
                for j in range(n):
                    v = variants[(repeat + j) % n]
                    gen = settings["infer_tokens"] > 0
                    (batch,), _, _ = tensors(parts, v, generation=gen)
                    sampler.label = v.key
                    sync()
                    start = time.perf_counter()
                    _infer(v, batch, engine.module, eager_model, peft_model, settings["infer_tokens"], world)
                    sync()
                    v.infer.append(time.perf_counter() - start)
                    sampler.label = "between"
            engine.module.train()

    for v in variants:
        v.rss_peak_mb = sampler.peak_rss.get(v.key, 0) / 2**20
    per_rank = distributed.gather_objects([{
        "rank": rank, "times": {v.key: v.times for v in variants}, "infer": {v.key: v.infer for v in variants},
        "step_peak": {v.key: v.step_peak_mb for v in variants}, "rss_peak": {v.key: v.rss_peak_mb for v in variants},
        "losses": {v.key: v.losses for v in variants}, "real": {v.key: v.real_tokens for v in variants},
        "ru_maxrss_mb": rss_mb(), "min_available_mb": sampler.min_available / 2**20,
    }])
    result = None
    if rank == 0:
        result = compare_report(settings, variants, per_rank, world, length_info, load_s, d, sampler.total, dtype)
        write_outputs(settings, result, compare_markdown, plot_compare)
    track(settings, result)
    distributed.barrier()
    return result



def _copy_weights(sharded, plain) -> None:
    """Copy the ZeRO-3 backbone's weights into the plain copy (gathered one parameter at a time)."""
    import torch

    from pipeline.backbone import gathered

    src = dict(sharded.named_parameters())
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name not in src:
                raise PipelineError(f"internal: parameter {name} missing from the sharded backbone")
            with gathered([src[name]]):
                param.copy_(src[name].data.to(param.dtype))



def _peft(plain, l: int, seed: int):
    """PEFT's PromptTuning with l tokens on the plain backbone; encoder only (num_transformer_submodules=1)."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if plain.is_encoder_decoder else TaskType.CAUSAL_LM
    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=l, num_transformer_submodules=1,
                                prompt_tuning_init=PromptTuningInit.RANDOM, token_dim=plain.d_model)
    return get_peft_model(plain.model, config)



def _infer(v: Variant, batch, engine_module, eager_model, peft_model, new_tokens: int, world: int):
    """One evaluation batch: `new_tokens` greedy tokens (exactly that many), or one eval forward when 0."""
    import torch

    with torch.no_grad():
        if v.kind == "peft":
            if new_tokens:
                peft_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
            else:
                peft_model(**batch)
            return
        harness = engine_module if v.harness == "engine" else eager_model
        model = harness.use(v.module)
        if not new_tokens:
            model.forward_with_prompt(**batch)
            return
        embeds, mask, _ = model._inputs(batch["input_ids"], batch["attention_mask"])
        model.backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                synced_gpus=v.harness == "engine" and world > 1)
