"""Prompts -> exactly the conditioning each backbone consumes, from a diffusers model folder.

SD-1.x:  `prompt_embeds` [B,77,768] (last hidden state of the single CLIP encoder, after the final LN).
SDXL:    `prompt_embeds` [B,77,2048] (penultimate hidden states of both encoders, concatenated),
         `pooled_prompt_embeds` [B,1280] (encoder 2's projected EOS state) and `add_time_ids` [B,6]
         (original_size + crops_coords_top_left + target_size).
This mirrors `StableDiffusionPipeline.encode_prompt` / `StableDiffusionXLPipeline.encode_prompt` and is
parity-tested against them. Tokenization stays in Python (transformers' CLIPTokenizer); the encoders run in
JAX under one `jit`. Prompts over 77 tokens are truncated, warned about and counted, never an error.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.clip import load_clip_text
from ddspo_jax.convert.common import ConversionError, read_config

COMPONENTS = {
    "tokenizer": "the CLIP tokenizer",
    "text_encoder": "the CLIP text encoder (CLIPTextModel)",
    "tokenizer_2": "SDXL's second tokenizer",
    "text_encoder_2": "SDXL's second text encoder (CLIPTextModelWithProjection)",
}


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than the tokenizer's 77 tokens and was cut (as diffusers does)."""


class MissingComponentError(ConversionError):
    """A diffusers model folder lacks a component (tokenizer/, text_encoder_2/, ...) this model needs."""


def require_components(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Raises MissingComponentError naming every missing component folder (and the model folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingComponentError(f"model folder {folder} does not exist")
    missing = [n for n in names if not (folder / n).is_dir()]
    if missing:
        what = "; ".join(f"{n}/ ({COMPONENTS.get(n, n)})" for n in missing)
        raise MissingComponentError(f"model folder {folder} is missing component(s): {what}")


def load_tokenizer(folder: str | os.PathLike):
    """`transformers.CLIPTokenizer` from a local folder (vocab.json+merges.txt or tokenizer.json); never downloads."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/TypeError depending on what is missing
        raise ConversionError(f"cannot load a CLIP tokenizer from {folder} ({type(e).__name__}: {e})") from None


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads/truncates to `max_length` as diffusers does. Returns (input_ids int32 [B,L], attention_mask [B,L],
    truncated bool [B]); the caller warns and counts, so a long prompt is never an error."""
    texts = list(texts)
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, verbose=False)
    full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    truncated = np.array([len(ids) > max_length for ids in full], dtype=bool)
    return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32), truncated)


def _pairs(value, batch: int, name: str) -> np.ndarray:
    arr = np.asarray(value, np.float32)
    if arr.shape == (2,):
        arr = np.broadcast_to(arr, (batch, 2))
    if arr.shape != (batch, 2):
        raise ValueError(f"{name} must be a (height, width) pair or an array [batch={batch}, 2], got shape {arr.shape}")
    return arr


def sdxl_add_time_ids(batch: int, original_size, crops_coords_top_left, target_size) -> np.ndarray:
    """SDXL micro-conditioning [B,6] = original_size + crops_coords_top_left + target_size (each (h, w),
    either one pair for the batch or one per sample, as a training set with crops has)."""
    return np.concatenate([_pairs(original_size, batch, "original_size"),
                           _pairs(crops_coords_top_left, batch, "crops_coords_top_left"),
                           _pairs(target_size, batch, "target_size")], axis=1)


def _forward(params, ids, masks, *, models, kind):
    outs = [m.apply({"params": p}, i, a) for m, p, i, a in zip(models, params, ids, masks)]
    if kind == "sd1":
        return {"prompt_embeds": outs[0]["last_hidden_state"].astype(jnp.float32)}
    embeds = jnp.concatenate([o["hidden_states"][-2] for o in outs], axis=-1)
    return {"prompt_embeds": embeds.astype(jnp.float32),
            "pooled_prompt_embeds": outs[-1]["text_embeds"].astype(jnp.float32)}


class PromptEncoder:
    """Tokenizers + Flax CLIP encoders + params of one model folder; `encode(texts)` -> dict of arrays.

    kind is "sd1" (tokenizer/, text_encoder/) or "sdxl" (also tokenizer_2/, text_encoder_2/). Keeps a running
    `truncated_total` for metrics; each `encode` also returns its batch's `num_truncated`.
    """

    def __init__(self, kind: str, tokenizers, models, params, *, max_length: int = 77,
                 use_attention_mask: Sequence[bool] | None = None, force_zeros_for_empty_prompt: bool = True,
                 resolution: int = 1024, source: str = "<in memory>"):
        if kind not in ("sd1", "sdxl"):
            raise ValueError(f"kind must be 'sd1' or 'sdxl', got {kind!r}")
        n = 1 if kind == "sd1" else 2
        if not (len(tokenizers) == len(models) == len(params) == n):
            raise ValueError(f"{kind} needs {n} tokenizer(s), encoder(s) and param tree(s)")
        if kind == "sdxl" and not models[1].config.with_projection:
            raise ValueError(f"{source}: SDXL's text_encoder_2 must be a CLIPTextModelWithProjection "
                             "(its config `architectures` says otherwise)")
        self.kind, self.tokenizers, self.models = kind, tuple(tokenizers), tuple(models)
        self.params = tuple(jax.device_put(p) for p in params)
        self.max_length = max_length
        self.use_attention_mask = tuple(use_attention_mask or (False,) * n)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt) and kind == "sdxl"
        self.resolution = resolution
        self.source = source
        self.truncated_total = 0
        self._fwd = jax.jit(functools.partial(_forward, models=self.models, kind=kind))

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, kind: str | None = None, dtype=jnp.float32,
                        param_dtype=jnp.float32, resolution: int | None = None,
                        variant: str | None = None) -> "PromptEncoder":
        """From a diffusers pipeline folder. kind defaults to model_index.json (or, without one, whether
        text_encoder_2/ exists). A missing component is a MissingComponentError naming it and the folder."""

        folder = Path(folder)
        if not folder.is_dir():
            raise MissingComponentError(f"model folder {folder} does not exist")
        index = read_config(folder, "model_index.json") if (folder / "model_index.json").is_file() else {}
        if kind is None:
            if index:
                entry = index.get("text_encoder_2")
                kind = "sdxl" if isinstance(entry, (list, tuple)) and entry and entry[0] is not None else "sd1"
            else:
                kind = "sdxl" if (folder / "text_encoder_2").is_dir() else "sd1"
        names = ("tokenizer", "text_encoder") + (("tokenizer_2", "text_encoder_2") if kind == "sdxl" else ())
        require_components(folder, names)
        tokenizers, models, params, masks = [], [], [], []
        for tok_name, enc_name in zip(names[0::2], names[1::2]):
            tokenizers.append(load_tokenizer(folder / tok_name))
            model, p = load_clip_text(folder / enc_name, dtype, param_dtype, component=enc_name, variant=variant)
            models.append(model)
            params.append(p)
            masks.append(bool(read_config(folder / enc_name).get("use_attention_mask", False)))
        max_length = min(int(tokenizers[0].model_max_length), models[0].config.max_position_embeddings)
        if kind == "sdxl":
            _check_sdxl_unet(folder, models[1].config.projection_dim)
        if resolution is None:
            resolution = _default_resolution(folder, 1024 if kind == "sdxl" else 512)
        return cls(kind, tokenizers, models, params, max_length=max_length, use_attention_mask=masks,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   resolution=resolution, source=str(folder))

    # ------------------------------------------------------------- token-ids-only records (train encodes)
    ID_KEYS = ("input_ids", "input_ids_2")

    def encode_ids_cond(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """What a token-ids-only record stores instead of embeddings: the token ids per tokenizer (SDXL also
        its add_time_ids); `embed_ids` turns it into `encode`'s conditioning inside the train step."""
        ids, _, _ = self.tokenize(texts)  # (truncation was counted when these texts were encoded)
        out = {k: i for k, i in zip(self.ID_KEYS, ids)}
        if self.kind == "sdxl":
            out["add_time_ids"] = np.asarray(self.add_time_ids(len(ids[0])))
        return out

    def embed_ids(self, params, cond: dict) -> dict:
        """Pure and jittable: a token-ids conditioning -> the embeddings `encode` would give (attention masks as
        the encoders' configs say; only the padding mask is derived, from the pad token)."""
        ids = tuple(cond[k] for k in self.ID_KEYS[:len(self.models)])
        masks = tuple((i != tok.pad_token_id).astype(jnp.int32) if use else None
                      for i, tok, use in zip(ids, self.tokenizers, self.use_attention_mask))
        out = _forward(params, ids, masks, models=self.models, kind=self.kind)
        if self.kind == "sdxl":
            out["add_time_ids"] = cond["add_time_ids"].astype(jnp.float32)
        return out

    # ----------------------------------------------------------------------------------- encoding
    def tokenize(self, texts: Sequence[str], texts_2: Sequence[str] | None = None):
        """Token ids per encoder plus the per-prompt truncation flags (OR over the tokenizers); warns once per
        call when any prompt was cut."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        texts_2 = texts if texts_2 is None else ([texts_2] if isinstance(texts_2, str) else list(texts_2))
        if not texts:
            raise ValueError("no prompts to encode (empty batch)")
        if len(texts_2) != len(texts):
            raise ValueError(f"texts_2 has {len(texts_2)} prompts but texts has {len(texts)}")
        ids, masks, truncated = [], [], np.zeros(len(texts), bool)
        for tok, t in zip(self.tokenizers, (texts, texts_2)):
            i, a, cut = tokenize(tok, t, self.max_length)
            ids.append(i)
            masks.append(a)
            truncated |= cut
        n = int(truncated.sum())
        if n:
            first = texts[int(np.argmax(truncated))]
            warnings.warn(f"{n} of {len(texts)} prompt(s) exceed CLIP's {self.max_length} tokens and were "
                          f"truncated, e.g. {first[:80]!r}...", PromptTruncationWarning, stacklevel=3)
        return ids, masks, truncated

    def encode(self, texts: Sequence[str], texts_2: Sequence[str] | None = None, *, original_size=None,
               crops_coords_top_left=(0, 0), target_size=None) -> dict[str, Any]:
        """Conditioning for `texts` (SDXL: `texts_2` goes to encoder 2, default the same texts).

        Returns {"prompt_embeds", ["pooled_prompt_embeds", "add_time_ids"] (SDXL), "num_truncated"}; sizes
        default to (resolution, resolution) as the pipelines default to their sample size.
        """
        ids, masks, truncated = self.tokenize(texts, texts_2)
        self.truncated_total += int(truncated.sum())
        batch = ids[0].shape[0]
        attn = [a if use else None for a, use in zip(masks, self.use_attention_mask)]
        out = dict(self._fwd(self.params, tuple(ids), tuple(attn)))
        if self.kind == "sdxl":
            out["add_time_ids"] = self.add_time_ids(batch, original_size, crops_coords_top_left, target_size)
        out["num_truncated"] = np.int32(truncated.sum())
        return out

    def add_time_ids(self, batch: int, original_size=None, crops_coords_top_left=(0, 0), target_size=None):
        """SDXL's [B,6] time ids; sizes default to (resolution, resolution) like the pipeline's height/width."""
        size = (self.resolution, self.resolution)
        return jnp.asarray(sdxl_add_time_ids(batch, size if original_size is None else original_size,
                                             crops_coords_top_left, size if target_size is None else target_size))

    def encode_negative(self, batch_size: int, negative_texts: Sequence[str] | None = None,
                        negative_texts_2: Sequence[str] | None = None, **time_ids) -> dict[str, Any]:
        """Classifier-free-guidance negatives, as the pipelines build them: with no negative prompt, SDXL
        models with `force_zeros_for_empty_prompt` use zeros; otherwise the negative (default "") is encoded."""
        if negative_texts is None and self.force_zeros_for_empty_prompt:
            hidden = sum(m.config.hidden_size for m in self.models)
            out = {"prompt_embeds": jnp.zeros((batch_size, self.max_length, hidden), jnp.float32),
                   "pooled_prompt_embeds": jnp.zeros((batch_size, self.models[-1].config.projection_dim),
                                                     jnp.float32),
                   "add_time_ids": self.add_time_ids(batch_size, **time_ids),
                   "num_truncated": np.int32(0)}
            return out
        if negative_texts is None:
            negative_texts = [""] * batch_size
        negative_texts = [negative_texts] * batch_size if isinstance(negative_texts, str) else list(negative_texts)
        if negative_texts_2 is None:
            negative_texts_2 = negative_texts
        elif isinstance(negative_texts_2, str):
            negative_texts_2 = [negative_texts_2] * batch_size
        if len(negative_texts) != batch_size:
            raise ValueError(f"{len(negative_texts)} negative prompts for a batch of {batch_size}")
        return self.encode(negative_texts, negative_texts_2, **time_ids)


def encode_prompts(encoder: PromptEncoder, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                   *, prompts_2=None, negative_prompts_2=None, do_classifier_free_guidance: bool = True,
                   original_size=None, crops_coords_top_left=(0, 0), target_size=None) -> dict[str, Any]:
    """Everything the backbone consumes for one batch, named as diffusers' `encode_prompt` returns it.

    Keys: prompt_embeds, and with guidance negative_prompt_embeds; SDXL adds pooled_prompt_embeds,
    negative_pooled_prompt_embeds and add_time_ids (the pipeline uses the same ids for the negative half).
    num_truncated counts prompts cut at 77 tokens (for metrics).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sizes = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
    pos = encoder.encode(prompts, prompts_2, **sizes)
    out = {k: v for k, v in pos.items()}
    if do_classifier_free_guidance:
        neg = encoder.encode_negative(len(prompts), negative_prompts, negative_prompts_2, **sizes)
        out["negative_prompt_embeds"] = neg["prompt_embeds"]
        if encoder.kind == "sdxl":
            out["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"]
        out["num_truncated"] = np.int32(pos["num_truncated"] + neg["num_truncated"])
    return out


def _check_sdxl_unet(folder: Path, projection_dim: int) -> None:
    """Fail early, like the pipeline's `_get_add_time_ids`, if the UNet expects another add-embedding size."""
    path = folder / "unet" / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    want, per = cfg.get("projection_class_embeddings_input_dim"), cfg.get("addition_time_embed_dim")
    if want is not None and per is not None and want != 6 * per + projection_dim:
        raise ConversionError(
            f"{path}: projection_class_embeddings_input_dim is {want}, but 6 time ids x addition_time_embed_dim "
            f"{per} + text_encoder_2 projection_dim {projection_dim} = {6 * per + projection_dim}")


def _default_resolution(folder: Path, fallback: int) -> int:
    """unet sample_size x VAE scale factor, which is what the pipelines default height/width to."""
    unet, vae = folder / "unet" / "config.json", folder / "vae" / "config.json"
    try:
        sample = json.loads(unet.read_text())["sample_size"]
        blocks = json.loads(vae.read_text())["block_out_channels"] if vae.is_file() else [0] * 4
        return int(sample) * 2 ** (len(blocks) - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return fallback
