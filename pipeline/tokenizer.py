"""A small sentencepiece tokenizer trained on text shipped with the package, for backbones built from a config.

There is no model hub on test machines, so `random:` backbones need a tokenizer that is made locally. It is
trained once per cache directory (deterministically: same corpus, same options, one thread) and loaded as a
transformers `T5Tokenizer` (pad 0, eos 1, unk 2), which both tiny T5 and tiny LLaMA backbones use.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

from pipeline.cache import cache_root
from pipeline.errors import PipelineError

ASSETS = Path(__file__).parent / "assets"
VOCAB_SIZE = 1000
FIELD_NAMES = (
    "premise",
    "hypothesis",
    "sentence",
    "sentence1",
    "sentence2",
    "question",
    "passage",
    "context",
    "answer",
    "option1",
    "option2",
    "word",
    "text",
    "review",
    "paragraph",
    "choice1",
    "choice2",
)


def words() -> list[str]:
    return (ASSETS / "words.txt").read_text().split()


def corpus_lines(n_lines: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic 'field: text' sentences over the shipped word list, with digits and punctuation."""
    rng = random.Random(seed)
    vocab = words()
    punctuation = [".", ",", "?", "!", ";", "'", '"', "(", ")", "-", "*", "#", "_"]
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(1, 3)):
            sentence = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14)))
            parts.append(f"{rng.choice(FIELD_NAMES)}: {sentence.capitalize()}{rng.choice(punctuation)}")
        parts.append(str(rng.randint(0, 2000)) + " " + f"{rng.random() * 5:.1f}")
        lines.append(" ".join(parts))
    return lines


def trained_tokenizer(cache_dir: str | Path | None = None):
    """Train (or reuse) the shipped-text tokenizer and return it as a `T5Tokenizer`."""
    return _sentencepiece(corpus_lines(), VOCAB_SIZE, "tokenizer", cache_dir)


def data_tokenizer(data_dir: str | Path, vocab_size: int = 32000, cache_dir: str | Path | None = None):
    """A unigram SentencePiece of T5's vocabulary size trained on every text field of `<data_dir>/*/*.jsonl`.

    For measuring real length distributions where no hub tokenizer is available (`dept bench --tokenizer
    data-32k`): the 1,000-piece test tokenizer cuts English about 3x finer than T5's 32k SentencePiece; one of
    T5's size trained on the same kind of English text gives token counts of the same order (not identical: T5's
    was trained on C4). Deterministic; cached by the corpus digest.
    """
    files = sorted(Path(data_dir).glob("*/*.jsonl"))
    if not files:
        raise PipelineError(
            f"no <task>/<split>.jsonl files under {data_dir}: point --data_dir or $DEPT_DATA_DIR at "
            "the task data to train a data tokenizer"
        )
    from pipeline.tasks.readers import read_jsonl  # names a corrupt line by file and number

    lines = [
        value
        for file in files
        for row in read_jsonl(file)
        for value in row.values()
        if isinstance(value, str) and len(value) > 1
    ]
    return _sentencepiece(
        lines,
        vocab_size,
        f"data-tokenizer-{vocab_size}",
        cache_dir,
        input_sentence_size=1_000_000,
        shuffle_input_sentence=False,
    )  # the first 1M: deterministic


def _sentencepiece(lines: list[str], vocab_size: int, name: str, cache_dir: str | Path | None, **options):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    digest = hashlib.sha256(("\n".join(lines) + f"|{vocab_size}").encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"{name}-{digest}"
    if not (target / "spiece.model").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="tok-", dir=root))
        (work / "corpus.txt").write_text("\n".join(line.replace("\n", " ") for line in lines))
        spm.SentencePieceTrainer.train(
            input=str(work / "corpus.txt"),
            model_prefix=str(work / "spiece"),
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=1,
            hard_vocab_limit=False,
            minloglevel=2,
            **options,
        )
        (work / "corpus.txt").unlink()
        try:  # several ranks may race here: the first rename wins, the others' identical copies are dropped
            os.rename(work, target)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    return T5Tokenizer.from_pretrained(str(target), extra_ids=0)
