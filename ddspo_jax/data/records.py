"""Preference-pair records, ArrayRecord shards and the dataset manifest.

One record is one prompt's data, serialized with ``flax.serialization.msgpack_serialize`` (numpy arrays keep
their shape and dtype; strings and ints as msgpack natives)::

    schema_version  int            SCHEMA_VERSION
    index           int            the prompt's position in the prompt list (seeds its noise/perturbation)
    seed            int            the dataset seed (-1 when unknown, e.g. imported data)
    id              str            optional source id (imported data)
    prompt          str            c
    neg_prompt      str            c-
    strategy        str            which perturbation made c- (see perturb.py)
    x0_w            [H, W, C]      latent sampled with c (NHWC, as the diffusion model sees it, i.e. already
                                   multiplied by the VAE scaling factor); absent in a prompts-only set
    x0_l            [H, W, C]      latent sampled with c-; absent in efficient mode (paper Sec. 4.4)
    cond            {name: array}  c's conditioning as the backbone's encoder produced it, no batch dim
                                   (SD-1: {"prompt_embeds": [77, 768]}; SDXL: {"prompt_embeds": [77, 2048],
                                   "pooled_prompt_embeds": [1280], "add_time_ids": [6]}; token ids: {"input_ids": [77]})
    neg_cond        {name: array}  the same for c-

Latents and large float arrays are stored in bf16 (or fp16) to halve the size; conditioning arrays smaller
than ``small`` elements (e.g. SDXL's time ids) keep their dtype, which costs nothing and keeps them exact. An SDXL pair with both
latents and both prompts' embeddings is ~0.9 MB in bf16.

Shards are written to a temporary name and renamed when complete, so a killed writer leaves at most a
``*.tmp`` file and never a truncated shard under the final name.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flax import serialization

from ddspo_jax.errors import DataError, MissingFileError
from ddspo_jax.files import iter_jsonl

__all__ = [
    "SCHEMA_VERSION", "FORMAT", "KINDS", "PairRecord", "encode_record", "decode_record", "RecordError",
    "ShardWriter", "shard_name", "plan_shards", "remove_partial_shards", "complete_shard", "write_manifest", "read_manifest", "MANIFEST",
    "import_authors_release",
]

SCHEMA_VERSION = 1
FORMAT = "ddspo_jax.pairs"
MANIFEST = "manifest.json"
# pairs: x0_w and x0_l; positives: x0_w only (efficient mode); prompts: conditioning only (rand_cond extras).
KINDS = ("pairs", "positives", "prompts")
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
_HOW_TO_CREATE = ("create it with `python -m ddspo_jax.prepare --config configs/<model>.py`, or import the "
                  "authors' PyTorch release with `python -m ddspo_jax.prepare import-ddspo <folder>`")


class RecordError(DataError):
    """A record that cannot be used (wrong schema, corrupt bytes); the message names file and record."""


@dataclasses.dataclass
class PairRecord:
    index: int
    prompt: str
    neg_prompt: str
    cond: dict[str, np.ndarray]
    neg_cond: dict[str, np.ndarray]
    x0_w: np.ndarray | None = None
    x0_l: np.ndarray | None = None
    seed: int = -1
    strategy: str = ""
    id: str = ""


def _store(x: Any, dtype, small: int) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
        if x.size >= small:
            return x.astype(dtype)
    return x


def encode_record(rec: PairRecord | Mapping[str, Any], *, dtype: str = "bfloat16", small: int = 1024) -> bytes:
    """Serializes one record (PairRecord or a dict with the same fields) to msgpack bytes."""
    if dtype not in _DTYPES:
        raise ValueError(f"record dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    d = dataclasses.asdict(rec) if isinstance(rec, PairRecord) else dict(rec)
    np_dtype = _DTYPES[dtype]
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for key in ("index", "seed"):
        out[key] = int(d.get(key, -1))
    for key in ("id", "prompt", "neg_prompt", "strategy"):
        out[key] = str(d.get(key, "") or "")
    for key in ("x0_w", "x0_l"):
        if d.get(key) is not None:
            x = np.asarray(d[key])
            if x.ndim != 3:
                raise ValueError(f"record {out['index']}: {key} must be one latent [H, W, C], got shape {x.shape}")
            out[key] = _store(x, np_dtype, 0)  # latents: always the storage dtype
    for key in ("cond", "neg_cond"):
        cond = d.get(key)
        if not isinstance(cond, Mapping) or not cond:
            raise ValueError(f"record {out['index']}: {key} must be a non-empty dict of arrays")
        out[key] = {str(k): _store(v, np_dtype, small) for k, v in cond.items()}
    return serialization.msgpack_serialize(out)


def decode_record(data: bytes, *, where: str = "record") -> dict[str, Any]:
    """Bytes -> dict of numpy arrays/strings; RecordError (naming `where`) on corrupt bytes or wrong schema."""
    try:
        rec = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for truncated/garbled input
        raise RecordError(f"{where}: corrupt or truncated record ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict) or "schema_version" not in rec:
        raise RecordError(f"{where}: not a {FORMAT} record (no schema_version)")
    if rec["schema_version"] != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema version {rec['schema_version']}, this code reads version "
                          f"{SCHEMA_VERSION}; re-create the data with this version's prepare")
    return rec


# ----------------------------------------------------------------------------------------------- shards


def shard_name(shard: int, num_shards: int, prefix: str = "pairs") -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.array_record"


def plan_shards(num_records: int, records_per_shard: int) -> list[tuple[int, int, int]]:
    """Fixed split of indices into shards: [(shard, start, stop)], so every run/host agrees on the work."""
    if records_per_shard <= 0:
        raise ValueError(f"records_per_shard must be > 0, got {records_per_shard}")
    return [(s, start, min(start + records_per_shard, num_records))
            for s, start in enumerate(range(0, num_records, records_per_shard))]


class ShardWriter:
    """Writes one ArrayRecord shard under a temporary name and renames it only when closed cleanly.

    ``options`` go to ArrayRecordWriter; "group_size:1" gives the cheap random access Grain's global shuffle
    needs; zstd saves ~22 % on bf16 random-like data (the exponent bytes compress) and decodes fast.
    Use as a context manager: an exception inside the block deletes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str = "bfloat16",
                 options: str = "group_size:1,zstd:3"):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.dtype = dtype
        self.num_records = 0
        self.num_bytes = 0
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._writer = ArrayRecordWriter(self.tmp, options)

    def write(self, rec: PairRecord | Mapping[str, Any]) -> int:
        data = encode_record(rec, dtype=self.dtype)
        self._writer.write(data)
        self.num_records += 1
        self.num_bytes += len(data)
        return len(data)

    def write_bytes(self, data: bytes) -> None:
        self._writer.write(data)
        self.num_records += 1
        self.num_bytes += len(data)

    def close(self) -> dict[str, Any]:
        """Finishes the file and renames it to its final name; returns its manifest entry."""
        self._writer.close()
        os.replace(self.tmp, self.path)
        return {"file": os.path.basename(self.path), "num_records": self.num_records,
                "bytes": os.path.getsize(self.path)}

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.entry = self.close()
        else:
            self.abort()


def remove_partial_shards(folder: str | os.PathLike) -> list[str]:
    """Deletes temporary shard files a killed writer left behind (their shards are redone); returns them."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    gone = [n for n in os.listdir(folder) if ".array_record.tmp-" in n]
    for name in gone:
        os.remove(os.path.join(folder, name))
    return gone


def complete_shard(path: str | os.PathLike, expected_records: int) -> bool:
    """True when `path` is a finished shard with the expected record count (so a re-run can skip it)."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
    except Exception:
        return False
    return n == expected_records


# --------------------------------------------------------------------------------------------- manifest


def write_manifest(folder: str | os.PathLike, *, shards: list[dict[str, Any]], kind: str, model: str = "",
                   settings: Mapping[str, Any] | None = None, counts: Mapping[str, Any] | None = None,
                   dtype: str = "bfloat16", conditioning: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``manifest.json`` (atomically) describing a finished dataset; returns it.

    `shards`: entries as returned by ShardWriter.close() (file, num_records, bytes), in read order.
    `conditioning`: optional {name: shape} of the cond dict, for a reader to check against its model.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = os.fspath(folder)
    num = sum(int(s["num_records"]) for s in shards)
    total_bytes = sum(int(s.get("bytes", 0)) for s in shards)
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, "model": model, "dtype": dtype,
        "num_records": num, "bytes_per_record": round(total_bytes / num, 1) if num else 0,
        "total_bytes": total_bytes, "settings": dict(settings or {}), "counts": dict(counts or {}),
        "conditioning": {k: list(v) for k, v in (conditioning or {}).items()},
        "shards": list(shards),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.path.join(folder, MANIFEST)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, default=str)
    os.replace(tmp, path)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a dataset folder's manifest; errors say what is wrong and how to fix it."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise MissingFileError(f"data folder not found: {folder}; {_HOW_TO_CREATE}")
    if not os.path.isfile(path):
        raise MissingFileError(f"{folder} has no {MANIFEST}, so it is not a finished dataset; {_HOW_TO_CREATE} "
                                "(an interrupted prepare run resumes when started again)")
    with open(path, encoding="utf-8") as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema version {m.get('schema_version')}, this code reads version "
                          f"{SCHEMA_VERSION}; re-create the data with this version's prepare")
    if not isinstance(m.get("shards"), list) or not all(isinstance(s, dict) and "file" in s for s in m["shards"]):
        raise DataError(f"{path}: no list of shards (\"shards\": [{{\"file\": ...}}, ...]); {_HOW_TO_CREATE}")
    for s in m["shards"]:
        p = os.path.join(folder, s["file"])
        if not os.path.isfile(p):
            raise MissingFileError(f"{p}: shard listed in {path} is missing")
    return m


# ------------------------------------------------------------------------------- authors' release import


def _authors_latent(folder: str, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    # The authors' loader (training/dataset.py) reads os.path.join(data_dir, "latents", pos_file).
    candidates = [os.path.join(folder, "latents", name), os.path.join(folder, name),
                  os.path.join(folder, "latents", f"{name}.safetensors")]
    for path in candidates:
        if os.path.isfile(path):
            tensors = load_file(path)
            if "latent" not in tensors:
                raise KeyError(f"{path}: no 'latent' tensor (keys: {sorted(tensors)})")
            x = tensors["latent"]
            if x.ndim == 4:
                if x.shape[0] != 1:
                    raise DataError(f"{path}: 'latent' has shape {x.shape}, expected [1, C, H, W] or [C, H, W]")
                x = x[0]
            if x.ndim != 3:
                raise DataError(f"{path}: 'latent' has shape {x.shape}, expected [1, C, H, W] or [C, H, W]")
            return np.transpose(x, (1, 2, 0))  # CHW -> HWC
    raise MissingFileError(f"latent {name!r} not found in {folder} (looked at {candidates})")


def import_authors_release(src: str | os.PathLike, out: str | os.PathLike, encode, *, record_cond=lambda c: c,
                           model: str = "",
                           dtype: str = "bfloat16", records_per_shard: int = 1000, batch_size: int = 64,
                           latent_scale: float = 1.0, limit: int | None = None,
                           settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Converts a dataset made by the authors' PyTorch release into our shards + manifest.

    `src` holds ``metadata.jsonl`` (lines with id, prompt, neg_prompt, pos_file, neg_file) and
    ``latents/<file>`` safetensors with an NCHW ``latent``. Their data stores prompts as text, so
    ``encode(texts) -> {name: array [len(texts), ...]}`` (the caller's text encoder) makes the embeddings;
    ``record_cond`` (the backbone's) says what a record keeps of one prompt's.
    ``latent_scale`` multiplies the latents (1.0: their latents are already in the model's scale).
    A line without neg_file (or an empty one) makes the dataset kind "positives" only if all lines lack it.
    Complete shards already in `out` are kept, so an interrupted import resumes.
    """
    src, out = os.fspath(src), os.fspath(out)
    meta_path = os.path.join(src, "metadata.jsonl")
    if not os.path.isfile(meta_path):
        raise MissingFileError(f"{meta_path} not found: not an authors' release folder")
    entries = []
    for _, e in iter_jsonl(meta_path, ("prompt", "neg_prompt", "pos_file")):
        entries.append(e)
        if limit is not None and len(entries) >= limit:
            break
    has_neg = [bool(e.get("neg_file")) for e in entries]
    if any(has_neg) and not all(has_neg):
        raise DataError(f"{meta_path}: some lines have neg_file and some do not; split them into two datasets")
    kind = "pairs" if all(has_neg) and entries else "positives"
    os.makedirs(out, exist_ok=True)
    remove_partial_shards(out)
    plan = plan_shards(len(entries), records_per_shard)
    shards, counts = [], {"records": len(entries), "shards_reused": 0}
    cond_shapes: dict[str, Any] = {}
    for shard, start, stop in plan:
        path = os.path.join(out, shard_name(shard, len(plan)))
        if complete_shard(path, stop - start):  # renamed only when finished: reuse
            shards.append({"file": os.path.basename(path), "num_records": stop - start,
                           "bytes": os.path.getsize(path)})
            counts["shards_reused"] += 1
            continue
        with ShardWriter(path, dtype=dtype) as w:
            for b0 in range(start, stop, batch_size):
                chunk = entries[b0:min(b0 + batch_size, stop)]
                texts = [e["prompt"] for e in chunk] + [e["neg_prompt"] for e in chunk]
                emb = {k: np.asarray(v) for k, v in encode(texts).items()}
                for k, v in emb.items():
                    if v.shape[0] != len(texts):
                        raise ValueError(f"encode returned {k} with leading dim {v.shape[0]}, expected {len(texts)}")
                    cond_shapes[k] = v.shape[1:]
                for j, e in enumerate(chunk):
                    i = b0 + j
                    x0_w = _authors_latent(src, e["pos_file"]) * latent_scale
                    x0_l = _authors_latent(src, e["neg_file"]) * latent_scale if kind == "pairs" else None
                    w.write(PairRecord(
                        index=i, id=str(e.get("id", "")), prompt=e["prompt"], neg_prompt=e["neg_prompt"],
                        strategy=str(e.get("strategy", "imported")), seed=-1, x0_w=x0_w, x0_l=x0_l,
                        cond=record_cond({k: v[j] for k, v in emb.items()}),
                        neg_cond=record_cond({k: v[len(chunk) + j] for k, v in emb.items()})))
        shards.append(w.entry)
    return write_manifest(out, shards=shards, kind=kind, model=model, dtype=dtype,
                          settings={"source": "authors' PyTorch release", "src": src, "latent_scale": latent_scale,
                                    **dict(settings or {})},
                          counts=counts, conditioning=cond_shapes)
