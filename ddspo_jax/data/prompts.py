"""Prompt sources: plain text, JSONL, CSV and Parquet files, read into a clean list of prompts.

DDSPO makes its own preference pairs from prompts alone, so the prompt file is the whole input of data
preparation. The order of the returned prompts is the file order (after dropping empties and duplicates):
a prompt's position in that list is its *index*, which seeds its perturbation and its sampling noise, so
the same file always gives the same data.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable, Iterator

from ddspo_jax.errors import DataError, MissingFileError
from ddspo_jax.files import iter_jsonl

__all__ = ["PromptStats", "load_prompts", "iter_raw_prompts", "clean_prompts"]


@dataclasses.dataclass
class PromptStats:
    """What happened while reading a prompt source (for the caller's summary)."""

    path: str = ""
    read: int = 0  # rows/lines seen
    empty: int = 0  # dropped: empty or whitespace-only (or null)
    duplicates: int = 0  # dropped: same text as an earlier prompt (after whitespace normalisation)
    kept: int = 0

    def summary(self) -> str:
        return (f"{self.path}: {self.read} read, {self.kept} kept, "
                f"{self.empty} empty and {self.duplicates} duplicate dropped")


_TEXT = (".txt", ".text", ".prompts")
_JSONL = (".jsonl", ".ndjson")
_CSV = (".csv", ".tsv")
_PARQUET = (".parquet", ".pq")


def _kind(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt.lower()
    low = path.lower()
    for kind, exts in (("text", _TEXT), ("jsonl", _JSONL), ("csv", _CSV), ("parquet", _PARQUET)):
        if low.endswith(exts):
            return kind
    raise DataError(f"{path}: cannot tell the prompt file format from its extension; pass format= one of "
                     "'text', 'jsonl', 'csv', 'parquet'")


def iter_raw_prompts(path: str | os.PathLike, *, field: str | None = None, format: str | None = None
                     ) -> Iterator[str | None]:
    """Yields the raw prompt of each line/row, unfiltered (None for a null value).

    `field` names the JSONL key or CSV/Parquet column (default "prompt"); plain text has one prompt per line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"prompt file not found: {path}")
    kind = _kind(path, format)
    name = field or "prompt"
    if kind == "text":
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    elif kind == "jsonl":
        for lineno, row in iter_jsonl(path, blank=True):
            if row is not None and name not in row:
                raise DataError(f"{path}:{lineno}: field {name!r} missing (pass field= to choose another; "
                                f"keys here: {sorted(row)})")
            value = None if row is None else row[name]
            yield None if value is None else str(value)
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            if reader.fieldnames is None or name not in reader.fieldnames:
                raise DataError(f"{path}: column {name!r} missing (pass field= to choose another; "
                               f"columns: {reader.fieldnames})")
            for row in reader:
                yield row[name]
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading Parquet prompt files needs pyarrow; install it with "
                              "`pip install pyarrow` (or convert the file to JSONL/CSV)") from None
        schema = pq.read_schema(path)
        if name not in schema.names:
            raise DataError(f"{path}: column {name!r} missing (pass field= to choose another; columns: "
                           f"{schema.names})")
        for value in pq.read_table(path, columns=[name]).column(name).to_pylist():
            yield None if value is None else str(value)
    else:
        raise DataError(f"{path}: unknown prompt file format {kind!r}")


def clean_prompts(raw: Iterable[str | None], *, dedupe: bool = True, stats: PromptStats | None = None
                  ) -> list[str]:
    """Strips prompts, collapses inner whitespace, drops empties and (optionally) duplicates, counting both."""
    stats = stats if stats is not None else PromptStats()
    seen: set[str] = set()
    out: list[str] = []
    for value in raw:
        stats.read += 1
        text = " ".join(value.split()) if value is not None else ""
        if not text:
            stats.empty += 1
            continue
        if dedupe:
            if text in seen:
                stats.duplicates += 1
                continue
            seen.add(text)
        out.append(text)
    stats.kept = len(out)
    return out


def load_prompts(path: str | os.PathLike, *, field: str | None = None, format: str | None = None,
                 dedupe: bool = True, limit: int | None = None) -> tuple[list[str], PromptStats]:
    """Reads a prompt file into a clean list; returns (prompts, stats). `limit` keeps the first N prompts."""
    stats = PromptStats(path=os.fspath(path))
    prompts = clean_prompts(iter_raw_prompts(path, field=field, format=format), dedupe=dedupe, stats=stats)
    if limit is not None:
        prompts = prompts[:limit]
        stats.kept = len(prompts)
    return prompts, stats
