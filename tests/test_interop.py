"""Adapter interop: the DePT authors' released adapters in, PEFT prompt tuning out, and the refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run

from pipeline import adapters, interop
from pipeline.backbone import load_backbone
from pipeline.dept import DeptConfig, DePTPrompt
from pipeline.errors import PipelineError
from pipeline.model import DePTModel

AUTHORS = Path(os.environ["DEPT_DATA_DIR"]) / "authors_adapters"
pytestmark = pytest.mark.skipif(
    not AUTHORS.is_dir(),
    reason=f"{AUTHORS} not found: the DePT authors' released adapters (github.com/ZhengxiangShi/DePT, "
    "checkpoints/<task>/adapter_model.bin and adapter_config.json; not redistributed here) are read where they lie: "
    "set DEPT_DATA_DIR to a folder holding authors_adapters/<task>/",
)
A_KEY, B_KEY = "prompt_encoder.lora_embedding_A", "prompt_encoder.lora_embedding_B"
# task -> (m, r, s) as the configs say
COMPLETE = {"cola": (80, 15, 256), "sst2": (60, 30, 256)}
PROMPT_ONLY = {"superglue-wic": (60, 30, 256), "nq": (60, 24, 512), "hotpotqa": (60, 24, 512)}


def source(task: str) -> dict[str, torch.Tensor]:
    return torch.load(AUTHORS / task / "adapter_model.bin", map_location="cpu", weights_only=True)


def refusal(call, *args, **kwargs) -> str:
    """The message of the PipelineError `call` raises; it must be a single line."""
    with pytest.raises(PipelineError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ released adapters


@pytest.mark.parametrize("task", sorted(COMPLETE))
def test_complete_adapters_import_with_source_values(task, tmp_path):
    m, r, s = COMPLETE[task]
    src = source(task)
    config, tensors, meta = interop.import_authors_adapter(AUTHORS / task, tmp_path / "out")
    assert (config.num_virtual_tokens, config.r, config.max_length, config.d_model) == (m, r, s, 768)
    assert config.lora_alpha == 8.0 and config.scale == pytest.approx(8 / math.sqrt(r))
    assert config.prompt_init == "TEXT" and config.init_text == "Classify this text is postive or not:"
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt": (m, 768), "lora_A": (s, r), "lora_B": (r, 768)}
    assert torch.equal(tensors["prompt"], src["prompt_embeddings"])
    assert torch.equal(tensors["lora_A"], src[A_KEY]) and torch.equal(tensors["lora_B"], src[B_KEY])
    assert meta["backbone"] == "t5-base" and meta["source_peft_type"] == "PROMPT_TUNING_LORA"
    assert meta["imported_from"] == str((AUTHORS / task).resolve()) and meta["lowrank_missing"] is False
    # What was written reads back as an ordinary adapter of ours.
    assert meta["format_version"] == adapters.FORMAT_VERSION
    _, again, _ = adapters.read_adapter(tmp_path / "out")
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("task", sorted(PROMPT_ONLY))
def test_prompt_only_adapters_refused_by_default(task, tmp_path):
    message = refusal(interop.import_authors_adapter, AUTHORS / task, tmp_path / "out")
    assert A_KEY in message and B_KEY in message and "--allow_missing_lowrank" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", sorted(PROMPT_ONLY))
def test_prompt_only_adapters_import_as_zero_offset(task, tmp_path):
    m, r, s = PROMPT_ONLY[task]
    config, tensors, meta = interop.import_authors_adapter(AUTHORS / task, tmp_path / "out", allow_missing_lowrank=True)
    assert (config.num_virtual_tokens, config.r, config.max_length) == (m, r, s)  # r kept: still fits a DePT run
    assert meta["lowrank_missing"] is True and sorted(meta["lowrank_missing_tensors"]) == [A_KEY, B_KEY]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lowrank_missing"] is True
    assert torch.equal(tensors["prompt"], source(task)["prompt_embeddings"])
    assert tensors["lora_B"].shape == (r, 768) and not tensors["lora_B"].any()
    assert not (tensors["lora_A"] @ tensors["lora_B"]).any()
    # A is DePT's own init (not zeros, which would leave the offset untrainable), and reproducible.
    assert tensors["lora_A"].abs().max() <= 1 / math.sqrt(r) and tensors["lora_A"].any()
    _, again, _ = interop.import_authors_adapter(AUTHORS / task, allow_missing_lowrank=True)
    assert torch.equal(again["lora_A"], tensors["lora_A"])


def test_read_any_adapter_accepts_authors_directories():
    config, tensors, _ = interop.read_any_adapter(AUTHORS / "cola")
    assert config.r == 15 and torch.equal(tensors["lora_B"], source("cola")[B_KEY])
    assert B_KEY in refusal(interop.read_any_adapter, AUTHORS / "nq")
    assert "convert it with `dept import-adapter`" in refusal(adapters.read_adapter, AUTHORS / "cola")


# ----------------------------------------------------------------------------------- same encoder inputs


@pytest.fixture(scope="module")
def t5_base():
    torch.manual_seed(0)
    return load_backbone("random:t5-base")


def test_imported_cola_gives_the_authors_encoder_inputs(t5_base):
    config, tensors, _ = interop.import_authors_adapter(AUTHORS / "cola")
    adapters.check_fits(config, t5_base.d_model, 256, "cola")
    prompt = DePTPrompt(config)
    adapters.load_into(prompt, tensors)
    model = DePTModel(t5_base.model, prompt, is_encoder_decoder=True)

    ids = torch.randint(5, 1000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = t5_base.tokenizer.pad_token_id
    with torch.no_grad():
        embeds, full_mask, _ = model._inputs(ids, mask)

        src = source("cola")
        tokens = t5_base.model.get_input_embeddings()(ids)
        offset = (src[A_KEY] @ src[B_KEY]) * (8 / math.sqrt(15))  # [256, 768], row i for position i
        tokens = tokens + offset[:12].unsqueeze(0) * mask.unsqueeze(-1)  # pads get no offset
        expected = torch.cat([src["prompt_embeddings"].expand(3, -1, -1), tokens], dim=1)
    torch.testing.assert_close(embeds, expected)
    assert torch.equal(full_mask, torch.cat([torch.ones(3, 80, dtype=torch.long), mask], dim=1))


# ---------------------------------------------------------------------------------------------- PEFT export


def write_pt_adapter(path: Path, model_dir: Path, d_model: int, m: int = 5) -> dict[str, torch.Tensor]:
    tensors = {"prompt": torch.randn(m, d_model, generator=torch.Generator().manual_seed(1))}
    config = DeptConfig(num_virtual_tokens=m, r=0, max_length=32, d_model=d_model, prompt_init="RANDOM")
    adapters.write_adapter(tensors, config, path, str(model_dir))
    return tensors


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_pt_adapter_exported_to_peft_gives_same_logits(arch, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_dir = tiny_models[arch]
    ours = load_backbone(str(model_dir))
    tensors = write_pt_adapter(tmp_path / "pt", model_dir, ours.d_model)
    interop.export_peft(tmp_path / "pt", tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    task_type = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    assert peft_config["task_type"] == task_type and peft_config["num_transformer_submodules"] == 1

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(model_dir), tmp_path / "peft").eval()
    config, loaded, _ = adapters.read_adapter(tmp_path / "pt")
    prompt = DePTPrompt(config)
    adapters.load_into(prompt, loaded)
    dept_model = DePTModel(ours.model.eval(), prompt, is_encoder_decoder=(arch == "t5"))

    ids = torch.randint(5, 200, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    ids[mask == 0] = ours.tokenizer.pad_token_id
    kwargs = {"decoder_input_ids": torch.randint(5, 200, (2, 4))} if arch == "t5" else {}
    with torch.no_grad():
        expected = dept_model(ids, mask, **kwargs).logits
        got = peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), tensors["prompt"])
    torch.testing.assert_close(got, expected)


def test_export_of_dept_adapter_refused(tmp_path):
    message = refusal(interop.export_peft, AUTHORS / "cola", tmp_path / "peft")
    assert "PEFT has no DePT" in message and "--method pt" in message
    assert not (tmp_path / "peft").exists()


def test_zero_offset_adapter_exports_as_prompt_tuning(tmp_path):
    interop.import_authors_adapter(AUTHORS / "nq", tmp_path / "nq", allow_missing_lowrank=True)
    interop.export_peft(tmp_path / "nq", tmp_path / "peft")  # task type from the import record: no hub lookup
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"],
        source("nq")["prompt_embeddings"],
    )
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_unknown_export_format_refused(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["export-adapter", str(AUTHORS / "cola"), str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "'onnx' is not one of peft" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ bad input


class NotATensor:
    """Pickled by torch.save as a global that weights_only loading refuses."""


def copy_of(task: str, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(AUTHORS / task, dst)
    for path in [dst, *dst.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copies are read-only
    return dst


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def lora_type(src: Path) -> None:
    edit_config(src, peft_type="LORA")


def truncated(src: Path) -> None:
    data = (src / "adapter_model.bin").read_bytes()
    (src / "adapter_model.bin").write_bytes(data[: len(data) // 2])


def custom_pickle(src: Path) -> None:
    torch.save({"prompt_embeddings": NotATensor()}, src / "adapter_model.bin")


def not_a_dict(src: Path) -> None:
    torch.save(torch.zeros(80, 768), src / "adapter_model.bin")


def wrong_shape(src: Path) -> None:
    edit_config(src, num_virtual_tokens=100)


def no_weights(src: Path) -> None:
    (src / "adapter_model.bin").unlink()


def broken_json(src: Path) -> None:
    (src / "adapter_config.json").write_text("{not json")


def missing_dir(src: Path) -> None:
    shutil.rmtree(src)


BAD = {
    "peft_type LORA": (lora_type, "'LORA' adapter, not a DePT one"),
    "truncated bin": (truncated, "truncated or corrupt"),
    "custom pickle": (custom_pickle, "not a plain state dict"),
    "not a dict": (not_a_dict, "holds a Tensor, not a state dict"),
    "shape vs config": (
        wrong_shape,
        "prompt_embeddings has shape [80, 768] but adapter_config.json says num_virtual_tokens=100, token_dim=768",
    ),
    "no weights file": (no_weights, "has no adapter_model.bin"),
    "broken json": (broken_json, "is not valid JSON"),
    "missing directory": (missing_dir, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused_with_one_line(case, tmp_path):
    damage, expected = BAD[case]
    src = copy_of("cola", tmp_path)
    damage(src)
    assert expected in refusal(interop.import_authors_adapter, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_directory_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert "holds other files" in refusal(interop.import_authors_adapter, AUTHORS / "cola", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_cli_import_good_and_bad(tmp_path):
    good = run(["import-adapter", str(AUTHORS / "sst2"), str(tmp_path / "good")])
    assert "m=60, r=30" in good.stdout
    assert adapters.read_adapter(tmp_path / "good")[0].r == 30

    src = copy_of("cola", tmp_path)
    truncated(src)
    bad = run(["import-adapter", str(src), str(tmp_path / "bad")], check=False)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated or corrupt" in lines[0]
    assert not (tmp_path / "bad").exists()
