"""SD3 through the whole road on the embedded tiny SD3 pipeline: the prompt encoding against
`StableDiffusion3Pipeline.encode_prompt` (with T5, and without it as SD3's "no T5" variant loads), prepare ->
LoRA DDSPO training in x_0 space -> export (merged pipeline + LoRA file, both loaded by diffusers'
StableDiffusion3Pipeline and giving our output) -> sample; the family detection; token-id records refused."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import prepare, train
from ddspo_jax.backbones import detect_family, ensure_tiny_model, load_backbone
from ddspo_jax.backbones.tiny import TINY_PROMPTS
from ddspo_jax.config import validate
from ddspo_jax.configs.sd3 import get_config
from ddspo_jax.errors import ConfigError

PROMPTS = ["a photo of two red circles", "a blue square to the left of a ring, " + "and more words " * 30]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny-sd3", family="sd3")


def cfg_for(tmp_path, model, **train_kw):
    c = get_config("tiny")
    c.model.path = str(model)
    c.data.prompts, c.data.prompt_limit, c.data.shard_size = str(TINY_PROMPTS), 8, 8
    c.data.records, c.data.record_dtype = str(tmp_path / "rec"), "float32"
    c.prepare.batch_size, c.prepare.steps = 8, 3
    c.output_dir = str(tmp_path / "run")
    c.train.batch_size, c.train.micro_batch_per_device, c.train.steps, c.train.checkpoint_every = 8, 4, 3, 3
    c.train.sample_every, c.train.export_at_end = -1, False
    for k, v in train_kw.items():
        setattr(c.train, k, v)
    return validate(c)


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_encoding_matches_the_pipeline(tiny_sd3, tmp_path, with_t5):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from ddspo_jax.backbones.sd3 import SD3PromptEncoder

    folder = tiny_sd3
    if not with_t5:  # SD3's variant without T5: the pipeline puts zeros in its place
        folder = tmp_path / "no_t5"
        shutil.copytree(tiny_sd3, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True,
                                              max_sequence_length=77)
    enc = SD3PromptEncoder.from_pretrained(folder)
    ours, neg = enc.encode(PROMPTS), enc.encode_negative(2)
    assert ours["num_truncated"] == 1  # the long prompt is cut to 77 tokens (and counted)
    for a, b in ((ours["prompt_embeds"], pe), (ours["pooled_prompt_embeds"], pp), (neg["prompt_embeds"], npe),
                 (neg["pooled_prompt_embeds"], npp)):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= 1e-5 * np.abs(b.numpy()).max()
    assert (np.abs(ours["prompt_embeds"][:, 77:]).max() > 0) == with_t5


def test_detect_family_and_token_ids_refused(tiny_sd3, tmp_path):
    assert detect_family(tiny_sd3) == "sd3"
    c = cfg_for(tmp_path, tiny_sd3)
    c.data.cond_mode = "token_ids"
    with pytest.raises(ConfigError, match="not for SD3"):
        prepare.run_prepare(c, progress=False)


def test_sd3_road_export_loads_in_diffusers_with_our_output(tiny_sd3, tmp_path):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from ddspo_jax import sample
    from ddspo_jax.checkpoint import restore_trained_params
    from ddspo_jax.export import export

    c = cfg_for(tmp_path, tiny_sd3)
    assert c.schedule.precondition_outputs and c.model.lora_rank == 4
    prepare.run_prepare(c, progress=False)
    summary = train.train(c, log=lambda *_: None)
    assert np.isfinite(summary["metrics"]["loss"])
    run = tmp_path / "run"
    export(run, tmp_path / "exp", log=lambda *_: None)
    params, _, _, _ = restore_trained_params(run)
    bb = load_backbone(c.model, c.schedule, text=False, vae=False, log=None)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 9, 80)).astype(np.float32)
    pooled = rng.standard_normal((2, 64)).astype(np.float32)
    t = np.array([300.0, 700.0], np.float32)
    cond = {"prompt_embeds": jnp.asarray(ctx), "pooled_prompt_embeds": jnp.asarray(pooled)}
    ours = np.asarray(bb.denoise(params, jnp.asarray(x), jnp.asarray(t), cond))
    assert np.abs(ours - np.asarray(bb.denoise(bb.params, jnp.asarray(x), jnp.asarray(t), cond))).max() > 1e-4

    def theirs(pipe):
        with torch.no_grad():
            out = pipe.transformer(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx),
                                   torch.from_numpy(pooled), torch.from_numpy(t)).sample.numpy()
        return out.transpose(0, 2, 3, 1)
    scale = np.abs(ours).max()
    merged = StableDiffusion3Pipeline.from_pretrained(tmp_path / "exp")
    assert np.abs(theirs(merged) - ours).max() <= 1e-5 * scale
    with_lora = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with_lora.load_lora_weights(tmp_path / "exp" / "pytorch_lora_weights.safetensors")
    assert np.abs(theirs(with_lora) - ours).max() <= 1e-5 * scale

    out = tmp_path / "samples"
    assert sample.main(["--model", str(run), "--prompts", str(TINY_PROMPTS), "--limit", "2", "--steps", "2",
                        "--out", str(out)]) == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("0000*_seed0.png"))) == 2


def test_tiny_sd3_builds_byte_identical(tiny_sd3, tmp_path):
    import filecmp
    import os

    from ddspo_jax.backbones import build_tiny_model

    other = build_tiny_model(tmp_path / "again", family="sd3")
    files = lambda f: sorted(os.path.relpath(os.path.join(d, n), f) for d, _, ns in os.walk(f) for n in ns)  # noqa: E731
    assert files(tiny_sd3) == files(other)
    for f in files(tiny_sd3):
        assert filecmp.cmp(tiny_sd3 / f, other / f, shallow=False), f
