"""Adapter files: round trip, atomic replacement, recovery of an interrupted swap, refusal of NaN / tampered /
mismatched adapters, resizing A for another s."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline import adapters, atomic
from pipeline.dept import DeptConfig, DePTPrompt
from pipeline.errors import PipelineError


def make(m=4, r=2, s=16, d=8, seed=0):
    torch.manual_seed(seed)
    module = DePTPrompt(DeptConfig(num_virtual_tokens=m, r=r, max_length=s, d_model=d))
    with torch.no_grad():
        module.prompt.normal_()
        if r:
            module.lora_B.normal_()
    return module


def test_round_trip_keeps_values_shapes_and_config(tmp_path):
    module = make()
    adapters.save_adapter(module, tmp_path / "a", "random:tiny-t5")
    config, tensors, meta = adapters.read_adapter(tmp_path / "a")
    assert meta["method"] == "dept" and meta["backbone"] == "random:tiny-t5" and meta["scale"] == config.scale
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt": (4, 8), "lora_A": (16, 2), "lora_B": (2, 8)}
    for name, param in module.named_parameters():
        assert torch.equal(tensors[name], param.detach())
    pt = make(r=0)
    adapters.save_adapter(pt, tmp_path / "pt", "x")
    assert set(adapters.read_adapter(tmp_path / "pt")[1]) == {"prompt"}


def test_nan_adapter_is_refused_and_the_good_one_kept(tmp_path):
    adapters.save_adapter(make(seed=1), tmp_path / "a", "x")
    good = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    bad = make(seed=2)
    with torch.no_grad():
        bad.prompt[0, 0] = float("nan")
    with pytest.raises(PipelineError, match="NaN"):
        adapters.save_adapter(bad, tmp_path / "a", "x")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary leftovers


def test_interrupted_swap_is_recovered(tmp_path):
    adapters.save_adapter(make(seed=3), tmp_path / "a", "x")
    os.rename(tmp_path / "a", tmp_path / "a.old")  # a crash between the two renames of replace_dir
    config, tensors, _ = adapters.read_adapter(tmp_path / "a")
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a.old").exists()


def test_failure_inside_replace_dir_leaves_the_old_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replace_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("new")
            raise RuntimeError("crash")
    assert (tmp_path / "d" / "f").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "config"])
def test_tampered_or_broken_adapters_are_refused_in_one_line(damage, tmp_path):
    adapters.save_adapter(make(), tmp_path / "a", "x")
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        config.write_text("{not json")
    with pytest.raises(PipelineError) as err:
        adapters.read_adapter(tmp_path / "a")
    assert "\n" not in str(err.value)


def test_shape_mismatch_against_backbone_and_s_is_explained():
    config = DeptConfig(num_virtual_tokens=4, r=2, max_length=16, d_model=8)
    with pytest.raises(PipelineError, match="d_model 8 but the backbone's embeddings are 64 wide"):
        adapters.check_fits(config, 64, 16, "a")
    with pytest.raises(PipelineError, match="max_length s=16 .* s=32"):
        adapters.check_fits(config, 8, 32, "a")
    with pytest.raises(PipelineError, match="prompt has shape"):
        adapters.check_shapes(
            {"prompt": torch.zeros(5, 8), "lora_A": torch.zeros(16, 2), "lora_B": torch.zeros(2, 8)}, config, "a"
        )


def test_fit_length_truncates_or_pads_a(tmp_path):
    module = make(s=16)
    config, tensors = module.config, adapters.adapter_tensors(module)
    with pytest.raises(PipelineError, match="on_length_mismatch"):
        adapters.fit_length(config, tensors, 8, "error", "a")
    short_cfg, short = adapters.fit_length(config, tensors, 8, "truncate", "a")
    assert short_cfg.max_length == 8 and torch.equal(short["lora_A"], tensors["lora_A"][:8])
    long_cfg, long = adapters.fit_length(config, tensors, 20, "pad", "a")
    assert torch.equal(long["lora_A"][:16], tensors["lora_A"]) and long["lora_A"][16:].abs().sum() == 0
    with pytest.raises(PipelineError, match="use pad"):
        adapters.fit_length(config, tensors, 20, "truncate", "a")


def test_config_records_checksum_and_shape_fields(tmp_path):
    adapters.save_adapter(make(), tmp_path / "a", "x")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for key in (
        "method",
        "num_virtual_tokens",
        "r",
        "max_length",
        "scale",
        "prompt_init",
        "backbone",
        "d_model",
        "weights_sha256",
    ):
        assert key in meta


def test_atomic_files_and_adapter_dirs_get_umask_permissions(tmp_path):
    """mkstemp/mkdtemp would leave results 0600 and adapters 0700, unreadable to a shared group."""
    import stat

    atomic.write_text(tmp_path / "results.json", "{}")
    adapters.save_adapter(make(), tmp_path / "adapter", "random:tiny-t5")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~mask
    for file in (tmp_path / "adapter").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) & 0o444 == 0o444 & ~mask, file
