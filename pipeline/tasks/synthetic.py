"""Synthetic tasks for the quickstart: generated deterministically, no data files, no network.

A frozen *random* backbone teaches a prompt method nothing, so the quickstart first warms a tiny T5 up by full
fine-tuning on a mixture of rule-following tasks, then freezes it and trains DePT. Every example is a
paper-style input (`"field: text"`) over the shipped word list with a "0"/"1" target:

    rule: animal sentence: the red fox sat by a boat          -> "1"  (mentions an animal)
    rule: not food sentence: cheese and bread on the table    -> "0"

Warm-up tasks spell the rule out (`rule: ...`). DePT tasks leave it out (`sentence: ...` only): the prompt has
to play the part of the rule, which is what prompt tuning can do on a backbone that learned to follow rules.
The source task and the target tasks use rule combinations that the warm-up never showed without a rule, and
the targets are held apart from the source.
"""

from __future__ import annotations

import random
from functools import partial

from pipeline.errors import PipelineError
from pipeline.tasks.task import Task

CATEGORIES = {
    "animal": "cat dog bird fish horse cow sheep mouse lion tiger bear wolf fox rabbit duck goose snake frog bee ant",
    "color": "red blue green yellow black white brown gray pink purple",
    "food": "bread cheese milk coffee tea wine beer apple banana rice meat egg sugar salt soup cake",
    "vehicle": "car bus train plane boat ship bike truck",
    "number": "one two three four five six seven eight nine ten hundred thousand",
}
FILLER = (
    "the a and of on in with by near under over to from at this that is was very big small old new good "
    "bad happy sad house room street city day night man woman child book letter song story"
).split()

# name -> (rule shown in the input or None, category, negated)
SYNTHETIC_TASKS: dict[str, tuple[str | None, str, bool]] = {
    # warm-up mixture (rule given in the input)
    "syn-warm-animal": ("animal", "animal", False),
    "syn-warm-color": ("color", "color", False),
    "syn-warm-food": ("food", "food", False),
    "syn-warm-vehicle": ("vehicle", "vehicle", False),
    "syn-warm-number": ("number", "number", False),
    # DePT source task (no rule in the input)
    "syn-source-animal": (None, "animal", False),
    # held-apart targets (no rule in the input)
    "syn-target-food": (None, "food", False),
    "syn-target-vehicle": (None, "vehicle", False),
}
WARMUP_TASKS = [name for name in SYNTHETIC_TASKS if name.startswith("syn-warm-")]
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}


def synthetic_task(name: str) -> Task:
    """The registered `Task` of a synthetic task: its rows are generated per split, no files, no hub."""
    if name not in SYNTHETIC_TASKS:
        raise PipelineError(f"unknown synthetic task {name!r}: choose one of {', '.join(SYNTHETIC_TASKS)}")
    return Task(
        name=name,
        hub_path=None,
        hub_config=None,
        input_fields=("sentence",),
        label_column="label",
        labels=("0", "1"),
        metrics=("accuracy",),
        split_rule="original",
        kind="classification",
        generate=partial(synthetic_rows, name),
    )


def _sentence(rng: random.Random, category: str, positive: bool) -> str:
    """Filler words, plus one or two words of `category` when positive; distractors from other categories."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    others = [c for c in CATEGORIES if c != category]
    for _ in range(rng.randint(1, 2)):  # distractors: the model must tell categories apart, not spot nouns
        words.insert(rng.randrange(len(words) + 1), rng.choice(CATEGORIES[rng.choice(others)].split()))
    if positive:
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(CATEGORIES[category].split()))
    return " ".join(words)


def synthetic_rows(name: str, split: str, n: int | None = None) -> list[dict]:
    """Rendered rows `{id, source, target}`, balanced, the same on every machine for a (task, split)."""
    if split not in SPLIT_SIZES:
        raise PipelineError(f"synthetic task {name!r} has no split {split!r}: it has {', '.join(SPLIT_SIZES)}")
    rule, category, negated = SYNTHETIC_TASKS[name]
    seed = sum(ord(c) for c in f"{name}/{split}") * 7919 + len(split)
    rng = random.Random(seed)
    rows = []
    for i in range(n or SPLIT_SIZES[split]):
        mentions = i % 2 == 0
        source = f"sentence: {_sentence(rng, category, mentions)}"
        if rule:
            source = f"rule: {rule} {source}"
        rows.append({"id": i, "source": source, "target": "1" if mentions != negated else "0"})
    rng.shuffle(rows)
    return rows
