"""The trainable model and its frozen reference, assembled for the step: what train() needs from a config,
a backbone and a mesh, in one tested function.

  full fine-tune  the denoiser's float32 master weights are trained, fsdp-sharded; a second, frozen copy (in
                  model.ref_dtype) is the reference.
  LoRA            only low-rank factors are trained; the frozen base is both the model's base and the
                  reference (no second copy held); sft_pair trains the winning and losing adapters side by side.
  token-id records  the frozen text encoder(s) join the reference and run inside the step.
  DD-CPP          (train.cpp = "pair") the frozen winning / losing adapters of an sft_pair run, applied to the
                  reference where the objective asks for the pair's targets.

Every frozen tree lives in `ref_params` ("unet", + "text", + "pair"), sharded like the model, so the step's
gathers treat them alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax import checkpoint, lora, parallel
from ddspo_jax.errors import ConfigError


@dataclasses.dataclass
class Trainable:
    params: Any  # the trainable tree, sharded (a denoiser, LoRA factors, or sft_pair's {"w", "l"} factors)
    ref_params: dict  # the frozen trees, sharded: "unet", + "text" (token-id records), + "pair" (DD-CPP)
    denoise_ref: Callable  # (ref, x, t, cond, gather, adapters=None) -> the reference's prediction
    model_apply: Callable  # (params, ref, x, t, cond, gather_p, gather_r) -> the model's prediction
    to_unet_params: Callable  # (params, ref) -> the trained denoiser's params (for sample grids, evaluation)


def _as_is(r, c, g):
    """Records hold the conditioning itself (embeddings): nothing to run."""
    return c


def make_denoisers(backbone, embed=_as_is, pair_alpha: float | None = None):
    """(base_denoise, denoise_ref): the frozen base with LoRA terms x A B where factors say, and the reference
    as the step calls it -- `adapters` names the DD-CPP pair's adapter per row block ("w", "l" or None)."""
    def base_denoise(r, x, t, c, gr, factors=None, alpha=1.0):
        """The frozen base (blocks gathered per call), with LoRA terms x A B added where factors say."""
        with lora.forward(factors, alpha):
            return backbone.denoise(r["unet"], x, t, embed(r, c, gr), gather=gr.at("unet"))

    def denoise_ref(r, x, t, c, gr, adapters=None):
        if adapters is None:
            return base_denoise(r, x, t, c, gr)
        pair = gr(r["pair"], ("pair",))
        return base_denoise(r, x, t, c, gr, lora.stack(*[None if a is None else pair[a] for a in adapters]),
                            pair_alpha)

    return base_denoise, denoise_ref


def load_cpp_pair(cfg, base_unet, targets):
    """(the {"w", "l"} LoRA factors of the sft_pair run `train.cpp_pair` at its latest step, their alpha);
    errors name the folder and what is wrong with it."""
    run = Path(cfg.train.cpp_pair)
    pair_cfg = checkpoint.run_config(run)
    if pair_cfg.get("train", {}).get("objective") != "sft_pair":
        raise ConfigError(f"train.cpp_pair={run}: that run's train.objective is "
                          f"{pair_cfg.get('train', {}).get('objective')!r}, not 'sft_pair'")
    if pair_cfg["model"]["path"] != cfg.model.path:
        raise ConfigError(f"train.cpp_pair={run} was trained on model.path={pair_cfg['model']['path']!r}, this run "
                          f"uses {cfg.model.path!r}: the pair's adapters only make sense on their own base")
    params, _, _ = checkpoint.restore_checkpoint_params(run)
    want = jax.tree.map(lambda x: x.shape, lora.init(base_unet, pair_cfg["model"]["lora_rank"], jax.random.key(0), targets))
    got = {k: jax.tree.map(lambda x: x.shape, params.get(k, {})) for k in ("w", "l")}
    if got["w"] != want or got["l"] != want:
        raise ConfigError(f"train.cpp_pair={run}: its adapters do not fit this base UNet's attention projections")
    return params, checkpoint.lora_alpha(pair_cfg)


def build(cfg, backbone, mesh, manifest: dict, log=print) -> Trainable:
    """The trainable params and the frozen reference on `mesh`, and the functions the step calls. Takes the
    backbone's host params (numpy) over: only shards go to devices, and `backbone.params` is left None."""
    host_unet, backbone.params = backbone.params, None
    ref_dtype = jnp.dtype(cfg.model.ref_dtype or cfg.model.dtype)
    frozen = lambda tree: parallel.shard_tree(jax.tree.map(lambda x: np.asarray(x).astype(ref_dtype), tree), mesh)  # noqa: E731
    ref_params = {"unet": frozen(host_unet)}
    embed = _as_is
    if "input_ids" in manifest.get("conditioning", {}):  # token-ids-only records: run the frozen encoders here
        backbone.load_extras(text=True, vae=False)
        ref_params["text"] = frozen(backbone.text_params)
        embed = lambda r, c, g: backbone.embed_ids(g(r["text"], ("text",)), c)  # noqa: E731
        log("records hold token ids: the step runs the frozen text encoder(s)")
    pair_alpha = None
    if cfg.train.cpp == "pair":  # DD-CPP: the frozen winning / losing adapters of an sft_pair run
        pair, pair_alpha = load_cpp_pair(cfg, host_unet, backbone.lora_targets)
        ref_params["pair"] = frozen(pair)
        log(f"DD-CPP targets from the trained pair in {cfg.train.cpp_pair} ({lora.count(pair):,} parameters)")
    base_denoise, denoise_ref = make_denoisers(backbone, embed, pair_alpha)

    if cfg.model.lora_rank > 0:  # train low-rank factors on the frozen base, which is also the reference
        alpha = cfg.model.lora_alpha or float(cfg.model.lora_rank)
        rank, key0 = cfg.model.lora_rank, jax.random.key(cfg.seed + 1)
        lora_init = lambda p, k: lora.init(p, rank, k, backbone.lora_targets, backbone.lora_a_std)  # noqa: E731
        if cfg.train.objective == "sft_pair":  # the winning and losing adapters, trained side by side
            factors = {"w": lora_init(host_unet, jax.random.fold_in(key0, 0)),
                       "l": lora_init(host_unet, jax.random.fold_in(key0, 1))}
            adapters_of = lambda f: lora.stack(f["w"], f["l"])  # noqa: E731  (x_t^w rows, then x_t^l rows)
            merged_of = lambda f: f["w"]  # noqa: E731  (the sample grid shows the winning adapter)
        else:
            factors = lora_init(host_unet, key0)
            adapters_of = merged_of = lambda f: f  # noqa: E731
        log(f"LoRA rank {rank}: {lora.count(factors):,} trainable parameters")

        def model_apply(p, r, x, t, c, gp, gr):  # x W + (x A) B: gradients and optimizer state for the factors only
            return base_denoise(r, x, t, c, gr, adapters_of(gp(p)), alpha)
        return Trainable(parallel.shard_tree(factors, mesh), ref_params, denoise_ref, model_apply,
                         jax.jit(lambda p, r: lora.merge(r["unet"], merged_of(p), alpha)))

    def model_apply(p, r, x, t, c, gp, gr):  # full fine-tune: float32 master weights, fsdp-sharded like the reference
        return backbone.denoise(p, x, t, embed(r, c, gr), gather=gp)
    return Trainable(parallel.shard_tree(host_unet, mesh), ref_params, denoise_ref, model_apply, lambda p, r: p)
