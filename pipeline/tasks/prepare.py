"""Task-specific text preparation applied to a row before its fields are joined into the source.

These follow the authors' templates (T5 conventions) but work on character offsets instead of building
regular expressions from the data, so spans with regex metacharacters cannot break them.
"""

from __future__ import annotations

import re

from pipeline.errors import PipelineError

_WORD = re.compile(r"\S+")


def _word_start(text: str, index: object, span: str) -> int:
    """Character offset of the whitespace-separated word number `index`, checked to start with `span`."""
    starts = [match.start() for match in _WORD.finditer(text)]
    index = int(index) if str(index).isdigit() else -1  # CSV gives "13"; anything else is no word index
    if not 0 <= index < len(starts) or not text.startswith(span, starts[index]):
        raise PipelineError(f"WSC span {span!r} is not at word {index} of the text {text[:60]!r}...")
    return starts[index]


def mark_wsc_spans(row: dict) -> dict:
    """WSC: surround the noun (span1) with `*` and the pronoun (span2) with `#`, as T5 and the authors do.

    "Mark told Pete ... He should ..." -> "* Mark * told Pete ... # He # should ...". Marks are inserted
    right-to-left so the first insertion does not shift the second offset.
    """
    text = row["text"]
    spans = [
        (_word_start(text, row["span1_index"], row["span1_text"]), row["span1_text"], "*"),
        (_word_start(text, row["span2_index"], row["span2_text"]), row["span2_text"], "#"),
    ]
    for start, span, mark in sorted(spans, reverse=True):
        end = start + len(span)
        text = f"{text[:start]}{mark} {text[start:end]} {mark}{text[end:]}"
    return {**row, "text": text}


def strip_multirc_markup(row: dict) -> dict:
    """MultiRC: drop the HTML markup of the SuperGLUE files (`<br>` -> space, `<b>`/`</b>` removed), like T5."""

    def clean(text: str) -> str:
        return re.sub(r"</?b>", "", text.replace("<br>", " "))

    return {**row, **{column: clean(row[column]) for column in ("question", "answer", "paragraph")}}
