"""Task-specific row transforms applied before a row's fields are joined into the source text.

They follow the authors' templates (T5 conventions) but work on character offsets instead of building
regular expressions from the data, so spans with regex metacharacters cannot break them.
"""

from __future__ import annotations

import re

from pipeline.errors import PipelineError

_WORD = re.compile(r"\S+")


def _span_start(text: str, index: object, span: str) -> int:
    """Character offset of whitespace-separated word number `index`, checked to start with `span`.

    The comparison ignores case: about 15% of SuperGLUE `wsc.fixed` rows write the span in another case than
    the text at its index (span "the lawyer", text "The lawyer asked ..."). The authors' regex matched case
    exactly and left those rows unmarked; here they are marked, keeping the text's own spelling.
    """
    starts = [match.start() for match in _WORD.finditer(text)]
    index = int(index) if str(index).isdigit() else -1  # CSV gives "13"; anything else is no word index
    if not span or not 0 <= index < len(starts):
        raise PipelineError(f"WSC span {span!r} is not at word {index} of the text {text[:60]!r}...")
    start = starts[index]
    if text[start : start + len(span)].lower() != span.lower():
        raise PipelineError(f"WSC span {span!r} is not at word {index} of the text {text[:60]!r}...")
    return start


def mark_wsc_spans(row: dict) -> dict:
    """WSC: surround the noun (span1) with `*` and the pronoun (span2) with `#`, as T5 and the authors do.

    "Mark told Pete ... He should ..." -> "* Mark * told Pete ... # He # should ...". A span inside the other
    (pronoun "their" inside noun "their mothers") nests: "* # their # mothers *". Spans that cross without
    one containing the other cannot be marked unambiguously and raise `PipelineError` (the row is then
    handled by the task's bad-row policy).
    """
    text = row["text"]
    noun_start = _span_start(text, row["span1_index"], row["span1_text"])
    pronoun_start = _span_start(text, row["span2_index"], row["span2_text"])
    noun = (noun_start, noun_start + len(row["span1_text"]), "*")
    pronoun = (pronoun_start, pronoun_start + len(row["span2_text"]), "#")
    # The outer span is the one that starts first, or the longer one (the noun when both are equal).
    outer, inner = sorted((noun, pronoun), key=lambda s: (s[0], -(s[1] - s[0]), s[2] == "#"))
    if outer[0] < inner[0] < outer[1] < inner[1]:
        raise PipelineError(f"WSC spans {row['span1_text']!r} and {row['span2_text']!r} overlap without nesting")
    # Insertions as (offset, rank, text): at one offset closing marks come before opening ones, the inner span
    # closes first and the outer span opens first, so marks always nest.
    inserts = [
        (outer[0], 2, f"{outer[2]} "),
        (inner[0], 3, f"{inner[2]} "),
        (inner[1], 0, f" {inner[2]}"),
        (outer[1], 1, f" {outer[2]}"),
    ]
    for offset, _, mark in sorted(inserts, key=lambda item: (-item[0], -item[1])):
        text = text[:offset] + mark + text[offset:]
    return {**row, "text": text}


def strip_multirc_markup(row: dict) -> dict:
    """MultiRC: drop the HTML markup of the SuperGLUE files (`<br>` -> space, `<b>`/`</b>` removed), like T5."""

    def clean(text: str) -> str:
        return re.sub(r"</?b>", "", text.replace("<br>", " "))

    return {**row, **{column: clean(row[column]) for column in ("question", "answer", "paragraph")}}
