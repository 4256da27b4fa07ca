"""Generation sees what training saw: greedy decoding equals, token by token, the argmax of the training-time forward
run on the source plus the tokens generated so far (#20).

Decoder-only (stories260K, a real pretrained LM) with a DePT adapter whose offset is large (B scaled up): training
adds the offset row of every position below s to the answer tokens too, so generation must add it to each
generated token. T5 is unaffected (the offset is on the encoder input) and is checked the same way. One process
here; two ZeRO-3 ranks (`dept predict` under the deepspeed launcher) in the slow test.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run

from pipeline import adapters
from pipeline.backbone import load_backbone
from pipeline.data import collate, pad, pad_token_id, tokenize
from pipeline.dept import DeptConfig, DePTPrompt
from pipeline.evaluation import generate_predictions
from pipeline.model import DePTModel
from pipeline.tasks.stories import story_rows

STORIES = "stories260K"  # shipped with the package
NEW_TOKENS = 20
ROWS = 8
S = 96


def large_offset_model(model: str, d_model: int, seed: int = 0) -> DePTModel:
    """The backbone with a DePT adapter (m 4, r 4, s 96) whose offset is ~2x the embeddings' scale (B ~ N(0, 0.3))."""
    torch.manual_seed(seed)
    backbone = load_backbone(model, seed=0)
    prompt = DePTPrompt(DeptConfig(num_virtual_tokens=4, r=4, max_length=S, d_model=d_model, prompt_init="RANDOM"))
    with torch.no_grad():
        prompt.prompt.normal_(0, 0.3)
        prompt.lora_B.normal_(0, 0.3)
    return DePTModel(backbone.model, prompt, backbone.is_encoder_decoder).eval(), backbone


def sources(n: int = ROWS) -> list[dict]:
    """Stories of different lengths, so that the batch is left-padded."""
    return [{"source": r["source"], "target": ""} for r in story_rows("stories-animal", "test", n)]


@torch.no_grad()
def argmax_chain_agrees(net: DePTModel, tokenized: list[dict], generated: list[list[int]], eos: set[int]) -> list[int]:
    """Rows whose generated tokens are each the argmax of the training-time forward (right padding, as in training)
    on the source plus the tokens before it, up to the row's first end token."""
    sources_ = [row["prompt_ids"] for row in tokenized]
    wrong, ended = set(), set()
    for k in range(max(len(g) for g in generated)):
        if net.is_encoder_decoder:  # the encoder input is the source; the decoder reads start + tokens so far
            encoder = pad(sources_, 0, max(map(len, sources_)), left=False)
            start = net.base_model.config.decoder_start_token_id
            decoder = torch.tensor([[start, *g[:k]] for g in generated])
            logits = net(encoder, encoder.ne(0).long(), decoder_input_ids=decoder).logits[:, -1]
        else:
            sequences = [src + g[:k] for src, g in zip(sources_, generated)]
            length = max(map(len, sequences))
            ids = pad(sequences, 0, length, left=False)
            mask = pad([[1] * len(x) for x in sequences], 0, length, left=False)
            out = net(ids, mask).logits  # [batch, m + length, vocab]: the prompt comes first
            last = torch.tensor([out.shape[1] - length + len(x) - 1 for x in sequences])
            logits = out[torch.arange(len(sequences)), last]
        for i, g in enumerate(generated):
            if i not in ended and int(logits[i].argmax()) != g[k]:
                wrong.add(i)
            if g[k] in eos:
                ended.add(i)
    return [i for i in range(len(generated)) if i not in wrong]


def _generate(net, backbone, rows):
    tokenized = tokenize(rows, backbone.tokenizer, backbone.is_encoder_decoder, S)
    batch = collate(tokenized, pad_token_id(backbone.tokenizer), backbone.is_encoder_decoder, for_generation=True)
    generated = net.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS).tolist()
    return tokenized, generated


def _eos(net) -> set[int]:
    eos = net.base_model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


def test_decoder_only_greedy_generation_is_the_argmax_chain_of_the_training_forward():
    net, backbone = large_offset_model(STORIES, 64)
    rows = sources()
    tokenized, generated = _generate(net, backbone, rows)
    assert len({len(r["prompt_ids"]) for r in tokenized}) > 1  # left padding is exercised
    assert all(len(g) == NEW_TOKENS for g in generated)  # stories260K never ends early: 20 tokens checked per row
    agree = argmax_chain_agrees(net, tokenized, generated, _eos(net))
    assert agree == list(range(ROWS)), f"{ROWS - len(agree)} of {ROWS} rows differ from the argmax chain"
    # the offset on generated tokens matters here: without it (the adapter's B zeroed past the source) the chain
    # would be another one; and the one loop used by evaluation, `dept predict` and `load_dept` gives the same text
    texts = generate_predictions(net, tokenized, backbone.tokenizer, False, batch_size=3, max_new_tokens=NEW_TOKENS)
    assert texts == [t.strip() for t in backbone.tokenizer.batch_decode(generated, skip_special_tokens=True)]


def test_t5_greedy_generation_is_the_argmax_chain_of_the_training_forward():
    """T5 is unaffected: the prompt and offset are on the encoder input, which generation encodes as training does."""
    net, backbone = large_offset_model("random:tiny-t5", 64)
    tokenized, generated = _generate(net, backbone, sources())
    agree = argmax_chain_agrees(net, tokenized, generated, _eos(net))
    assert agree == list(range(ROWS))


@pytest.mark.slow
def test_two_zero3_ranks_generate_the_argmax_chain(tmp_path):
    """`dept predict` on two ZeRO-3 ranks gives the texts of the argmax chain, both with the model gathered once per
    evaluation (each rank generates on its own; #24) and per layer (DEPT_GATHER_FRACTION=0: ZeRO-3's hooks gather
    every layer for every token, synced: ranks whose rows are done keep stepping); the rows are split over the ranks,
    so their batches differ in length."""
    net, backbone = large_offset_model(STORIES, 64)
    rows = sources(7)  # odd: one rank repeats a row
    tokenized, generated = _generate(net, backbone, rows)
    assert argmax_chain_agrees(net, tokenized, generated, _eos(net)) == list(range(len(rows)))
    expected = [t.strip() for t in backbone.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    adapters.save_adapter(net.prompt, tmp_path / "adapter", "stories260K")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": i, "source": r["source"]}) + "\n" for i, r in enumerate(rows)))
    args = ["predict", "--model", STORIES, "--adapter", str(tmp_path / "adapter"), "--data", str(data)]
    per_layer = {"DEPT_GATHER_FRACTION": "0"}
    for name, nproc, env in (("one", 1, {}), ("gathered-once", 2, {}), ("per-layer", 2, per_layer)):
        out = tmp_path / f"{name}.jsonl"
        words = [*args, "--output", str(out), "--max_new_tokens", str(NEW_TOKENS), "--batch_size", "2"]
        proc = run(words, nproc, "deepspeed" if nproc > 1 else "python", env=env)
        predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
        assert predictions == expected, name
        said = {"gathered-once": "the model gathered once: ", "per-layer": "the model per layer (ZeRO-3 hooks): "}
        if name in said:
            assert said[name] in proc.stderr, proc.stderr[-3000:]
