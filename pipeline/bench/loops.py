"""How a compare row takes a training step and an inference: the prompt modules, and the three loops.

engine  every DePT/PT/bare row through one `engine.Engine` over the sharded backbone (all prompt modules in one
        module tree: a second engine on the same backbone would hook it twice);
eager   our bare input and PT module in a plain PyTorch loop (AdamW) on an unsharded copy of the weights;
peft    PEFT's PromptTuning in the same plain loop on the same copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline import engine
from pipeline.backbone import Backbone
from pipeline.bench.settings import BenchArgs
from pipeline.bench.variants import Variant
from pipeline.dept import DeptConfig, DePTPrompt
from pipeline.errors import PipelineError
from pipeline.model import DePTModel, init_dept_prompt

GRAD_CLIP = 1.0  # `dept train`'s default: the clipping is part of the step being timed
NO_SCHEDULE = 10**6  # steps of the learning-rate schedule: far beyond any benchmark, so the rates stay put


def training_ds_config(args: BenchArgs, world: int) -> dict:
    """The DeepSpeed config with the benchmark's batch geometry."""
    return engine.training_ds_config(
        engine.read_ds_config(args.ds_config), args.batch_size, args.grad_accum, GRAD_CLIP, world
    )


def bench_engine(model: nn.Module, prompts: dict[str, nn.Module], args: BenchArgs, ds: dict) -> engine.Engine:
    """The training engine over `model`, optimising the prompt modules with `dept train`'s two learning rates (and
    the LoRA row's pairs, when there is one, with the low-rank rate)."""
    groups = prompt_groups(prompts, args)
    lora_params = [p for name, p in model.base_model.named_parameters() if "lora_" in name]
    if lora_params:
        groups.append({"name": "lora", "params": lora_params, "lr": args.lr_lowrank})
    return engine.Engine(model, groups, ds, weight_decay=0.0, warmup=0, total_steps=NO_SCHEDULE)


class LoraInput(nn.Module):
    """The LoRA row's "prompt": none (the input passes unchanged); its trainable pairs live in the backbone."""

    def forward(self, inputs_embeds, attention_mask, labels=None):
        return inputs_embeds, attention_mask, labels


def attach_lora(args: BenchArgs, backbone: Backbone) -> Variant:
    """PEFT's LoRA on the (sharded) backbone at the rank that spends PT l's budget, and its row of the table."""
    from pipeline import lora
    from pipeline.config import LoraArgs

    shape = lora.resolve_shape(
        LoraArgs(budget_tokens=args.pt_tokens), backbone.model, backbone.d_model, args.max_length, None
    )
    lora.inject(backbone.model, shape, args.seed)  # on until the engine is built (ZeRO-3 hooks what trains then);
    # `PromptSwitch.use` switches the pairs on for the LoRA row and off for every other one
    pad_main = args.max_length if args.lengths == "padded" else None
    label = f"LoRA r={shape.r} ({','.join(shape.target_modules)}, budget l={args.pt_tokens})"
    return Variant(f"lora_r{shape.r}", label, "lora", "engine", 0, shape.r, shape.trainable, pad_main, "lora")


class BareInput(nn.Module):
    """No prompt: one trainable vector [d], zero at start, added to every input embedding. It makes the backward
    pass run through the whole encoder to the input, as it must for any prompt method, and gives the optimizer
    something to update; its cost is one addition."""

    def __init__(self, d_model: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, inputs_embeds, attention_mask, labels=None):
        return inputs_embeds + self.bias.to(inputs_embeds.dtype), attention_mask, labels


class PromptSwitch(DePTModel):
    """`DePTModel` over one backbone with several prompt modules: `use(name)` makes one of them the model's prompt,
    and `DePTModel.forward`/`generate` run unchanged."""

    def __init__(self, base_model: nn.Module, prompts: dict[str, nn.Module], is_encoder_decoder: bool):
        super().__init__(base_model, None, is_encoder_decoder)
        self.prompts = nn.ModuleDict(prompts)

    def use(self, name: str) -> PromptSwitch:
        self.prompt = self.prompts[name]
        if "lora" in self.prompts:  # the LoRA row's pairs compute only while it runs
            from pipeline import lora

            lora.set_enabled(self.base_model, name == "lora")
        return self


def engine_prompts(args: BenchArgs, variants: list[Variant], backbone: Backbone) -> dict[str, nn.Module]:
    """One module per engine row's `module` name: DePT/PT built as `dept train` builds them (TEXT init from the
    frozen embeddings), `bare` a BareInput."""
    prompts: dict[str, nn.Module] = {}
    for v in variants:
        if v.harness != "engine" or v.module in prompts:
            continue
        if v.kind == "bare":
            prompts[v.module] = BareInput(backbone.d_model)
        elif v.kind == "lora":
            prompts[v.module] = LoraInput()
        else:
            shape = DeptConfig(num_virtual_tokens=v.m, r=v.r, max_length=args.max_length, d_model=backbone.d_model)
            prompts[v.module] = init_dept_prompt(shape, backbone, args.seed)
    return prompts


def prompt_groups(prompts: dict[str, nn.Module], args: BenchArgs) -> list[dict]:
    """Optimizer groups with the two learning rates of `dept train` (prompt, low-rank pair); bare: lr_lowrank."""
    groups = []
    for name, module in prompts.items():
        if isinstance(module, DePTPrompt):
            groups += module.param_groups(args.lr_prompt, args.lr_lowrank, prefix=f"{name}.")
        elif isinstance(module, LoraInput):
            continue  # its pairs are in the backbone (bench_engine's lora group)
        else:
            groups.append({"name": name, "params": list(module.parameters()), "lr": args.lr_lowrank})
    return groups


@torch.no_grad()
def infer(model: nn.Module, batch: dict, new_tokens: int, synced: bool = False) -> None:
    """One evaluation batch: `new_tokens` greedy tokens (exactly that many: see `exact_generation_length`), or one
    eval-mode forward pass when 0."""
    if not new_tokens:
        model(**batch)
        return
    model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=new_tokens,
        synced_gpus=synced,
    )


def exact_generation_length(net: nn.Module, new_tokens: int) -> None:
    """Greedy generation of exactly `new_tokens` (EOS held back until then) whoever calls `generate` on `net`:
    our DePTModel and PEFT's wrapper alike read the backbone's generation config, so every configuration
    generates the same number of tokens."""
    net.generation_config.update(min_new_tokens=new_tokens, do_sample=False, num_beams=1)


class EngineLoop:
    """Engine rows: forward, backward and step for every micro-batch (the engine steps the optimizer at the
    accumulation boundary)."""

    def __init__(self, trainer: engine.Engine, synced: bool):
        self.trainer = trainer
        self.synced = synced  # several ranks under ZeRO-3: generation keeps every rank stepping

    def step(self, name: str, batches: list[dict]) -> torch.Tensor:
        self.trainer.module.use(name)
        total = 0.0
        for batch in batches:
            loss = self.trainer.forward(batch)
            self.trainer.backward(loss)
            self.trainer.step()
            total = total + loss.detach() / len(batches)
        return total

    def infer(self, name: str, batch: dict, new_tokens: int) -> None:
        infer(self.trainer.module.use(name), batch, new_tokens, self.synced)

    def train(self, mode: bool) -> None:
        self.trainer.train(mode)


class PlainLoop:
    """Rows without the engine: a plain PyTorch loop (backward per micro-batch, then one AdamW step)."""

    def __init__(self, select: Callable[[str], nn.Module], model: nn.Module, lr: float):
        self.select, self.model = select, model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, eps=1e-6, weight_decay=0.0)

    def step(self, name: str, batches: list[dict]) -> torch.Tensor:
        module = self.select(name)
        total = 0.0
        for batch in batches:
            loss = module(**batch).loss
            (loss / len(batches)).backward()
            total = total + loss.detach() / len(batches)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def infer(self, name: str, batch: dict, new_tokens: int) -> None:
        infer(self.select(name), batch, new_tokens)

    def train(self, mode: bool) -> None:
        self.model.train(mode)


def plain_loops(args: BenchArgs, plain: Backbone, sharded: Backbone, device: torch.device) -> dict[str, PlainLoop]:
    """The eager and PEFT loops asked for in --refs, on `plain` given the sharded backbone's weights."""
    copy_weights(sharded.model, plain.model)
    plain.model.to(device)
    loops: dict[str, PlainLoop] = {}
    if "eager" in args.refs:
        m, s, d = args.pt_tokens, args.max_length, plain.d_model  # PT with l tokens: m = l, r = 0
        pt = init_dept_prompt(
            DeptConfig(num_virtual_tokens=m, r=0, max_length=s, d_model=d, prompt_init="RANDOM"), plain, args.seed
        )
        eager = PromptSwitch(plain.model, {"bare": BareInput(d), f"pt_l{m}": pt}, plain.is_encoder_decoder).to(device)
        loops["eager"] = PlainLoop(eager.use, eager, args.lr_lowrank)
    if "peft" in args.refs:
        peft = peft_prompt_tuning(plain, args.pt_tokens, args.seed).to(device)
        loops["peft"] = PlainLoop(lambda _name: peft, peft, args.lr_prompt)
    return loops


def copy_weights(sharded: nn.Module, plain: nn.Module) -> None:
    """Copy the ZeRO-3 backbone's weights into the plain copy (gathered one parameter at a time)."""
    # a LoRA row's pairs are not in the plain copy; PEFT puts the base weight of a wrapped layer under `base_layer`
    source = {n.replace(".base_layer.", "."): p for n, p in sharded.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name not in source:
                raise PipelineError(f"internal: parameter {name} missing from the sharded backbone")
            with engine.gathered([source[name]]):
                param.copy_(source[name].data.to(param.dtype))


def peft_prompt_tuning(plain: Backbone, tokens: int, seed: int) -> nn.Module:
    """PEFT's PromptTuning with `tokens` (l) on the plain backbone; encoder only (num_transformer_submodules=1)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if plain.is_encoder_decoder else TaskType.CAUSAL_LM
    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type=task,
        num_virtual_tokens=tokens,
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit.RANDOM,
        token_dim=plain.d_model,
    )
    return get_peft_model(plain.model, config)
