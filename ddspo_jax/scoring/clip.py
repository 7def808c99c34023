"""The CLIP-based scorers users report after a fine-tune, in JAX beside the sampler.

  clip_score  100 x max(cos(image, text), 0) with any CLIPModel folder (torchmetrics' CLIPScore definition)
  pickscore   exp(logit_scale) x cos with a CLIPModel folder such as PickScore_v1; `prefer` is the softmax
              over two images of the same prompt (PickScore's paired preference probability)
  aesthetic   the LAION "improved aesthetic predictor": L2-normalised CLIP ViT-L/14 image embedding through
              its linear MLP head (768-1024-128-64-16-1), head weights from `aesthetic_head.safetensors`

Images are preprocessed exactly as the folder's `CLIPImageProcessor` (PIL backend) does a PNG of them: the
float images are quantised to uint8 as `sample` writes them, resized (shortest side) with Pillow's
fixed-point antialiased filter reproduced in int32, centre-cropped, rescaled and normalised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.backbones.text import load_tokenizer, tokenize
from ddspo_jax.convert.clip import load_aesthetic_head, load_clip_model, load_clip_vision
from ddspo_jax.errors import MissingFileError, ModelError
from ddspo_jax.scoring.registry import register

# ---------------------------------------------------------------------------------- preprocessing

_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c, 8 bits per channel


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _lanczos(x: float) -> float:
    def sinc(v):
        return 1.0 if v == 0.0 else math.sin(math.pi * v) / (math.pi * v)
    return sinc(x) * sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


# PIL.Image.Resampling: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC (CLIP's); (filter, support)
_FILTERS = {1: (_lanczos, 3.0), 2: (_bilinear, 1.0), 3: (_bicubic, 2.0)}


def resize_matrix(in_size: int, out_size: int, resample: int = 3) -> np.ndarray:
    """int32 [out, in] fixed-point weights of Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.

    out = clip8((sum_i w[o, i] * p[i] + 2**21) >> 22) is exactly what `Image.resize` computes per pass."""
    if resample not in _FILTERS:
        raise ModelError(f"image processor resample={resample} is not supported (known: {sorted(_FILTERS)})")
    filt, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    out = np.zeros((out_size, in_size), np.int64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = np.array([filt((x - center + 0.5) / filterscale) for x in range(xmin, xmax)])
        if w.sum() != 0.0:
            w = w / w.sum()
        fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)),
                         np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
        out[o, xmin:xmax] = fixed
    return out.astype(np.int32)


def _resample_pass(img: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
    """One Pillow pass over `axis` (1: rows/height, 2: columns/width) of int32 [N, H, W, C] images."""
    w = jnp.asarray(weights)
    acc = (jnp.einsum("oi,nicx->nocx", w, img) if axis == 1 else jnp.einsum("oi,nhic->nhoc", w, img))
    return jnp.clip((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255)


def _pair(value, name: str, source: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ModelError(f"{source}: {name} = {value!r} is not an int or {{'height', 'width'}}")


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """A `preprocessor_config.json` of a CLIP folder, applied in JAX to float images in [0, 1]."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ClipPreprocess":
        # hub folders carry preprocessor_config.json; transformers 5 writes processor_config.json with the
        # settings under "image_processor"
        path, nested = Path(folder) / "preprocessor_config.json", Path(folder) / "processor_config.json"
        if not path.is_file() and nested.is_file():
            path = nested
        if not path.is_file():
            raise MissingFileError(f"{path} is missing: a CLIP scorer folder needs the image processor settings "
                                   "its model was trained with (save it with CLIPProcessor.save_pretrained)")
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path} is not valid JSON ({e})") from None
        if path == nested:
            if not isinstance(c.get("image_processor"), dict):
                raise ModelError(f"{path} has no image_processor settings")
            c = c["image_processor"]
        size = c.get("size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ModelError(f"{path}: size {size} has no shortest_edge (only CLIP's shortest-side resize is "
                                 "supported)")
            size = size["shortest_edge"]
        if not c.get("do_rescale", True) or not c.get("do_normalize", True):
            raise ModelError(f"{path}: do_rescale / do_normalize false is not supported")
        return cls(shortest_edge=int(size), crop=_pair(c.get("crop_size", 224), "crop_size", str(path)),
                   resample=int(c.get("resample", 3)), do_resize=bool(c.get("do_resize", True)),
                   do_center_crop=bool(c.get("do_center_crop", True)),
                   rescale_factor=float(c.get("rescale_factor", 1 / 255)),
                   mean=tuple(c.get("image_mean", cls.mean)), std=tuple(c.get("image_std", cls.std)))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """transformers' get_resize_output_image_size(default_to_square=False)."""
        if not self.do_resize:
            return h, w
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def __call__(self, images: jax.Array) -> jax.Array:
        """[N, H, W, 3] floats in [0, 1] -> normalised pixel values [N, crop_h, crop_w, 3] (float32)."""
        n, h, w, _ = images.shape
        x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.int32)
        nh, nw = self.output_size(h, w)
        # Horizontal pass first, rounding to uint8 in between, as Pillow does for square images (what
        # `evaluate` generates) and one-axis resizes: bit-exact there (tests). For some non-square images
        # resized on both axes Pillow 13 runs the vertical pass first, by a rule not reproduced here; the two
        # orders differ by a few grey levels.
        for axis, size, new in ((2, w, nw), (1, h, nh)):
            if new != size:
                x = _resample_pass(x, resize_matrix(size, new, self.resample), axis=axis)
        if self.do_center_crop:
            ch, cw = self.crop
            if ch > nh or cw > nw:
                raise ModelError(f"centre crop {self.crop} is larger than the resized image {(nh, nw)}")
            top, left = (nh - ch) // 2, (nw - cw) // 2
            x = x[:, top:top + ch, left:left + cw]
        x = x.astype(jnp.float32) * self.rescale_factor
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)


# ------------------------------------------------------------------------------------------ scorers

def _l2(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class _ClipPair:
    """A CLIPModel folder with its tokenizer and image processor; scores cosines on device."""

    name, unit = "", ""

    def __init__(self, path):

        if not path:
            raise ModelError(f"scorer {self.name!r} needs --scorer-path: a local CLIPModel folder")
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"scorer folder {self.path} does not exist")
        self.preprocess = ClipPreprocess.from_folder(self.path)
        self.model, self.params = load_clip_model(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.max_length = self.model.text_config.max_position_embeddings

        def cosine(params, images, ids, mask):
            m = self.model.bind({"params": params})
            img = _l2(m.image_features(self.preprocess(images)).astype(jnp.float32))
            txt = _l2(m.text_features(ids, mask).astype(jnp.float32))
            return jnp.sum(img * txt, axis=-1), jnp.exp(params["logit_scale"].astype(jnp.float32))

        self._cosine = jax.jit(cosine)

    def cosine(self, images, prompts: Sequence[str]):

        # padding to max_length equals transformers' padding=True: causal attention never sees the pads
        ids, mask, _ = tokenize(self.tokenizer, list(prompts), self.max_length)
        cos, scale = self._cosine(self.params, jnp.asarray(images), ids, mask)
        return np.asarray(cos, np.float64), float(scale)


@register("clip_score")
class ClipScore(_ClipPair):
    name, unit = "clip_score", "CLIPScore"

    def __init__(self, path, **_):
        super().__init__(path)

    def score(self, images, prompts):
        cos, _ = self.cosine(images, prompts)
        return 100.0 * np.maximum(cos, 0.0)


@register("pickscore")
class PickScore(_ClipPair):
    name, unit = "pickscore", "PickScore"

    def __init__(self, path, **_):
        super().__init__(path)

    def score(self, images, prompts):
        cos, scale = self.cosine(images, prompts)
        return scale * cos

    def prefer(self, images_a, images_b, prompts):
        """P(image a preferred over b) = softmax over the pair's scores, as PickScore's inference code."""
        a, b = self.score(images_a, prompts), self.score(images_b, prompts)
        return 1.0 / (1.0 + np.exp(b - a))


AESTHETIC_HEAD = "aesthetic_head.safetensors"
AESTHETIC_CONVERSION = (
    "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('sac+logos+ava1-l14-linearMSE.pth', "
    f"map_location='cpu', weights_only=True), '{AESTHETIC_HEAD}')\"")


@register("aesthetic")
class Aesthetic:
    """LAION's improved aesthetic predictor on a CLIP ViT-L/14 folder (CLIPModel or
    CLIPVisionModelWithProjection) holding `aesthetic_head.safetensors` (or `head=` another file)."""

    name, unit = "aesthetic", "aesthetic score"

    def __init__(self, path, head: str | None = None, **_):

        if not path:
            raise ModelError("scorer 'aesthetic' needs --scorer-path: a local CLIP ViT-L/14 folder")
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFileError(f"scorer folder {folder} does not exist")
        head_file = Path(head) if head else folder / AESTHETIC_HEAD
        if not head_file.is_file():
            raise MissingFileError(f"{head_file} is missing: convert the published head once with\n  "
                                   f"{AESTHETIC_CONVERSION}")
        self.preprocess = ClipPreprocess.from_folder(folder)
        self.model, self.params = load_clip_vision(folder, component="clip")
        if "visual_projection" not in self.params:
            raise ModelError(f"{folder} has no visual_projection: the aesthetic head reads the projected CLIP "
                             "image embedding (a CLIPModel or CLIPVisionModelWithProjection folder)")
        self.head, self.head_params = load_aesthetic_head(head_file, self.model.config.projection_dim)

        def score(params, head_params, images):
            emb = self.model.apply({"params": params}, self.preprocess(images))["image_embeds"]
            return self.head.apply({"params": head_params}, _l2(emb.astype(jnp.float32)))[:, 0]

        self._score = jax.jit(score)

    def score(self, images, prompts=None):
        return np.asarray(self._score(self.params, self.head_params, jnp.asarray(images)), np.float64)
