"""Tokenization, sequence format, truncation and padding with the real tokenizers (no trained-on-a-few-words ones):
the LLaMA-2 32k SentencePiece (BOS 1, EOS 2, no pad, adds BOS; "1" is two pieces) and T5's (EOS 1, pad 0).

Decoder-only rows follow the authors' sequence `<s> source Label : target </s>` with the loss on `target </s>`;
T5 rows keep their closing EOS on both sides, also when truncated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline.data import DECODER_SEPARATOR, IGNORE, collate, global_batch, pad_token_id, split_separator, tokenize
from pipeline.errors import PipelineError

# The real tokenizers are read where they lie (../shared/weights, see its SOURCES.md), never copied into the repository:
# LLaMA-2's is under Meta's Llama 2 Community License; T5's (Apache-2.0) is 0.8 MB of SentencePiece model.
WEIGHTS = Path(__file__).resolve().parent.parent.parent / "shared" / "weights"
LLAMA_TOKENIZER = WEIGHTS / "llama2_tokenizer"
T5_TOKENIZER = WEIGHTS / "t5_tokenizer"
STORIES = Path(__file__).resolve().parent.parent / "pipeline" / "models" / "stories260K"  # shipped (MIT, llama2.c)
WHERE = {
    LLAMA_TOKENIZER: "the LLaMA-2 tokenizer (tokenizer.model of meta-llama/Llama-2-7b-hf or karpathy/llama2.c; "
    "Llama 2 Community License, not redistributed here) as a transformers LlamaTokenizer directory",
    T5_TOKENIZER: "the T5 tokenizer (spiece.model of the hub's t5-base, Apache-2.0) as a transformers T5Tokenizer "
    "directory",
}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        pytest.skip(
            f"{path} not found: put {WHERE.get(path, 'the tokenizer')} there (../shared/weights beside the checkout)"
        )
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def llama():
    return _tokenizer(LLAMA_TOKENIZER)


@pytest.fixture(scope="module")
def t5():
    return _tokenizer(T5_TOKENIZER)


# ids of the LLaMA-2 tokenizer, checked against the tokenizer below
BOS, EOS, UNK = 1, 2, 0
SENTENCE_THE_CAT = [10541, 29901, 278, 6635]  # "sentence: the cat" -> ▁sentence : ▁the ▁cat
LABEL_COLON = [15796, 584]  # " Label :" -> ▁Label ▁:
ONE = [29871, 29896]  # " 1" -> ▁ 1 (a lone space piece, then the digit)


def test_the_real_tokenizers_are_the_ones_these_tests_assume(llama, t5):
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id, llama.unk_token_id) == (BOS, EOS, None, UNK)
    assert llama("1")["input_ids"] == [BOS, *ONE]
    assert llama("sentence: the cat Label :", add_special_tokens=False)["input_ids"] == SENTENCE_THE_CAT + LABEL_COLON
    assert (t5.eos_token_id, t5.pad_token_id) == (1, 0) and t5("1")["input_ids"] == [209, 1]


def test_llama_sequence_is_bos_source_separator_target_eos(llama):
    (row,) = tokenize([{"source": "sentence: the cat", "target": "1"}], llama, False, max_length=64)
    prompt = [BOS, *SENTENCE_THE_CAT, *LABEL_COLON]
    assert row["input_ids"] == prompt + ONE + [EOS]
    assert row["labels"] == [IGNORE] * len(prompt) + ONE + [EOS]  # loss on target + EOS only
    assert row["prompt_ids"] == prompt  # generation starts right after the separator
    assert row["input_ids"].count(BOS) == 1  # no second BOS in front of the target
    # prompt + target is exactly how the tokenizer reads the whole text `source Label : target`
    assert row["input_ids"][:-1] == llama("sentence: the cat Label : 1")["input_ids"]
    assert DECODER_SEPARATOR == " Label : "


def test_llama_word_target_gets_its_natural_leading_space_piece(llama):
    (row,) = tokenize([{"source": "sentence: great movie", "target": "positive"}], llama, False, max_length=64)
    target = [i for i in row["labels"] if i != IGNORE]
    assert target == [6374, EOS]  # ▁positive, EOS
    assert row["input_ids"][:-1] == llama("sentence: great movie Label : positive")["input_ids"]


@pytest.mark.parametrize("separator", ["\nAnswer:", " => ", ""])
def test_separator_is_configurable(llama, separator):
    (row,) = tokenize([{"source": "sentence: the cat", "target": "1"}], llama, False, 64, separator=separator)
    core, gap = split_separator(separator)
    assert row["prompt_ids"] == llama("sentence: the cat" + core)["input_ids"]
    target = row["input_ids"][len(row["prompt_ids"]) :]
    assert target == llama(gap + "1", add_special_tokens=False)["input_ids"] + [EOS]
    assert row["labels"] == [IGNORE] * len(row["prompt_ids"]) + target


def test_llama_long_source_is_cut_keeping_bos_separator_target_and_eos(llama, caplog):
    long = "sentence: " + " ".join(["the cat sat on the mat"] * 20)
    rows = [{"source": long, "target": "1"}, {"source": "sentence: the cat", "target": "1"}]
    with caplog.at_level(logging.WARNING):
        cut, short = tokenize(rows, llama, False, max_length=16)
    assert len(cut["input_ids"]) == 16
    full = llama(long)["input_ids"]
    # BOS and the source's first tokens, then the whole separator, the target and EOS
    assert cut["input_ids"] == full[: 16 - 2 - 3] + LABEL_COLON + ONE + [EOS]
    assert cut["labels"] == [IGNORE] * 13 + ONE + [EOS]
    assert cut["prompt_ids"] == cut["input_ids"][:13]
    assert short["input_ids"] == [BOS, *SENTENCE_THE_CAT, *LABEL_COLON, *ONE, EOS]  # untouched
    assert "1 of 2 inputs are longer than max_length s=16" in caplog.text


def test_max_length_too_small_for_separator_and_target_is_one_line_error(llama):
    with pytest.raises(PipelineError, match="raise max_length") as err:
        tokenize([{"source": "sentence: " + "the cat " * 10, "target": "1"}], llama, False, max_length=5)
    assert "\n" not in str(err.value)


def test_llama_long_target_keeps_eos(llama, caplog):
    answer = "the red fox jumped over the lazy dog and ran away"
    with caplog.at_level(logging.WARNING):
        (row,) = tokenize(
            [{"source": "question: what happened", "target": answer}], llama, False, max_length=64, max_target_length=4
        )
    target = [i for i in row["labels"] if i != IGNORE]
    assert target == llama(" " + answer, add_special_tokens=False)["input_ids"][:3] + [EOS]
    assert "targets are longer than max_target_length 4" in caplog.text


def test_t5_rows_keep_their_eos_on_both_sides(t5):
    (row,) = tokenize([{"source": "sentence: the cat", "target": "1"}], t5, True, max_length=64)
    assert row["input_ids"] == row["prompt_ids"] == [7142, 10, 8, 1712, 1]
    assert row["labels"] == [209, 1]


def test_t5_truncated_source_and_long_answer_keep_the_closing_eos(t5):
    answer = "the Treaty of Westphalia signed in 1648 ended the Thirty Years War"
    (row,) = tokenize(
        [{"source": "question: " + "what ended the war " * 10, "target": answer}],
        t5,
        True,
        max_length=8,
        max_target_length=6,
    )
    assert len(row["input_ids"]) == 8 and row["input_ids"][-1] == 1
    assert row["labels"] == t5(answer)["input_ids"][:5] + [1]  # MRQA-style answer: cut, EOS kept
    assert row["labels"].count(1) == 1


def test_tokenizer_that_appends_eos_in_decoder_only_mode_gets_one_eos_at_the_end(t5):
    """The random tiny-llama preset uses a T5-style tokenizer (EOS appended, no BOS): the source's EOS goes."""
    (row,) = tokenize([{"source": "sentence: the cat", "target": "1"}], t5, False, max_length=64)
    prompt = t5("sentence: the cat Label :", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + [209, 1]
    assert row["labels"] == [IGNORE] * len(prompt) + [209, 1]
    assert row["input_ids"].count(1) == 1


def test_generation_batch_is_left_padded_and_training_batch_right_padded(llama):
    rows = tokenize(
        [
            {"source": "sentence: the cat", "target": "1"},
            {"source": "sentence: the cat sat on the mat all day", "target": "positive"},
        ],
        llama,
        False,
        64,
    )
    pad = pad_token_id(llama)
    assert pad == UNK  # no pad token in LLaMA-2: unk stands in, EOS keeps its one meaning
    gen = collate(rows, pad, False, for_generation=True)
    short, long = (len(r["prompt_ids"]) for r in rows)
    assert gen["input_ids"].shape == (2, long)
    assert gen["input_ids"][0].tolist() == [pad] * (long - short) + rows[0]["prompt_ids"]
    assert gen["attention_mask"][0].tolist() == [0] * (long - short) + [1] * short
    assert gen["input_ids"][:, -1].tolist() == [LABEL_COLON[-1]] * 2  # every row ends where generation starts
    train = collate(rows, pad, False)
    width = max(len(r["input_ids"]) for r in rows)
    assert train["input_ids"][0].tolist() == rows[0]["input_ids"] + [pad] * (width - len(rows[0]["input_ids"]))
    assert train["labels"][0].tolist() == rows[0]["labels"] + [IGNORE] * (width - len(rows[0]["labels"]))
    assert train["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    padded = collate(rows, pad, False, pad_to=32)
    assert padded["input_ids"].shape == padded["labels"].shape == (2, 32)


def test_t5_training_batch_pads_labels_to_the_longest_target(t5):
    rows = tokenize(
        [{"source": "sentence: a", "target": "1"}, {"source": "question: b", "target": "a long answer"}], t5, True, 64
    )
    batch = collate(rows, pad_token_id(t5), True)
    assert pad_token_id(t5) == 0
    assert batch["labels"].shape == (2, len(rows[1]["labels"]))
    assert batch["labels"][0].tolist() == [209, 1] + [IGNORE] * (len(rows[1]["labels"]) - 2)


def test_pad_fallback_order_pad_then_unk_then_eos(llama):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(LLAMA_TOKENIZER))
    bare.unk_token = None
    assert bare.pad_token_id is None and bare.unk_token_id is None
    assert pad_token_id(bare) == EOS
    padded = AutoTokenizer.from_pretrained(str(LLAMA_TOKENIZER))
    padded.pad_token = "<s>"
    assert pad_token_id(padded) == BOS
    assert pad_token_id(llama) == UNK


def test_cache_reuses_rows_and_keys_on_the_separator(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPT_CACHE", str(tmp_path))
    rows = [{"source": "sentence: the cat", "target": "1"}]
    first = tokenize(rows, llama, False, 64)
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 1
    assert tokenize(rows, llama, False, 64) == first
    other = tokenize(rows, llama, False, 64, separator=" Answer: ")
    assert other != first and len(list((tmp_path / "tokenized").glob("*.arrow"))) == 2


def test_label_scoring_sums_the_target_and_eos_log_probabilities():
    """Score mode ranks labels by log p(target + EOS | prompt): checked against the plain transformers model."""
    import importlib

    from transformers import AutoModelForCausalLM

    try:
        from pipeline.model import DePTModel
    except ImportError:
        from pipeline.backbone import DePTModel
    try:
        evaluation = importlib.import_module("pipeline.evaluation")
    except ImportError:
        evaluation = importlib.import_module("pipeline.evaluate")

    tokenizer = _tokenizer(STORIES)
    net = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    rows = tokenize(
        [
            {"source": "story: Lily had a cat.", "target": "cat"},
            {"source": "story: Tom went to the park with mom.", "target": "park"},
        ],
        tokenizer,
        False,
        64,
    )
    batch = collate(rows, pad_token_id(tokenizer), False)
    with torch.no_grad():
        scores = evaluation._sequence_log_likelihood(DePTModel(net, None, False), batch)
        for row, score in zip(rows, scores):
            ids = torch.tensor([row["input_ids"]])
            logprobs = net(ids).logits.log_softmax(-1)[0]
            start = len(row["prompt_ids"])
            expected = sum(logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
            assert row["input_ids"][-1] == tokenizer.eos_token_id
            torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    # stories260K never saw EOS: the scored EOS term alone costs it tens of nats (what a prompt must overcome)
    assert float(scores.max()) < -20


def test_global_batch_is_deterministic_and_covers_an_epoch():
    order = [i for step in range(4) for i in global_batch(32, 8, step, seed=5)]
    assert sorted(order) == list(range(32))
    assert global_batch(32, 8, 1, seed=5) == global_batch(32, 8, 1, seed=5)
    assert global_batch(32, 8, 4, seed=5) != global_batch(32, 8, 0, seed=5)  # the next epoch reshuffles
