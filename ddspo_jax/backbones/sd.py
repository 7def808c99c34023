"""The Stable Diffusion families: SD-1.x (one CLIP encoder) and SDXL (two, plus pooled embeddings and time ids
as added conditioning). Both denoise with `models.unet.UNet2DConditionModel` and decode with the KL VAE."""

from __future__ import annotations

import json
from pathlib import Path

from ddspo_jax.backbones.base import Backbone, kl_vae_scale
from ddspo_jax.backbones.text import _default_resolution, PromptEncoder
from ddspo_jax.backbones.tiny import (
    clip_text_config, EOS, FAKE_DIFFUSERS_VERSION, fill_params, write_clip_tokenizer, write_json
)
from ddspo_jax.convert import export_clip_text, export_unet, export_vae, load_unet, load_vae
from ddspo_jax.convert.common import read_config
from ddspo_jax.convert.unet import export_lora
from ddspo_jax.errors import ModelError
from ddspo_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ddspo_jax.models.unet import UNet2DConditionModel
from ddspo_jax.models.vae import AutoencoderKL



class SD1Backbone(Backbone):
    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_folder = "unet"
    defaults = dict(guidance=7.5, steps=25, resolution=512, sampler="pndm")  # PNDM: SD-1.x's shipped scheduler
    encoder_kind = "sd1"

    @classmethod
    def _is_xl_unet(cls, folder: Path) -> bool | None:
        path = folder / "unet" / "config.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get("addition_embed_type") == "text_time"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return cls._is_xl_unet(folder) is False

    @classmethod
    def load_denoiser(cls, folder, dtype, param_dtype, *, attention=None, remat_policy="none"):

        unet, params = load_unet(folder, dtype, param_dtype, attention_impl=attention, remat_policy=remat_policy,
                                 on_host=True)
        if (unet.config.addition_embed_type == "text_time") != (cls.family == "sdxl"):
            raise ModelError(f"{folder / 'model_index.json'} names a {cls.pipeline_class} but {folder / 'unet'} is "
                             f"{'an SDXL' if cls.family != 'sdxl' else 'an SD-1.x-style'} UNet")
        return unet, params

    @classmethod
    def export_denoiser(cls, base, params, out_dir, dtype="float32"):

        return export_unet(read_config(Path(base) / "unet"), params, out_dir, dtype=dtype)

    @classmethod
    def export_lora(cls, factors, alpha, path):

        return export_lora(factors, alpha, path)

    @property
    def vae_scale(self) -> int:
        return kl_vae_scale(self)

    def default_resolution(self) -> int:
        if self.encoder is not None:
            return self.encoder.resolution
        return _default_resolution(self.path, self.defaults["resolution"])

    def set_resolution(self, resolution: int) -> None:
        if self.encoder is not None:
            self.encoder.resolution = resolution  # SDXL time ids follow the sampled size

    def _added(self, cond):
        return None

    def denoise(self, params, x_t, t, cond, gather=None):
        return self._apply(params, gather, x_t, t, cond["prompt_embeds"], added_cond=self._added(cond))

    def _load_encoder(self):

        return PromptEncoder.from_pretrained(self.path, kind=self.encoder_kind)

    def _load_vae(self):

        return load_vae(self.path)

    # ---------------------------------------------------------------------------- the tiny model
    @classmethod
    def _tiny_unet(cls) -> dict:  # SD-1.x: cross-attention in the high-resolution blocks, conv projections
        return {**_TINY_UNET, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4,
                "cross_attention_dim": 32}

    _tiny_vae_scaling = 0.18215
    _tiny_scheduler = "DDIMScheduler"

    @classmethod
    def _tiny_index(cls) -> dict:
        return {"requires_safety_checker": False, "safety_checker": [None, None]}

    @classmethod
    def _tiny_encoders(cls):

        return [("text_encoder", "tokenizer", False, "quick_gelu", EOS)]

    @classmethod
    def build_tiny(cls, out: Path, seed: int = 0) -> None:
        """UNet (2 levels, 32/64 channels), CLIP text encoder(s) with the tiny BPE tokenizer, an f4 VAE
        (16x16 latents <-> 64x64 images) and the family's scheduler."""

        unet_cfg = cls._tiny_unet()
        export_unet(unet_cfg, fill_params(UNet2DConditionModel.from_config(unet_cfg).init_shapes(), seed),
                    out / "unet")
        vae_cfg = dict(_class_name="AutoencoderKL", _diffusers_version=FAKE_DIFFUSERS_VERSION, act_fn="silu",
                       block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                       up_block_types=["UpDecoderBlock2D"] * 3, in_channels=3, out_channels=3, latent_channels=4,
                       layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=cls._tiny_vae_scaling)
        export_vae(vae_cfg, fill_params(AutoencoderKL.from_config(vae_cfg).init_shapes(), seed + 1), out / "vae")
        for i, (enc, tok, proj, act, pad) in enumerate(cls._tiny_encoders()):
            cfg = clip_text_config(proj, act)
            model = CLIPTextModel(CLIPTextConfig.from_dict(cfg))
            export_clip_text(cfg, fill_params(model.init_shapes(), seed + 2 + i), out / enc)
            write_clip_tokenizer(out / tok, pad)
        sched = dict(_diffusers_version=FAKE_DIFFUSERS_VERSION, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
                     steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                     trained_betas=None, _class_name=cls._tiny_scheduler)
        if cls._tiny_scheduler == "EulerDiscreteScheduler":
            sched.update(interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0,
                         skip_prk_steps=True)
        (out / "scheduler").mkdir(exist_ok=True)
        write_json(out / "scheduler" / "scheduler_config.json", sched)
        write_json(out / "model_index.json", {
            "_class_name": cls.pipeline_class, "_diffusers_version": FAKE_DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", cls._tiny_scheduler], **cls._tiny_index()})


class SDXLBackbone(SD1Backbone):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    defaults = dict(guidance=5.0, steps=25, resolution=1024, sampler="euler")
    encoder_kind = "sdxl"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return cls._is_xl_unet(folder) is True

    def _added(self, cond):
        return {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]}

    # SDXL's tiny: attention only in the low-resolution block, linear projections, text_time added conditioning
    @classmethod
    def _tiny_unet(cls) -> dict:
        return {**_TINY_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
                "cross_attention_dim": 64, "use_linear_projection": True, "transformer_layers_per_block": [1, 1],
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32}

    _tiny_vae_scaling = 0.13025
    _tiny_scheduler = "EulerDiscreteScheduler"

    @classmethod
    def _tiny_index(cls) -> dict:
        return {"force_zeros_for_empty_prompt": True, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"]}

    @classmethod
    def _tiny_encoders(cls):  # SDXL's second tokenizer pads with "!" as the real one does
        return super()._tiny_encoders() + [("text_encoder_2", "tokenizer_2", True, "gelu", "!")]


_TINY_UNET = dict(
    _class_name="UNet2DConditionModel", _diffusers_version=FAKE_DIFFUSERS_VERSION, act_fn="silu",
    block_out_channels=[32, 64], layers_per_block=1, in_channels=4, out_channels=4, sample_size=16,
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=8)


def from_unet(unet, schedule, path: Path = Path(".")) -> SD1Backbone:
    """A backbone around an already-built UNet (benchmarks and tests without a pipeline folder)."""
    cls = SDXLBackbone if unet.config.addition_embed_type == "text_time" else SD1Backbone
    return cls(Path(path), unet, None, schedule)
