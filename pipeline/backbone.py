"""Backbones (T5 encoder-decoder, LLaMA decoder-only): load by name, path or preset, sharded at creation, frozen.

`model` strings name where a backbone comes from:
  - a hub name or a local directory (`t5-base`, `meta-llama/Llama-2-7b-hf`, `./my-model`): `from_pretrained`;
  - a model shipped with the package, by name (`stories260K`, a real pretrained TinyStories LLaMA: the quickstart's);
  - `random:<preset>` (`random:tiny-t5`, `random:t5-base`, `random:llama-7b`, ...): built from a config with
    random weights, for tests, the quickstart and benchmarks. Tiny presets get a sentencepiece tokenizer trained
    on text shipped with the package.

Under ZeRO-3 the backbone is created already sharded (`engine.sharded_construction`): transformers builds every
parameter partitioned and no rank ever holds the whole model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import atomic, logs
from pipeline.engine import gathered, sharded_construction
from pipeline.errors import PipelineError
from pipeline.resources import MODEL_KINDS, model_location, shipped_model_hint

log = logging.getLogger(__name__)

# Geometries by name. Tiny ones take their vocabulary size from the trained tokenizer.
PRESETS: dict[str, dict] = {
    "tiny-t5": dict(
        arch="t5",
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
    ),
    "tiny-llama": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "t5-small": dict(arch="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(arch="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(arch="t5", vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "llama-1b": dict(
        arch="llama",
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama-7b": dict(
        arch="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}
RANDOM_PREFIX = "random:"
# Random presets small enough to build whole on one process are built once per (preset, seed, overrides) and saved
# in the cache; every later load, sharded or not, reads that directory. Building under ZeRO-3 draws the random
# numbers in another order than building whole, so without this an adapter trained under DeepSpeed would be scored
# on a different random backbone by a one-process `dept evaluate`. Larger presets (benchmarks only) are built
# directly, sharded under ZeRO-3, and never held whole.
MATERIALIZED_PRESETS = ("tiny-t5", "tiny-llama", "t5-small", "t5-base")


@dataclass
class Backbone:
    """A loaded backbone: the transformers model and what the pipeline needs to know about it."""

    model: nn.Module
    tokenizer: object
    is_encoder_decoder: bool
    d_model: int
    name: str


def is_random(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def build_config(model: str, vocab_size: int, overrides: dict | None = None, special_ids: dict | None = None):
    """A transformers config for `random:<preset>` with `overrides` (any config field) applied."""
    from transformers import LlamaConfig, T5Config

    preset_name = model[len(RANDOM_PREFIX) :]
    if preset_name not in PRESETS:
        raise PipelineError(
            f"unknown random preset {preset_name!r}: choose one of {', '.join(sorted(PRESETS))} (random:<preset>)"
        )
    fields = dict(PRESETS[preset_name])
    arch = fields.pop("arch")
    fields.setdefault("vocab_size", vocab_size)
    fields.update(special_ids or {})
    fields.update(overrides or {})
    if fields["vocab_size"] < vocab_size:
        raise PipelineError(f"preset vocab_size {fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    if arch == "t5":
        fields.setdefault("decoder_start_token_id", fields.get("pad_token_id", 0))
        return T5Config(**fields)
    fields.pop("decoder_start_token_id", None)
    return LlamaConfig(**fields)


def load_tokenizer(model: str, cache_dir: str | Path | None = None):
    """The model's own tokenizer, or for `random:` presets one trained with sentencepiece (cached)."""
    from transformers import AutoTokenizer

    model = model_location(model)
    if is_random(model):
        from pipeline.tokenizer import trained_tokenizer

        return trained_tokenizer(cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as err:
        raise PipelineError(
            f"cannot load a tokenizer for model {model!r}: not a local directory with a tokenizer and not "
            f"reachable on the hub ({str(err).splitlines()[0][:120]}){shipped_model_hint(model)}; pass {MODEL_KINDS}"
        ) from None
    if tokenizer.pad_token_id is None:  # LLaMA ships without a pad token; padding is masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_backbone(
    model: str,
    ds_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    overrides: dict | None = None,
    trainable: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    allow_fp16_t5: bool = False,
) -> Backbone:
    """Load or build the backbone, sharded at creation when `ds_config` is ZeRO-3, frozen unless `trainable`.

    `trainable=True` is the `finetune` method (every backbone parameter trains); DePT and PT keep it frozen.
    `seed` fixes the weights of a `random:<preset>` backbone: training and inference pass the job's seed, so an
    adapter is always scored on the backbone it was trained on (and every rank builds the same weights).
    T5 in fp16 is refused unless `allow_fp16_t5` (`check_precision`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise PipelineError(f"model path {model!r} does not exist{shipped_model_hint(model)}: pass {MODEL_KINDS}")
    name = model
    model = model_location(model)  # a shipped model by name (stories260K)
    if is_random(model) and model[len(RANDOM_PREFIX) :] in MATERIALIZED_PRESETS:
        model, overrides = str(materialized_random(model, seed, overrides, cache_dir)), None
    tokenizer = load_tokenizer(model, cache_dir)
    logs.quiet_transformers()  # its "Loading weights" bar is not ours to show
    with sharded_construction(ds_config):
        if is_random(model):
            special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
            config = build_config(model, len(tokenizer), overrides, special)
            check_precision(config, dtype, allow_fp16_t5)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            torch.manual_seed(seed)
            net = auto.from_config(config, dtype=dtype)
        else:
            try:
                config = AutoConfig.from_pretrained(model, **(overrides or {}))
            except (OSError, ValueError) as err:
                raise PipelineError(
                    f"unknown model {model!r}: not a local model directory and not found on the hub "
                    f"({str(err).splitlines()[0][:120]}){shipped_model_hint(model)}; pass {MODEL_KINDS}"
                ) from None
            check_precision(config, dtype, allow_fp16_t5)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            net = auto.from_pretrained(model, config=config, dtype=dtype)

    for param in net.parameters():
        param.requires_grad_(trainable)
    if dtype in (torch.bfloat16, torch.float16):
        column_major_output_grads(net)
    d_model = getattr(net.config, "d_model", None) or net.config.hidden_size
    return Backbone(net, tokenizer, bool(net.config.is_encoder_decoder), int(d_model), name)


def check_precision(config, dtype: torch.dtype, allow_fp16_t5: bool = False) -> None:
    """T5 in fp16 is refused: its activations overflow fp16's range (inf/NaN losses; transformers issues #10830,
    #14189; T5 was pretrained in bf16). bf16 has fp32's range and is what the shipped GPU configs use."""
    if dtype == torch.float16 and config.is_encoder_decoder and not allow_fp16_t5:
        raise PipelineError(
            "T5 overflows in fp16 (NaN losses): use a bf16 or fp32 DeepSpeed config (zero3_gpu_bf16, zero3_gpu), "
            "or set train.allow_fp16_t5 (--allow_fp16_t5) to try anyway"
        )


def materialized_random(model: str, seed: int, overrides: dict | None, cache_dir: str | Path | None = None) -> Path:
    """The saved directory of `random:<preset>` built whole with `seed` (built on first use; ranks racing to build
    it write identical files, and the first rename wins)."""
    import hashlib
    import json
    import os
    import shutil
    import tempfile

    import transformers

    from pipeline.cache import cache_root

    key = json.dumps([model, seed, overrides or {}, transformers.__version__.rsplit(".", 1)[0]], sort_keys=True)
    root = Path(cache_dir) if cache_dir else cache_root()
    target = (
        root
        / "random-backbones"
        / f"{model[len(RANDOM_PREFIX) :]}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    )
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model, cache_dir)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = build_config(model, len(tokenizer), overrides, special)
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    net = auto.from_config(config)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    # Written by hand, not save_pretrained: under torch.distributed that writes the weights on global rank 0 only,
    # and a rank whose copy had no weights could win the rename below. save_model dedups tied embeddings.
    from safetensors.torch import save_model

    net.config.save_pretrained(work)
    with atomic.full_disk_as_oserror(work / "model.safetensors"):
        save_model(net, str(work / "model.safetensors"))
    tokenizer.save_pretrained(work)
    try:
        os.rename(work, target)
    except OSError:  # another rank or process finished first (with identical files)
        shutil.rmtree(work, ignore_errors=True)
    return target


def column_major_output_grads(net: nn.Module) -> None:
    """Store the gradient flowing into every Linear's backward column-major, on CPU, for 16-bit weights.

    Without AVX512-BF16/FP16, PyTorch's CPU bf16/fp16 GEMM falls back to a scalar loop when both operands are
    row-major, which is exactly backward's `grad_output @ weight`: 50-100x slower than fp32 (pytorch/pytorch#146508;
    measured here: 8.5 s vs 0.12 s for a [24, 11008] x [11008, 4096] bf16 product, which made one LLaMA-7B step take
    over 15 min). The same product with grad_output column-major takes the fast path. Values are unchanged; only the
    memory layout of the incoming gradient is. GPUs never reach the hook's body.
    """

    def to_column_major(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1, grad.shape[-1])  # [tokens, out]; splitting dim 0 back keeps the matmul's fold a view
        return flat.t().contiguous().t().view(grad.shape)

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad and output.device.type == "cpu":
            output.register_hook(to_column_major)

    for module in net.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(hook)


def embedding_rows(backbone: Backbone, token_ids: list[int] | None) -> torch.Tensor:
    """Rows of the frozen input embedding (all rows when token_ids is None), gathered under ZeRO-3."""
    weight = backbone.model.get_input_embeddings().weight
    with gathered([weight]):
        rows = weight.detach() if token_ids is None else weight.detach()[torch.tensor(token_ids, dtype=torch.long)]
        return rows.float().clone().cpu()


def save_random_backbone(model: str, out_dir: str | Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Build `random:<preset>` with a fixed seed and save it (weights + tokenizer) as a local model directory,
    which `from_pretrained` then loads like any checkpoint (and loads sharded under ZeRO-3)."""
    from pipeline import atomic

    backbone = load_backbone(model, overrides=overrides, seed=seed)
    with atomic.replace_dir(out_dir) as tmp:
        backbone.model.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_backbone(backbone: Backbone, path: str | Path, rank: int) -> None:
    """Gather every parameter and save a `from_pretrained` directory on rank 0 (a finetune stage's product).
    Collective. Gathers the whole model at once: fine for small models; large ones want DeepSpeed's
    `stage3_gather_16bit_weights_on_model_save` path instead."""
    from pipeline import atomic, distributed

    net = backbone.model
    with gathered(list(net.parameters())):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            with atomic.replace_dir(path) as tmp:
                net.save_pretrained(tmp, state_dict=state)
                backbone.tokenizer.save_pretrained(tmp)
    distributed.barrier()
