"""README.md as data: its code blocks in order (with the markers that say which ones CI does not run) and its
generated sections (numbers copied from files the project writes).

    python tests/support/readme.py --check        # the generated sections equal their files (what the README test checks)
    python tests/support/readme.py --write        # copy docs/results/*.md into README.md's generated sections
    python tests/support/readme.py --regenerate   # re-run what produces those files on this machine, then --write

Markers, each on the line before what it marks:
    <!-- readme: not run (why) -->            the next code block is not run by the README test (needs GPUs, ...)
    <!-- readme: generated from FILE -->      the lines up to <!-- readme: end generated --> are FILE's content
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
NOT_RUN = re.compile(r"<!-- readme: not run \((.+)\) -->")
GENERATED = re.compile(r"<!-- readme: generated from (\S+) -->")
END = "<!-- readme: end generated -->"
# What --regenerate runs, in a scratch folder, on this machine: each writes the file the README shows.
PRODUCERS = {
    "docs/results/quickstart.md": (
        ["dept", "run", "quickstart", "--output_dir=runs/quickstart"],
        "runs/quickstart/summary.md",
    ),
    "docs/results/methods_small.md": (
        ["dept", "run", "methods_small", "--output_dir=runs/methods_small"],
        "runs/methods_small/methods.md",
    ),
}


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason, when marked


def blocks(text: str | None = None) -> list[Block]:
    lines = (text if text is not None else README.read_text()).splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        marker = next(
            (NOT_RUN.match(lines[j].strip()) for j in range(start - 1, max(start - 3, -1), -1) if lines[j].strip()),
            None,
        )
        found.append(Block(fence.group(1), "\n".join(body) + "\n", start + 1, marker.group(1) if marker else None))
        i += 1
    return found


def generated_sections(text: str | None = None) -> list[tuple[str, str]]:
    """(file, the README's copy of it) for every generated section."""
    text = text if text is not None else README.read_text()
    return [(m.group(1), text[m.end() : text.index(END, m.end())].strip("\n")) for m in GENERATED.finditer(text)]


def write() -> None:
    text = README.read_text()
    for match in reversed(list(GENERATED.finditer(text))):
        body = (REPO / match.group(1)).read_text().strip("\n")
        end = text.index(END, match.end())
        text = text[: match.end()] + "\n" + body + "\n" + text[end:]
    README.write_text(text)


def as_section(markdown: str) -> str:
    """A recipe's summary.md as a README section: its title dropped, its headings below the README's."""
    lines = markdown.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("###" + line[1:] if line.startswith("## ") else line for line in lines).strip("\n") + "\n"


def regenerate() -> None:
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="dept-readme-"))
    for target, (command, produced) in PRODUCERS.items():
        subprocess.run(command, cwd=scratch, check=True)
        (REPO / target).parent.mkdir(parents=True, exist_ok=True)
        (REPO / target).write_text(as_section((scratch / produced).read_text()))
    shutil.rmtree(scratch, ignore_errors=True)
    write()


def main(argv: list[str]) -> int:
    if "--regenerate" in argv:
        regenerate()
    elif "--write" in argv:
        write()
    stale = [f for f, body in generated_sections() if body != (REPO / f).read_text().strip("\n")]
    for name in stale:
        print(f"README.md is out of date with {name}: run python tests/support/readme.py --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
