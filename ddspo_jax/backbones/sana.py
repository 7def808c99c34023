"""The SANA family: a linear-attention DiT (models/sana.py) trained with flow matching, conditioned by Gemma-2
(models/gemma.py) and decoded by DC-AE (models/dcae.py); `SanaBackbone` puts them behind the interface.

Prompt encoding is exactly diffusers' `SanaPipeline.encode_prompt`:

  * prompts are lower-cased and stripped (clean_caption=False, the pipeline's default);
  * the "complex human instruction" (paper Sec. 3.1 of SANA; the pipeline's default list, joined by newlines)
    is prepended to each prompt; the tokenizer pads right to num_instruction_tokens + max_sequence_length - 2;
  * Gemma-2 runs on the whole padded sequence with its attention mask; then only position 0 (BOS) and the
    last max_sequence_length - 1 positions are kept, embeddings and mask alike (300 by default);
  * negative prompts are encoded without the instruction, padded to max_sequence_length, nothing dropped.
Tokenization stays in Python (transformers' Gemma tokenizer from the pipeline's `tokenizer/`); Gemma runs in
JAX under one jit.
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

from ddspo_jax.backbones.base import Backbone
from ddspo_jax.backbones.tiny import FAKE_DIFFUSERS_VERSION, fill_params, write_json
from ddspo_jax.convert import export_dcae, export_gemma2, load_dcae
from ddspo_jax.convert.common import ConversionError, read_config
from ddspo_jax.convert.gemma import load_gemma2
from ddspo_jax.convert.sana import export_sana, export_sana_lora, load_sana, LORA_TARGETS
from ddspo_jax.models.dcae import AutoencoderDC, DCAEConfig
from ddspo_jax.models.gemma import Gemma2Config, Gemma2Model
from ddspo_jax.models.sana import SanaTransformer2DModel

COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def load_gemma_tokenizer(folder: str | os.PathLike):
    """The pipeline's Gemma tokenizer from a local folder (tokenizer.json); never downloads."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder}: no usable Gemma tokenizer ({e})") from None
    tok.padding_side = "right"  # what SanaPipeline sets before every call
    return tok


@functools.partial(jax.jit, static_argnums=0)
def _hidden(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)


class SanaPromptEncoder:
    """`encode(prompts)` / `encode_negative(n, texts)` -> {"prompt_embeds" [B, L, D], "prompt_attention_mask"
    [B, L]} as numpy arrays in the encoder's dtype (L = max_sequence_length)."""

    def __init__(self, tokenizer, model, params, *, max_sequence_length: int = 300,
                 instruction: Sequence[str] | None = COMPLEX_HUMAN_INSTRUCTION):
        self.tokenizer, self.model, self.params = tokenizer, model, params
        self.max_sequence_length = int(max_sequence_length)
        self.instruction = tuple(instruction or ())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype=jnp.bfloat16, **kw) -> "SanaPromptEncoder":

        folder = Path(folder)
        model, params = load_gemma2(folder, dtype=dtype, param_dtype=dtype)
        return cls(load_gemma_tokenizer(folder / "tokenizer"), model, params, **kw)

    def tokenize(self, texts: Sequence[str], *, instruction: bool = True) -> tuple[np.ndarray, np.ndarray]:
        texts = [t.lower().strip() for t in texts]
        length = self.max_sequence_length
        if instruction and self.instruction:
            chi = "\n".join(self.instruction)
            texts = [chi + t for t in texts]
            length = len(self.tokenizer.encode(chi)) + self.max_sequence_length - 2
        out = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def _run(self, ids, mask):
        return np.asarray(_hidden(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask)))

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = self.tokenize(texts, instruction=True)
        keep = [0] + list(range(ids.shape[1] - self.max_sequence_length + 1, ids.shape[1]))
        emb = self._run(ids, mask)
        return {"prompt_embeds": emb[:, keep], "prompt_attention_mask": mask[:, keep]}

    def encode_negative(self, batch_size: int, negative_texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        texts = list(negative_texts) if negative_texts is not None else [""] * batch_size
        ids, mask = self.tokenize(texts, instruction=False)
        return {"prompt_embeds": self._run(ids, mask), "prompt_attention_mask": mask}

    # ------------------------------------------------------------- token-ids-only records (train encodes)
    def encode_ids_cond(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """What a token-ids record stores: the instruction-prefixed ids and their mask (`embed_ids` runs Gemma
        on them inside the train step and keeps the same positions as `encode`)."""
        ids, mask = self.tokenize(texts, instruction=True)
        return {"input_ids": ids, "attention_mask": mask}

    def embed_ids(self, params, cond: dict) -> dict:
        """Pure and jittable: token ids -> `encode`'s conditioning (BOS + the last max_sequence_length - 1)."""
        ids, mask = cond["input_ids"], cond["attention_mask"]
        emb = self.model.apply({"params": params}, ids, mask)
        keep = np.array([0] + list(range(ids.shape[1] - self.max_sequence_length + 1, ids.shape[1])))
        return {"prompt_embeds": emb[:, keep], "prompt_attention_mask": mask[:, keep]}


# ------------------------------------------------------------------------------------------ backbone
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'-> \n"


def _mask_prefix(mask: np.ndarray) -> int | None:
    """n when `mask` is n ones then zeros (right padding), else None."""
    n = int(mask.sum())
    return n if mask[:n].all() else None


class SanaBackbone(Backbone):
    family = "sana"
    pipeline_class = "SanaPipeline"
    denoiser_folder = "transformer"
    # The paper's SANA sampler (App.): DPM-Solver++ 2M with flow sigmas, 20 steps, CFG 4.5, 1024^2.
    defaults = dict(guidance=4.5, steps=20, resolution=1024, sampler="flow_dpmpp_2m")
    lora_targets = LORA_TARGETS
    lora_a_std = "rank"  # PEFT's "gaussian" init (std 1/r), as the release's SANA LoRA

    @classmethod
    def matches(cls, folder: Path) -> bool:
        path = folder / "transformer" / "config.json"
        return path.is_file() and json.loads(path.read_text()).get("_class_name") == "SanaTransformer2DModel"

    @classmethod
    def load_denoiser(cls, folder, dtype, param_dtype, *, attention=None, remat_policy="none"):

        model, params = load_sana(folder, dtype, param_dtype, attention_impl=attention, remat_policy=remat_policy)
        return model, jax.tree.map(np.asarray, params)

    @classmethod
    def export_denoiser(cls, base, params, out_dir, dtype="float32"):

        return export_sana(read_config(Path(base) / "transformer"), params, out_dir, dtype=dtype)

    @classmethod
    def export_lora(cls, factors, alpha, path):

        return export_sana_lora(factors, alpha, path)

    @property
    def vae_scale(self) -> int:
        if self.vae is not None:
            return self.vae.downscale
        path = self.path / "vae" / "config.json"
        blocks = json.loads(path.read_text()).get("encoder_block_out_channels", [0] * 6) if path.is_file() else [0] * 6
        return 2 ** (len(blocks) - 1)

    def denoise(self, params, x_t, t, cond, gather=None):
        return self._apply(params, gather, x_t, t, cond["prompt_embeds"], cond.get("prompt_attention_mask"))

    def record_cond(self, cond):
        """Only the unmasked rows (a 300 x 2304 bf16 matrix is 1.4 MB per prompt; most rows are padding): the
        loader zero-pads them back, and padding rows are masked out of cross-attention, so nothing changes."""
        mask_key = "prompt_attention_mask" if "prompt_attention_mask" in cond else "attention_mask"
        mask = cond.get(mask_key)
        n = None if mask is None else _mask_prefix(np.asarray(mask))
        if n is None:
            return cond
        length = mask.shape[0]
        return {k: (v[:n] if np.ndim(v) and np.shape(v)[0] == length else v) for k, v in cond.items()}

    def _load_encoder(self):
        return SanaPromptEncoder.from_pretrained(self.path, dtype=self.denoiser.dtype)  # bf16 unless float32 runs

    def _load_vae(self):

        return load_dcae(self.path)

    def _vae_encode(self, params, x):  # DC-AE leaves the scaling to its caller, as in diffusers
        return self.vae.apply({"params": params}, x, method="encode") * self.vae.config.scaling_factor

    def _vae_decode(self, params, z):
        return self.vae.apply({"params": params}, z.astype(jnp.float32) / self.vae.config.scaling_factor,
                              method="decode").astype(jnp.float32)

    # ---------------------------------------------------------------------------- the tiny model
    @classmethod
    def build_tiny(cls, out: Path, seed: int = 0) -> None:
        """A SanaPipeline folder: 2-block SANA transformer (patch 1, 16x16 latents), 3-level DC-AE (f4: 64x64
        images), 2-layer Gemma-2 (hidden 16) with a character-level Gemma tokenizer, DPM-Solver++ flow scheduler."""
        from transformers.models.gemma.tokenization_gemma import GemmaTokenizer


        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
        for ch in sorted(set(_TINY_CHARS) - {" "}):
            vocab[ch] = len(vocab)
        GemmaTokenizer(vocab=vocab, merges=[]).save_pretrained(out / "tokenizer")
        gemma = {"architectures": ["Gemma2Model"], "model_type": "gemma2", "vocab_size": len(vocab),
                 "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64,
                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation":
                 "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                 "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False}
        export_gemma2(gemma, fill_params(Gemma2Model(Gemma2Config.from_dict(gemma)).init_shapes(), seed + 2),
                      out / "text_encoder")
        tr = SanaTransformer2DModel.from_config(dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            mlp_ratio=2.5, sample_size=16, patch_size=1))
        export_sana(tr, fill_params(tr.init_shapes(), seed), out / "transformer")
        dcae = dict(_class_name="AutoencoderDC", _diffusers_version=FAKE_DIFFUSERS_VERSION, in_channels=3,
                    latent_channels=4, attention_head_dim=8,
                    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                    encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
                    encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
                    encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]],
                    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                    decoder_act_fns="silu", scaling_factor=0.41407)
        export_dcae(dcae, fill_params(AutoencoderDC(DCAEConfig.from_dict(dcae)).init_shapes(), seed + 1), out / "vae")
        (out / "scheduler").mkdir(exist_ok=True)
        write_json(out / "scheduler" / "scheduler_config.json", {  # as the released SANA pipelines ship it
            "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": FAKE_DIFFUSERS_VERSION,
            "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
            "timestep_spacing": "linspace", "use_flow_sigmas": True})
        write_json(out / "model_index.json", {
            "_class_name": cls.pipeline_class, "_diffusers_version": FAKE_DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", "GemmaTokenizer"], "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"]})
