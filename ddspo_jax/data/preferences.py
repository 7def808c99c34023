"""Human preference datasets -> pair records (DD-CPP's data: the preferred image is x0_w, the other x0_l).

Two layouts are read:
  * Pick-a-Pic v2's: Parquet shards with `caption`, `jpg_0`, `jpg_1` (encoded image bytes), `label_0`,
    `label_1` (1 / 0 for a decided pair, 0.5 / 0.5 for a tie); ties are dropped, as Diffusion-DPO does.
  * a folder: `preferences.jsonl` with lines {"prompt", "preferred", "dispreferred"[, "id"]} naming image
    files relative to the folder.
Images are decoded, resized on the shortest side (bilinear, antialiased: torchvision's Resize on PIL images,
as Diffusion-DPO's trainer) and centre-cropped to the model's resolution; the caller's VAE encodes them.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ddspo_jax.errors import DataError, MissingFileError
from ddspo_jax.files import iter_jsonl

LABELS = {(1, 0), (0, 1), (0.5, 0.5)}  # (label_0, label_1) of a Pick-a-Pic row
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


@dataclasses.dataclass
class Preference:
    id: str
    prompt: str
    preferred: bytes | str  # encoded bytes or a file path
    dispreferred: bytes | str


@dataclasses.dataclass
class Dropped:
    id: str
    reason: str


def _parquet_files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else sorted(src.glob("*.parquet"))
    if not files:
        raise MissingFileError(f"{src}: no .parquet files (Pick-a-Pic layout) and no preferences.jsonl")
    return files


def iter_preferences(src: str | os.PathLike) -> Iterator[Preference | Dropped]:
    """Every row of the dataset in file order, as a Preference or, for a tie, a Dropped entry."""
    src = Path(src)
    if not src.exists():
        raise MissingFileError(f"preference dataset {src} does not exist")
    if src.is_dir() and (src / "preferences.jsonl").is_file():
        yield from _iter_folder(src)
        return
    import pyarrow.parquet as pq

    for f in _parquet_files(src):
        table = pq.ParquetFile(f)
        missing = [c for c in PICKAPIC_COLUMNS if c not in table.schema_arrow.names]
        if missing:
            raise DataError(f"{f}: columns {missing} missing (Pick-a-Pic v2 layout: {', '.join(PICKAPIC_COLUMNS)})")
        row = 0
        for batch in table.iter_batches(batch_size=256, columns=list(PICKAPIC_COLUMNS)):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                rid = f"{f.name}:{row}"
                row += 1
                l0, l1 = cols["label_0"][i], cols["label_1"][i]
                if (l0, l1) not in LABELS:  # Pick-a-Pic: (1, 0), (0, 1) or a tie (0.5, 0.5); anything else is
                    yield Dropped(rid, f"labels ({l0}, {l1}) are not a preference")  # corrupt: dropped, named
                    continue
                if l0 == l1:
                    yield Dropped(rid, "tie")
                    continue
                a, b = cols["jpg_0"][i], cols["jpg_1"][i]
                if a is None or b is None:
                    yield Dropped(rid, f"image {'jpg_0' if a is None else 'jpg_1'} is null")
                    continue
                w, l = (a, b) if l0 > l1 else (b, a)
                yield Preference(rid, cols["caption"][i] or "", w, l)


def _iter_folder(src: Path) -> Iterator[Preference | Dropped]:
    path = src / "preferences.jsonl"
    for lineno, e in iter_jsonl(path, ("prompt", "preferred", "dispreferred")):
        for key in ("prompt", "preferred", "dispreferred"):
            if not isinstance(e[key], str):
                raise DataError(f"{path}:{lineno}: field {key!r} must be a string, got {e[key]!r}")
        yield Preference(str(e.get("id", f"{path.name}:{lineno}")), e["prompt"], str(src / e["preferred"]),
                         str(src / e["dispreferred"]))


def load_image(data: bytes | str, resolution: int) -> np.ndarray:
    """Decoded, shortest side resized to `resolution` (PIL bilinear), centre-cropped: [R, R, 3] in [0, 1].
    Raises DataError for bytes or a file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str) and not os.path.isfile(data):
        raise DataError(f"image file not found: {data}")
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"not a readable image ({type(e).__name__}: {e})") from None
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, np.float32) / 255.0
