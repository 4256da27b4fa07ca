"""Where the pipeline keeps what it can rebuild: trained tokenizers, tokenized datasets.

$DEPT_CACHE if set, else ~/.cache/dept-pipeline. Entries are keyed by content hashes and written atomically, so
several ranks and runs share them safely.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DEPT_CACHE") or Path.home() / ".cache" / "dept-pipeline")
