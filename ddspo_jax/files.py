"""Files a command reads or a later command trusts: one JSONL reader whose errors name the file, line and key,
and writes that are never half-written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from ddspo_jax.errors import DataError


def iter_jsonl(path, required: Sequence[str] = (), *, blank: bool = False, what: str = ""
               ) -> Iterator[tuple[int, dict | None]]:
    """(line number, object) for each line of a JSONL file; a blank line is skipped, or yields (n, None) with
    `blank` (where a caller counts lines). A line that is not JSON, not an object, or lacks a `required` key is
    a DataError naming `path:line` and the key (and `what` the line should be), never a traceback."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                if blank:
                    yield lineno, None
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a JSON object is expected, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise DataError(f"{path}:{lineno}: {f'not {what}: ' if what else ''}field {missing[0]!r} missing "
                                f"(keys here: {sorted(obj)})")
            yield lineno, obj


def write_text_atomic(path, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it over `path` (pathlib or etils.epath):
    a kill mid-write leaves the old file or none, never a truncated one that a re-run would read."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
