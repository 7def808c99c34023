"""The SD3 family: an MMDiT (models/mmdit.py) trained with flow matching, conditioned by two CLIP encoders and
T5-XXL (models/clip_text.py, models/t5.py), decoded by the 16-channel KL VAE (models/vae.py: shift and scale);
`SD3Backbone` puts them behind the interface.

Prompt encoding is diffusers' `StableDiffusion3Pipeline.encode_prompt`:
  * CLIP-L and CLIP-G (both `CLIPTextModelWithProjection`, no attention mask, 77 tokens): penultimate hidden
    states concatenated (768 + 1280 = 2048 features), zero-padded to T5's width (4096);
  * T5 (no attention mask: padding tokens are attended to, as the pipeline does) on `max_sequence_length`
    tokens, its last hidden state appended after the 77 CLIP rows: prompt_embeds [B, 77 + L, 4096];
  * pooled_prompt_embeds: the two projected EOS states concatenated [B, 2048];
  * no T5 in the folder (SD3's "without T5" variant): zeros in its place, as the pipeline;
  * the negative prompt "" is encoded the same way (not zeros).
L is 77 here (the release's `--max_sequence_length` for SD3); the diffusers pipeline's default is 256. The
records store these embeddings (prepare runs the encoders once); token-id records are refused for SD3, so
T5-XXL's 4.7 B parameters never enter the train step.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.backbones.base import Backbone, kl_vae_scale
from ddspo_jax.backbones.text import load_tokenizer, require_components, tokenize
from ddspo_jax.backbones.tiny import (
    clip_text_config, EOS, FAKE_DIFFUSERS_VERSION, fill_params, prompt_words, write_clip_tokenizer, write_json
)
from ddspo_jax.convert import export_clip_text, export_vae, load_vae
from ddspo_jax.convert.clip import load_clip_text
from ddspo_jax.convert.common import ConversionError, read_config
from ddspo_jax.convert.mmdit import export_mmdit, export_mmdit_lora, load_mmdit, LORA_TARGETS
from ddspo_jax.convert.t5 import export_t5, load_t5
from ddspo_jax.errors import ConfigError
from ddspo_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ddspo_jax.models.mmdit import SD3Transformer2DModel
from ddspo_jax.models.t5 import T5Config, T5EncoderModel
from ddspo_jax.models.vae import AutoencoderKL

CLIP_LENGTH = 77


def load_t5_tokenizer(folder: str | os.PathLike):
    """The pipeline's T5 tokenizer from a local folder; never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder}: no usable T5 tokenizer ({e})") from None


def _forward(params, clip_ids, t5_ids, *, clips, t5, length, width):
    """(prompt_embeds [B, 77 + length, width], pooled [B, sum of projection dims]) in float32."""
    outs = [m.apply({"params": p}, i) for m, p, i in zip(clips, params[:2], clip_ids)]
    clip = jnp.concatenate([o["hidden_states"][-2] for o in outs], -1).astype(jnp.float32)
    pooled = jnp.concatenate([o["text_embeds"] for o in outs], -1).astype(jnp.float32)
    b = clip.shape[0]
    if t5 is None:
        t5_out = jnp.zeros((b, length, width), jnp.float32)
    else:
        t5_out = t5.apply({"params": params[2]}, t5_ids).astype(jnp.float32)
    # zero-padded to T5's width (torch's F.pad with a negative width crops instead: mirrored)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, max(width - clip.shape[-1], 0))))[..., :width]
    return jnp.concatenate([clip, t5_out], 1), pooled


class SD3PromptEncoder:
    """`encode(prompts)` / `encode_negative(n, texts)` -> {"prompt_embeds" [B, 77 + L, 4096],
    "pooled_prompt_embeds" [B, 2048]} as numpy float32; `truncated_total` counts prompts cut to 77 CLIP tokens
    or L T5 tokens."""

    def __init__(self, clip_tokenizers, clip_models, clip_params, t5_tokenizer=None, t5_model=None, t5_params=None,
                 *, max_sequence_length: int = CLIP_LENGTH, joint_attention_dim: int = 4096):
        for m in clip_models:
            if not m.config.with_projection:
                raise ConversionError("SD3's text_encoder and text_encoder_2 must be CLIPTextModelWithProjection")
        self.tokenizers, self.t5_tokenizer = tuple(clip_tokenizers), t5_tokenizer
        self.max_sequence_length = int(max_sequence_length)
        width = t5_model.config.d_model if t5_model is not None else int(joint_attention_dim)
        self.params = (*clip_params, t5_params)
        self.truncated_total = 0
        self._fwd = jax.jit(functools.partial(_forward, clips=tuple(clip_models), t5=t5_model,
                                              length=self.max_sequence_length, width=width))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype=jnp.float32,
                        max_sequence_length: int = CLIP_LENGTH) -> "SD3PromptEncoder":
        folder = Path(folder)
        require_components(folder, ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"))
        toks, models, params = [], [], []
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            toks.append(load_tokenizer(folder / tok))
            m, p = load_clip_text(folder / enc, dtype, dtype, component=enc)
            models.append(m)
            params.append(p)
        t5 = (None, None, None)
        if (folder / "text_encoder_3").is_dir():
            require_components(folder, ("tokenizer_3",))
            model, p = load_t5(folder / "text_encoder_3", dtype, dtype, component="text_encoder_3")
            t5 = (load_t5_tokenizer(folder / "tokenizer_3"), model, p)
        joint = read_config(folder / "transformer").get("joint_attention_dim", 4096)
        return cls(toks, models, params, *t5, max_sequence_length=max_sequence_length, joint_attention_dim=joint)

    def tokenize(self, texts: Sequence[str]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no prompts to encode (empty batch)")
        ids, truncated = [], np.zeros(len(texts), bool)
        for tok in self.tokenizers:
            i, _, cut = tokenize(tok, texts, CLIP_LENGTH)
            ids.append(i)
            truncated |= cut
        t5_ids = None
        if self.t5_tokenizer is not None:
            t5_ids, _, cut = tokenize(self.t5_tokenizer, texts, self.max_sequence_length)
            truncated |= cut
        return tuple(ids), t5_ids, truncated

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        clip_ids, t5_ids, truncated = self.tokenize(texts)
        self.truncated_total += int(truncated.sum())
        emb, pooled = self._fwd(self.params, clip_ids, t5_ids)
        return {"prompt_embeds": np.asarray(emb), "pooled_prompt_embeds": np.asarray(pooled),
                "num_truncated": np.int32(truncated.sum())}

    def encode_negative(self, batch_size: int, negative_texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        texts = list(negative_texts) if negative_texts is not None else [""] * batch_size
        return self.encode(texts)

    def encode_ids_cond(self, texts):
        raise ConfigError("data.cond_mode=token_ids: not for SD3 (T5-XXL's 4.7 B parameters would run inside "
                          "the train step); SD3 records hold embeddings (data.cond_mode=embeddings)")


class SD3Backbone(Backbone):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_folder = "transformer"
    # The release's SD3 preparation (ddspo/prepare_latents.py): the pipeline's FlowMatchEuler scheduler,
    # 25 steps, CFG 7.5 (scripts/prepare_latents.sh), 1024^2.
    defaults = dict(guidance=7.5, steps=25, resolution=1024, sampler="flow_euler")
    lora_targets = LORA_TARGETS
    lora_a_std = "rank"  # PEFT's "gaussian" init (std 1/r), as the release's SD3 LoRA

    @classmethod
    def matches(cls, folder: Path) -> bool:
        path = folder / "transformer" / "config.json"
        return path.is_file() and json.loads(path.read_text()).get("_class_name") == "SD3Transformer2DModel"

    @classmethod
    def load_denoiser(cls, folder, dtype, param_dtype, *, attention=None, remat_policy="none"):
        model, params = load_mmdit(folder, dtype, param_dtype, attention_impl=attention, remat_policy=remat_policy)
        return model, jax.tree.map(np.asarray, params)

    @classmethod
    def export_denoiser(cls, base, params, out_dir, dtype="float32"):
        return export_mmdit(read_config(Path(base) / "transformer"), params, out_dir, dtype=dtype)

    @classmethod
    def export_lora(cls, factors, alpha, path):
        return export_mmdit_lora(factors, alpha, path)

    @property
    def vae_scale(self) -> int:
        return kl_vae_scale(self)

    def denoise(self, params, x_t, t, cond, gather=None):
        return self._apply(params, gather, x_t, t, cond["prompt_embeds"], cond["pooled_prompt_embeds"])

    def _load_encoder(self):
        return SD3PromptEncoder.from_pretrained(self.path, dtype=self.denoiser.dtype)

    def _load_vae(self):
        return load_vae(self.path)

    # ---------------------------------------------------------------------------- the tiny model
    @classmethod
    def build_tiny(cls, out: Path, seed: int = 0) -> None:
        """A StableDiffusion3Pipeline folder: a 2-block MMDiT (patch 2, 16x16 latents), a 16-channel f4 VAE
        (64x64 images) with SD3's shift, two tiny CLIPs with projection and the tiny BPE tokenizer, a 2-layer
        T5 (gated GELU) with a word-level T5 tokenizer, FlowMatchEuler (shift 3)."""
        from transformers import T5Tokenizer

        clip_dims = []
        for i, (enc, tok, pad) in enumerate((("text_encoder", "tokenizer", EOS), ("text_encoder_2", "tokenizer_2", "!"))):
            cfg = clip_text_config(True, "quick_gelu" if i == 0 else "gelu")
            export_clip_text(cfg, fill_params(CLIPTextModel(CLIPTextConfig.from_dict(cfg)).init_shapes(), seed + 2 + i),
                             out / enc)
            write_clip_tokenizer(out / tok, pad)
            clip_dims.append(cfg["projection_dim"])
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
        pieces += [(f"\u2581{w}", -1.0) for w in prompt_words()] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789,."]
        T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(out / "tokenizer_3"))
        t5 = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": len(pieces), "d_model": 80,
              "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
              "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
              "is_gated_act": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
        export_t5(t5, fill_params(T5EncoderModel(T5Config.from_dict(t5)).init_shapes(), seed + 4), out / "text_encoder_3")
        tr = SD3Transformer2DModel.from_config(dict(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=80, caption_projection_dim=16, pooled_projection_dim=sum(clip_dims),
            out_channels=16, pos_embed_max_size=16))
        export_mmdit(tr, fill_params(tr.init_shapes(), seed), out / "transformer")
        vae = dict(_class_name="AutoencoderKL", _diffusers_version=FAKE_DIFFUSERS_VERSION, act_fn="silu",
                   block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                   up_block_types=["UpDecoderBlock2D"] * 3, in_channels=3, out_channels=3, latent_channels=16,
                   layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.5305,
                   shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        export_vae(vae, fill_params(AutoencoderKL.from_config(vae).init_shapes(), seed + 1), out / "vae")
        (out / "scheduler").mkdir(exist_ok=True)
        write_json(out / "scheduler" / "scheduler_config.json", {  # as SD3-Medium ships it
            "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": FAKE_DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "shift": 3.0})
        write_json(out / "model_index.json", {
            "_class_name": cls.pipeline_class, "_diffusers_version": FAKE_DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]})
