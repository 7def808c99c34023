"""Files a command reads or a later command trusts: one JSONL reader whose errors name the file, line and key,
and writes that are never half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

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


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temp_beside(path):
    """The name a write to `path` goes to first (then renamed over `path`): hidden, and carrying the writer's
    pid so that `remove_orphan_temps` can tell a dead writer's leftover from a live writer's file."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_temps(folder, name: str | None = None) -> list[str]:
    """Deletes the `temp_beside` files in `folder` whose writer is no longer running (a SIGKILL or power cut
    skips every `finally`), so a re-run leaves nothing half-written behind; returns their names. A file of a
    live process -- another command writing into the same folder -- is left alone. With `name`, only the
    leftovers of writes to `folder / name` (for a folder the user owns, like an export's parent)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for item in folder.iterdir():
        m = TEMP_NAME.match(item.name)
        if not m or (name is not None and m["name"] != name) or (
                int(m["pid"]) != os.getpid() and _alive(int(m["pid"]))):
            continue
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        gone.append(item.name)
    return gone


def write_text_atomic(path, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it over `path` (pathlib or etils.epath):
    a kill mid-write leaves the old file or none, never a truncated one that a re-run would read."""
    tmp = temp_beside(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
