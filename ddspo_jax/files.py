"""Writing files that a later command trusts: never half-written."""

from __future__ import annotations

import os


def write_text_atomic(path, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it over `path` (pathlib or etils.epath):
    a kill mid-write leaves the old file or none, never a truncated one that a re-run would read."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
