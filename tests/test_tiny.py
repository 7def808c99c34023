"""The embedded tiny model: deterministic bytes, a tokenizer that knows the shipped prompts, and a folder diffusers
loads whose UNet / text encoder / VAE give the same outputs as our JAX modules."""

import filecmp
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import backbones
from ddspo_jax.backbones import tiny as tiny_parts


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return backbones.ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return backbones.ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl")


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_two_builds_are_byte_identical(tiny_sd, tmp_path):
    other = backbones.build_tiny_model(tmp_path / "again")
    assert _files(tiny_sd) == _files(other)
    for f in _files(tiny_sd):
        assert filecmp.cmp(tiny_sd / f, other / f, shallow=False), f
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "scheduler/scheduler_config.json", "model_index.json"} <= set(_files(tiny_sd))


def test_ensure_is_cached_and_refuses_foreign_folders(tiny_sd, tmp_path):
    stamp = (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert backbones.ensure_tiny_model(tiny_sd) == tiny_sd
    assert (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tiny_sd.parent.iterdir() if ".tmp-" in p.name]  # the temp build folder is gone
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="foreign"):
        backbones.ensure_tiny_model(foreign)
    with pytest.raises(FileExistsError, match="sdxl"):  # the sd folder is not the sdxl model
        backbones.ensure_tiny_model(tiny_sd, family="sdxl")


def test_shipped_prompts_and_single_token_words(tiny_sd):
    from ddspo_jax.backbones.text import load_tokenizer

    lines = tiny_parts.TINY_PROMPTS.read_text().splitlines()
    assert lines == tiny_parts.compose_prompts()  # the committed file is what the generator makes
    assert 300 <= len(lines) == len(set(lines))
    tok = load_tokenizer(tiny_sd / "tokenizer")
    world = [json.loads(x)["prompt"] for f in ("world_eval.jsonl", "world_train.jsonl")
             for x in (tiny_parts.TINY_PROMPTS.parent / f).read_text().splitlines()]
    words = sorted({w for line in lines + world for w in re.findall(r"[a-z]+", line)})
    assert {"circle", "circles", "ring", "rings", "triangle", "squares"} <= set(words)
    for w in words:
        ids = tok(w)["input_ids"]
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS, the word, EOS
    ids = tok(lines[0], padding="max_length", max_length=77)["input_ids"]
    assert ids[0] == tok.bos_token_id and max(ids) == tok.eos_token_id == len(tok) - 1


def _close(a, b, tol=2e-5, name=""):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = float(np.abs(a - b).max())
    print(f"{name}: max abs diff {diff:.3g} (max |x| {np.abs(b).max():.3g})")
    assert diff <= tol * max(1.0, float(np.abs(b).max())), (name, diff)


def test_diffusers_loads_sd_and_outputs_match(tiny_sd):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddspo_jax.convert import load_clip_text, load_unet, load_vae

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([999, 17], np.int64)
    ids = pipe.tokenizer(["a red cat to the left of a blue dog", "two green books"], padding="max_length",
                         max_length=77, return_tensors="np")["input_ids"]
    with torch.no_grad():
        emb_t = pipe.text_encoder(torch.from_numpy(ids))[0]
        want = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), emb_t).sample
        img_t = pipe.vae.decode(torch.from_numpy(x).permute(0, 3, 1, 2) / pipe.vae.config.scaling_factor).sample
    te, te_p = load_clip_text(tiny_sd)
    emb = te.apply({"params": te_p}, jnp.asarray(ids, jnp.int32))["last_hidden_state"]
    _close(emb, emb_t.numpy(), name="text encoder")
    unet, unet_p = load_unet(tiny_sd)
    got = unet.apply({"params": unet_p}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(emb_t.numpy()))
    _close(got, want.permute(0, 2, 3, 1).numpy(), name="unet")
    vae, vae_p = load_vae(tiny_sd)
    img = vae.apply({"params": vae_p}, jnp.asarray(x), method="decode")
    assert img.shape == (2, 64, 64, 3)
    _close(img, img_t.permute(0, 2, 3, 1).numpy(), name="vae decode")


def test_diffusers_loads_sdxl_and_unet_matches(tiny_xl):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddspo_jax.convert import load_unet

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sc.timestep_spacing, sc.steps_offset, sc.beta_schedule) == ("leading", 1, "scaled_linear")
    assert json.loads((tiny_xl / "model_index.json").read_text())["force_zeros_for_empty_prompt"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([500.0, 3.0], np.float32)
    emb = rng.standard_normal((2, 77, 64)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [128, 96, 4, 0, 64, 64]], np.float32)
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(emb),
                         added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                            "time_ids": torch.from_numpy(time_ids)}).sample
    unet, p = load_unet(tiny_xl)
    got = unet.apply({"params": p}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(emb),
                     added_cond={"text_embeds": jnp.asarray(pooled), "time_ids": jnp.asarray(time_ids)})
    _close(got, want.permute(0, 2, 3, 1).numpy(), name="sdxl unet")


def test_the_tiny_vocabulary_knows_the_world_words():
    """backbones/tiny.py writes the scene world's words instead of importing the world (the world builds on
    it): the two lists must stay equal, so every world word stays a single token."""
    from ddspo_jax.world.scenes import COLORS, SHAPES

    assert tuple(tiny_parts.WORLD_SHAPES) == tuple(SHAPES) and tuple(tiny_parts.WORLD_COLOURS) == tuple(COLORS)
