"""Synthetic tasks in TinyStories vocabulary, for a real pretrained tiny LM (stories260K): no data files, no network.

Every example is a three-to-four sentence story in the words a TinyStories model knows; the tasks ask for one
slot of the same story, and the slot is not named in the input (the prompt has to say which one):

    story: Once upon a time, there was a little girl named Lily. She had a red cat. They went to the park.
        stories-who    -> "Lily"      stories-animal -> "cat"      stories-place -> "park"

    story: There was a girl called Sue. She had a red cat. One day, Sue found a little dog. They went to the lake.
        stories-had    -> "cat"       stories-saw    -> "dog"

A frozen LM that was pretrained on such stories can copy a word it has just read; what a soft prompt must add is
*which* word, the answer format (one word, then the end token) and nothing after it. stories260K never saw
`</s>` (its EOS row equals ~170 untrained rows), so prompt methods answer with `<s>` as the end token, declared
by the model directory (docs/real_backbone.md). The tasks share their inputs and their format, which makes them
a few-shot transfer setting: a source adapter trained on `stories-animal` knows the format and how to copy an
animal; `stories-had` / `stories-saw` add a second animal and ask for one of the two, which k examples must
teach. Rows are generated deterministically per (task, split): the same on every machine.
"""

from __future__ import annotations

import random
from functools import partial

from pipeline.errors import PipelineError
from pipeline.tasks.task import Task

GIRLS = ("Lily", "Sue", "Anna", "Mia")
BOYS = ("Tom", "Ben", "Tim", "Max")
ANIMALS = ("cat", "dog", "bird", "fish", "frog", "duck", "bunny", "bear")
PLACES = ("park", "beach", "store", "school", "garden", "forest", "lake", "farm")
COLORS = ("red", "blue", "green", "yellow", "pink", "brown")
FEELINGS = ("happy", "sad", "scared", "excited")

INTROS = (
    "Once upon a time, there was a little {kind} named {name}.",
    "{name} was a little {kind}.",
    "There was a {kind} called {name}.",
)
ANIMAL_LINES = (
    "{Pron} had a {color} {animal}.",
    "{name} saw a {color} {animal}.",
    "One day, {name} found a little {animal}.",
)
PLACE_LINES = (
    "They went to the {place}.",
    "{Pron} liked to play at the {place}.",
    "One day, {name} went to the {place} with mom.",
)
FEELING_LINES = ("{name} was very {feeling}.", "{Pron} felt {feeling}.")
# two-animal stories: one animal is owned, another one is seen; the verb, not the position, tells them apart
HAD_LINES = ("{Pron} had a {color} {had}.", "{name} had a pet {had}.")
SAW_LINES = ("{name} saw a {saw}.", "One day, {name} found a little {saw}.", "{Pron} saw a big {saw} at the {place}.")

# task name -> the slot its answer comes from
STORY_TASKS: dict[str, str] = {
    "stories-who": "name",
    "stories-animal": "animal",
    "stories-place": "place",
    "stories-had": "had",  # two animals in the story: the one the child has
    "stories-saw": "saw",  # two animals in the story: the one the child sees or finds
}
SLOT_LABELS = {"name": GIRLS + BOYS, "animal": ANIMALS, "place": PLACES, "had": ANIMALS, "saw": ANIMALS}
TWO_ANIMALS = ("had", "saw")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
SPLIT_SALT = {"train": 1, "validation": 2, "test": 3}


def story_task(name: str) -> Task:
    """The registered `Task` of a stories task: classification over its slot's words, accuracy, rows generated
    per split (train/validation/test), no files, no hub."""
    if name not in STORY_TASKS:
        raise PipelineError(f"unknown stories task {name!r}: choose one of {', '.join(STORY_TASKS)}")
    return Task(
        name=name,
        hub_path=None,
        hub_config=None,
        input_fields=("story",),
        label_column="label",
        labels=SLOT_LABELS[STORY_TASKS[name]],
        metrics=("accuracy",),
        split_rule="original",
        kind="classification",
        generate=partial(story_rows, name),
    )


def story(rng: random.Random, slots: dict[str, str]) -> str:
    """One story holding every slot; sentence templates and the order of the middle sentences vary. With `had` and
    `saw` slots the story has two animals (one sentence each) instead of one."""
    girl = slots["name"] in GIRLS
    fill = dict(slots, kind="girl" if girl else "boy", Pron="She" if girl else "He")
    animals = [rng.choice(HAD_LINES), rng.choice(SAW_LINES)] if "had" in slots else [rng.choice(ANIMAL_LINES)]
    middle = [*animals, rng.choice(PLACE_LINES)]
    rng.shuffle(middle)
    lines = [rng.choice(INTROS), *middle]
    if rng.random() < 0.5:
        lines.append(rng.choice(FEELING_LINES))
    return " ".join(line.format(**fill) for line in lines)


def story_rows(name: str, split: str, n: int | None = None) -> list[dict]:
    """Rendered rows `{id, source, target}`; the answers cycle through the slot's words (balanced classes), the
    other slots are drawn at random. Deterministic per (task, split); splits of one task never share a seed, and
    different tasks draw different stories."""
    slot = STORY_TASKS[name]
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name)) * 1009 + SPLIT_SALT[split]
    rng = random.Random(seed)
    labels = SLOT_LABELS[slot]
    rows = []
    for i in range(n or SPLIT_SIZES[split]):
        slots = {
            "name": rng.choice(GIRLS + BOYS),
            "animal": rng.choice(ANIMALS),
            "place": rng.choice(PLACES),
            "color": rng.choice(COLORS),
            "feeling": rng.choice(FEELINGS),
        }
        slots[slot] = labels[i % len(labels)]
        if slot in TWO_ANIMALS:  # the other animal of the story: a different one
            other = TWO_ANIMALS[1 - TWO_ANIMALS.index(slot)]
            slots[other] = rng.choice([a for a in ANIMALS if a != slots[slot]])
        rows.append({"id": i, "source": f"story: {story(rng, slots)}", "target": slots[slot]})
    rng.shuffle(rows)
    return rows
