"""Grain input pipeline: ArrayRecord shards of preference pairs -> per-host numpy batches.

Pipeline (all deterministic given the seed, so the iterator state is small and checkpointable)::

    ArrayRecordDataSource (decodes, errors name file + record)
      -> shuffle(seed)  (global, re-seeded every epoch)  -> repeat(num_epochs)
      -> zip with the shuffled extra-prompt set (rand_cond only)
      -> batch(per-host batch) -> [process_index::process_count]
      -> variant (Rand-positive / Not-paired)  -> optional cast

Every step's *global* batch is the next `per-host batch x process_count` records of the global order, and
host p takes the contiguous block p of it (the rows its devices hold, see parallel.put_batch): the global
batch, and so the training result, is the same for any number of hosts. All steps are lazy, so a host reads
and decodes only its own records. With several hosts only complete global batches are used (every host
takes the same number of steps).

A batch is a dict of numpy arrays::

    x0_w, x0_l        [B, H, W, C]   winning / losing latents (NHWC, stored dtype unless dtype= is given)
    cond_w, cond_l    {name: [B, ...]}  conditioning of the winning (c) and losing branch
    paired            [B] bool       the authors' flag: True = prompts belong to these latents
                                     (rand_cond on device may turn it False)
    index             [B] int64      record index (prompt position) of the pair
    extra_cond_w, extra_cond_l       (rand_cond only) an extra prompt and one of its degraded variants
    prompt, neg_prompt [B] str       (keep_text=True only)

Variants (paper Sec. 4.4, efficient DDSPO; the authors' replace_neg_img_with_other_pos flags):
  * ``paired``: x0_l and c- as generated.
  * ``not_paired``: x0_l := another record's x0_w, losing condition := this record's own c-.
  * ``rand_positive``: x0_l := another record's x0_w, losing condition := that other record's own c.
"Another record" is the previous pair of the same (shuffled) *global* batch, i.e. a roll by one along the
batch: after a global shuffle that is a random other record, and it costs no extra decoding except, with
several hosts, one record per batch (the row before this host's block). Needs batch >= 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ddspo_jax.data.records import decode_record, read_manifest, RecordError
from ddspo_jax.errors import ConfigError, DataError

__all__ = ["PairSource", "PairLoader", "VARIANTS"]

VARIANTS = ("paired", "not_paired", "rand_positive")


def _ensure_absl_flags() -> None:
    """Grain's worker processes read absl flags; parse them (argv[0] only) if the program has not."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])


class PairSource:
    """Random-access source over a dataset folder's shards that returns decoded records.

    Opening checks every shard (a truncated file fails here, named) and that its record count matches the
    manifest; a corrupt record or a record with another schema version fails when read, naming the file and
    the record's index inside it.
    """

    def __init__(self, folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None):
        import grain
        from array_record.python.array_record_module import ArrayRecordReader

        self.folder = os.fspath(folder)
        self.manifest = dict(manifest) if manifest is not None else read_manifest(self.folder)
        self.paths = [os.path.join(self.folder, s["file"]) for s in self.manifest["shards"]]
        if not self.paths:
            raise DataError(f"{self.folder}: manifest lists no shards")
        counts = []
        for path, entry in zip(self.paths, self.manifest["shards"]):
            try:
                reader = ArrayRecordReader(path)
                n = reader.num_records()
                reader.close()
            except Exception as e:
                raise RecordError(f"{path}: cannot open as ArrayRecord (truncated or corrupt file?): "
                                  f"{type(e).__name__} {e}") from None
            if n != int(entry["num_records"]):
                raise RecordError(f"{path}: {n} records, manifest says {entry['num_records']} (partial shard?)")
            counts.append(n)
        self._ends = np.cumsum(counts)
        self._cond_shapes = {k: tuple(v) for k, v in self.manifest.get("conditioning", {}).items()}
        self._src = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def where(self, index: int) -> str:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return f"{self.paths[shard]}: record {index - start}"

    def __getitem__(self, index: int) -> dict[str, Any]:

        index = int(index)
        try:
            raw = self._src[index]
        except Exception as e:
            raise RecordError(f"{self.where(index)}: cannot read ({type(e).__name__} {e})") from None
        rec = decode_record(raw, where=self.where(index))
        for key in ("cond", "neg_cond"):
            rec[key] = pad_cond(rec[key], self._cond_shapes, where=self.where(index))
        return rec

    def __repr__(self) -> str:
        return f"PairSource({self.folder!r}, {len(self)} records)"


def pad_cond(cond: Mapping[str, Any], shapes: Mapping[str, tuple], where: str = "record") -> dict[str, Any]:
    """Zero-pads conditioning arrays stored shorter than the manifest's shape along axis 0 (a backbone's
    `record_cond` may keep only the unmasked rows; a zero-padded attention mask masks the padding)."""
    out = dict(cond)
    for k, shape in shapes.items():
        v = out.get(k)
        if v is None or tuple(np.shape(v)) == tuple(shape):
            continue
        if np.ndim(v) != len(shape) or np.shape(v)[1:] != tuple(shape[1:]) or np.shape(v)[0] > shape[0]:
            raise RecordError(f"{where}: conditioning {k!r} has shape {np.shape(v)}, the manifest says {list(shape)}")
        out[k] = np.concatenate([v, np.zeros((shape[0] - v.shape[0],) + tuple(shape[1:]), v.dtype)])
    return out


class _ToExample:
    """Record -> the per-pair part of a batch (drops text unless asked; picklable for worker processes)."""

    def __init__(self, keep_text: bool, need_x0_l: bool):
        self.keep_text, self.need_x0_l = keep_text, need_x0_l

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        ex = {"x0_w": rec["x0_w"], "cond_w": rec["cond"], "neg_cond": rec["neg_cond"],
              "index": np.int64(rec["index"])}
        if self.need_x0_l:
            ex["x0_l"] = rec["x0_l"]
        if self.keep_text:
            ex["prompt"], ex["neg_prompt"] = rec["prompt"], rec["neg_prompt"]
        return ex


def _with_extra(pair: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    ex, extra = pair
    ex["extra_cond_w"], ex["extra_cond_l"] = extra["cond"], extra["neg_cond"]
    return ex


class _Variant:
    """Batch-level step: builds the losing branch (x0_l, cond_l) for the configured variant."""

    def __init__(self, variant: str, dtype: str | None):
        self.variant = variant
        self.dtype = np.dtype(dtype) if dtype else None

    def _cast(self, x):
        if isinstance(x, np.ndarray) and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            return x.astype(self.dtype)
        return x

    def __call__(self, batch) -> dict[str, Any]:
        if isinstance(batch, tuple):  # several hosts: (this host's block, the global batch's row before it)
            batch, prev = batch

            def roll(x, path=()):  # record i gets record i-1's data; row 0 the previous block's last
                p = prev
                for k in path:
                    p = p[k]
                return np.concatenate([np.asarray(p)[None], x[:-1]], axis=0)
        else:
            def roll(x, path=()):  # noqa: ARG001  record i gets record i-1's data (the batch is global)
                return np.roll(x, 1, axis=0)
        neg_cond = batch.pop("neg_cond")
        if self.variant == "paired":
            batch["cond_l"] = neg_cond
        else:
            batch["x0_l"] = roll(batch["x0_w"], ("x0_w",))
            if self.variant == "not_paired":
                batch["cond_l"] = neg_cond
            else:
                batch["cond_l"] = {k: roll(v, ("cond_w", k)) for k, v in batch["cond_w"].items()}
                if "prompt" in batch:  # keep the text in step with the losing condition
                    batch["neg_prompt"] = roll(batch["prompt"], ("prompt",))
        batch["paired"] = np.ones(batch["x0_w"].shape[0], bool)
        if self.dtype is not None:
            import jax

            batch = jax.tree.map(self._cast, batch)
        return batch


class PairLoader:
    """Per-host batches of preference pairs with a checkpointable iterator.

    Args:
      data_dir: a dataset folder (manifest.json + shards), made by prepare or the authors' release import.
      batch_size: the per-host batch (global batch / jax.process_count()).
      seed: shuffle seed; the same seed and global batch give the same global batches for any host count.
      variant: "paired" (needs x0_l), "not_paired" or "rand_positive" (efficient DDSPO, any data kind).
      extra_dir: a dataset of extra prompts (its cond / neg_cond are used; latents ignored) for rand_cond.
      num_epochs: None repeats forever (each epoch reshuffled); an int stops after that many.
      dtype: cast float arrays (e.g. "float32"); None keeps the stored bf16, halving host->device bytes.
      worker_count: Grain worker processes (0: decode in threads of this process, enough for most hosts).
      process_index/process_count: which contiguous block of each global batch (of batch_size x
        process_count pairs) this host takes; default jax.process_index() / jax.process_count(). Train passes
        the block its devices hold in the mesh (parallel.process_batch_block).
    Use ``next(loader)`` (or iterate), ``loader.get_state()`` and ``loader.set_state(state)``.
    """

    def __init__(self, data_dir: str | os.PathLike, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 variant: str = "paired", extra_dir: str | os.PathLike | None = None,
                 num_epochs: int | None = None, drop_remainder: bool = True, keep_text: bool = False,
                 dtype: str | None = None, worker_count: int = 0, num_threads: int = 8,
                 prefetch_buffer_size: int = 16, process_index: int | None = None,
                 process_count: int | None = None):
        import grain

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant != "paired" and batch_size < 2:
            raise ConfigError(f"variant {variant!r} takes x0_l from another pair of the batch: batch_size must be "
                             f">= 2, got {batch_size}")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self.source = PairSource(data_dir)
        self.manifest = self.source.manifest
        kind = self.manifest["kind"]
        if kind == "prompts":
            raise DataError(f"{data_dir}: a prompts-only dataset (no latents) cannot be trained on; pass it as "
                             "extra_dir (rand_cond) and a pairs/positives dataset as data_dir")
        if variant == "paired" and kind != "pairs":
            raise DataError(f"{data_dir}: {kind!r} data has no x0_l (efficient mode); use variant='not_paired' "
                             "or 'rand_positive', or prepare full pairs")
        self.batch_size, self.variant, self.process_count = batch_size, variant, process_count

        ds = grain.MapDataset.source(self.source)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
        ds = ds.map(_ToExample(keep_text, need_x0_l=variant == "paired"))
        if extra_dir is not None:
            self.extra_source = PairSource(extra_dir)
            extra = grain.MapDataset.source(self.extra_source).shuffle(seed=seed + 1).repeat(None)
            ds = grain.experimental.ZipMapDataset([ds, extra[:len(ds)]]).map(_with_extra)
        examples = ds  # the global order, one pair per element (lazy: nothing is read until indexed)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if process_count > 1:  # host p: block p of every global batch (complete global batches only)
            n = len(ds) - len(ds) % process_count
            ds = ds[:n][process_index::process_count]
            if variant != "paired":  # the roll needs the global row before this block
                g = batch_size * process_count
                prev = examples[(process_index * batch_size - 1) % g::g]
                ds = grain.experimental.ZipMapDataset([ds, prev[:len(ds)]])
        ds = ds.map(_Variant(variant, dtype))
        self.dataset = ds  # the MapDataset, for random access (batch k = dataset[k])
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch_buffer_size))
        if worker_count > 0:
            _ensure_absl_flags()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        self._it_ds = it_ds
        self._iterator = iter(it_ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The iterator's position (a small dict; a later issue stores it with Orbax beside the params)."""
        return self._iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops prefetch threads / worker processes (call before exit when worker_count > 0)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "PairLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        """Batches per epoch for this host (floor; with drop_remainder)."""
        return len(self.source) // self.process_count // self.batch_size
