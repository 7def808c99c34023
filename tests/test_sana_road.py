"""SANA through the whole road on the embedded tiny SANA pipeline: prepare (unmasked-rows records) -> LoRA
DDSPO training (embedding and token-id records alike) -> export (merged pipeline + LoRA file, both loaded by
diffusers' SanaPipeline and giving our output) -> sample --compare; plus the family detection."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import prepare, train
from ddspo_jax.backbones import detect_family, load_backbone
from ddspo_jax.config import validate
from ddspo_jax.configs.sana import get_config
from ddspo_jax.data.loader import PairSource
from ddspo_jax.data.records import read_manifest
from ddspo_jax.errors import ModelError
from ddspo_jax.backbones import ensure_tiny_model
from ddspo_jax.backbones.tiny import TINY_PROMPTS


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny-sana", family="sana")


def cfg_for(tmp_path, model, mode="embeddings", **train_kw):
    c = get_config("tiny")
    c.model.path = str(model)
    c.data.prompts, c.data.prompt_limit, c.data.shard_size = str(TINY_PROMPTS), 8, 8
    c.data.records, c.data.record_dtype, c.data.cond_mode = str(tmp_path / f"rec-{mode}"), "float32", mode
    c.prepare.batch_size, c.prepare.steps = 8, 3
    c.output_dir = str(tmp_path / f"run-{mode}")
    c.train.batch_size, c.train.micro_batch_per_device, c.train.steps, c.train.checkpoint_every = 8, 4, 2, 2
    c.train.sample_every, c.train.export_at_end = -1, False
    for k, v in train_kw.items():
        setattr(c.train, k, v)
    return validate(c)


def test_detect_family_and_mismatch(tiny_sana, tmp_path):
    assert detect_family(tiny_sana) == "sana"
    sd = ensure_tiny_model(tmp_path / "sd", family="sd")
    assert detect_family(sd) == "sd"
    (tmp_path / "bare").mkdir()  # no model_index.json: from the denoiser's config
    (tmp_path / "bare" / "transformer").symlink_to(tiny_sana / "transformer")
    assert detect_family(tmp_path / "bare") == "sana"
    c = cfg_for(tmp_path, tiny_sana)
    c.model.family = "sdxl"
    with pytest.raises(ModelError, match="holds a 'sana' model"):
        load_backbone(c.model, c.schedule, text=False, vae=False, log=None)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="FluxPipeline.*not a supported pipeline"):
        detect_family(tmp_path / "odd")


def test_records_keep_unmasked_rows_and_load_padded_to_what_diffusers_sees(tiny_sana, tmp_path):
    """Stored prefix + loader zero-padding gives the transformer the same output as the pipeline's full
    (padded) embeddings: diffusers' SanaTransformer2DModel on encode_prompt's output is the reference."""
    import torch
    from diffusers import SanaPipeline

    from ddspo_jax.backbones.sana import COMPLEX_HUMAN_INSTRUCTION

    c = cfg_for(tmp_path, tiny_sana)
    prepare.run_prepare(c, progress=False)
    m = read_manifest(c.data.records)
    assert m["conditioning"] == {"prompt_embeds": [300, 16], "prompt_attention_mask": [300]}
    src = PairSource(c.data.records)
    raw = src._src[0]
    from ddspo_jax.data.records import decode_record

    stored = decode_record(raw)["cond"]
    n = int(stored["prompt_attention_mask"].sum())
    assert stored["prompt_embeds"].shape == (n, 16) and n < 100  # only the unmasked rows are stored
    rec = src[0]
    assert rec["cond"]["prompt_embeds"].shape == (300, 16)
    np.testing.assert_array_equal(rec["cond"]["prompt_attention_mask"], (np.arange(300) < n).astype(np.int32))

    pipe = SanaPipeline.from_pretrained(tiny_sana)
    with torch.no_grad():
        pe, pm, _, _ = pipe.encode_prompt([rec["prompt"]], do_classifier_free_guidance=False,
                                          complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION))
    np.testing.assert_array_equal(pm.numpy()[0], rec["cond"]["prompt_attention_mask"])
    assert np.abs(pe.numpy()[0, :n] - rec["cond"]["prompt_embeds"][:n]).max() <= 1e-4 * np.abs(pe.numpy()).max()
    bb = load_backbone(c.model, c.schedule, text=False, vae=False, log=None)
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        want = pipe.transformer(torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=pe,
                                encoder_attention_mask=pm, timestep=torch.tensor([400.0])).sample.numpy()
    got = bb.denoise(bb.params, jnp.asarray(x), jnp.asarray([400.0]), {k: jnp.asarray(v[None]) for k, v in
                                                                         rec["cond"].items()})
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=2e-5)


@pytest.mark.slow  # 42 s; the SD token-id road stays in the default suite (test_token_ids)
def test_token_id_records_train_like_embeddings(tiny_sana, tmp_path):
    results = {}
    for mode in ("embeddings", "token_ids"):
        c = cfg_for(tmp_path, tiny_sana, mode)
        prepare.run_prepare(c, progress=False)
        results[mode] = train.train(c, log=lambda *_: None)
    ids = read_manifest(tmp_path / "rec-token_ids")["conditioning"]
    assert set(ids) == {"input_ids", "attention_mask"} and ids["input_ids"][0] > 300  # instruction + 298
    a = jax.device_get(results["embeddings"]["params"])
    b = jax.device_get(results["token_ids"]["params"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), a, b)
    assert max(float(np.abs(v["b"]).max()) for v in a.values()) > 0  # the LoRA B factors left zero: it trained


def test_sana_road_export_loads_in_diffusers_with_our_output(tiny_sana, tmp_path):
    import torch
    from diffusers import SanaPipeline

    from ddspo_jax import sample
    from ddspo_jax.checkpoint import restore_trained_params
    from ddspo_jax.export import export

    c = cfg_for(tmp_path, tiny_sana, steps=3, checkpoint_every=3)
    prepare.run_prepare(c, progress=False)
    train.train(c, log=lambda *_: None)
    run = tmp_path / "run-embeddings"
    export(run, tmp_path / "exp", log=lambda *_: None)
    assert (tmp_path / "exp" / "transformer" / "config.json").is_file()
    params, _, _, base = restore_trained_params(run)
    bb = load_backbone(c.model, c.schedule, text=False, vae=False, log=None)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 16)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
    ours = np.asarray(bb.denoise(params, jnp.asarray(x), jnp.asarray([300.0, 700.0]),
                                 {"prompt_embeds": jnp.asarray(ctx), "prompt_attention_mask": jnp.asarray(mask)}))
    base_out = np.asarray(bb.denoise(bb.params, jnp.asarray(x), jnp.asarray([300.0, 700.0]),
                                     {"prompt_embeds": jnp.asarray(ctx), "prompt_attention_mask": jnp.asarray(mask)}))
    assert np.abs(ours - base_out).max() > 1e-4  # the LoRA moved the model

    def theirs(pipe):
        with torch.no_grad():
            out = pipe.transformer(torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(ctx),
                                   encoder_attention_mask=torch.from_numpy(mask),
                                   timestep=torch.tensor([300.0, 700.0])).sample.numpy()
        return out.transpose(0, 2, 3, 1)
    merged = SanaPipeline.from_pretrained(tmp_path / "exp")
    np.testing.assert_allclose(theirs(merged), ours, atol=2e-5)
    with_lora = SanaPipeline.from_pretrained(tiny_sana)
    with_lora.load_lora_weights(tmp_path / "exp" / "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(theirs(with_lora), ours, atol=2e-5)

    (tmp_path / "p.txt").write_text("a red cube\ntwo green cars\n")
    assert sample.main(["--model", str(run), "--compare", str(tiny_sana), "--prompts", str(tmp_path / "p.txt"),
                        "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "compare.png").is_file()


def test_sana_step_meshes_equal_single_device(tiny_sana):
    """The SANA transformer in the shard_map step, blocks remat'ed and gathering their own fsdp shards:
    (data 2, fsdp 4) and (data 8, fsdp 1) give the single-device losses and parameters."""
    from ddspo_jax import parallel, step as step_lib
    from ddspo_jax.config import base_config

    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.model.remat_policy = str(tiny_sana), "float32", "block"
    cfg.train.beta, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 500.0, 8, 1e-3, 0
    cfg.schedule.kind = "flow"
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    mask = (np.arange(9)[None] < rng.integers(3, 10, (8, 1))).astype(np.int32)
    batches = [{"x0_w": f(8, 16, 16, 4), "x0_l": f(8, 16, 16, 4),
                "cond_w": {"prompt_embeds": f(8, 9, 16), "prompt_attention_mask": mask},
                "cond_l": {"prompt_embeds": f(8, 9, 16), "prompt_attention_mask": mask}} for _ in range(2)]
    shape = jax.eval_shape(lambda: bb.params)
    results = []
    for data, fsdp, devs in ((1, 1, jax.devices()[:1]), (2, 4, None), (8, 1, None)):
        mesh = parallel.make_mesh(data, fsdp, devs)
        opt, _ = step_lib.make_optimizer(cfg, cfg.train.lr)
        train_step = step_lib.make_train_step(bb.denoise, bb.schedule, cfg, mesh, opt, shape)
        ref = parallel.shard_tree(bb.params, mesh)
        state = step_lib.create_state(parallel.shard_tree(bb.params, mesh), opt, mesh)
        losses = []
        for b in batches:
            state, m = train_step(state, ref, b, jax.random.key(5))
            m = jax.device_get(m)
            losses += [float(m["loss"]), float(m["grad_norm"])]
        results.append((jax.device_get(state["params"]), losses))
    assert results[0][1][0] == pytest.approx(np.log(2.0), abs=1e-4) and results[0][1][2] != pytest.approx(np.log(2.0))
    for params, losses in results[1:]:
        np.testing.assert_allclose(losses, results[0][1], rtol=2e-5)
        # losses and gradient norms agree to float32 roundoff; Adam's m / sqrt(v) turns roundoff in near-zero
        # gradients into O(lr) steps, so parameters are held to a fifth of one step (lr = 1e-3) per step
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=0.2 * 1e-3 * len(batches)),
                     params, results[0][0])


def test_generation_equals_the_sana_pipeline_loop(tiny_sana):
    """prepare's and sample's generation (backbone encode + negative + the one jitted DPM-Solver++ 2M CFG
    sampler) equals diffusers' SanaPipeline(...) on the same prompts and initial noise, latents out."""
    import torch
    from diffusers import SanaPipeline

    from ddspo_jax import parallel, sampling
    from ddspo_jax.backbones import generation_settings
    from ddspo_jax.config import base_config

    c = base_config()
    c.model.path, c.model.dtype = str(tiny_sana), "float32"
    bb = load_backbone(c.model, c.schedule, text=True, vae=False, log=None)
    s = generation_settings(bb, steps=4)
    assert (s["sampler"], s["guidance"], s["resolution"]) == ("flow_dpmpp_2m", 4.5, 64)
    gen = sampling.Generator(bb, s, parallel.make_mesh(devices=jax.devices()[:1]))
    prompts = ["a red cube on top of a blue sphere", "two green cars"]
    noise = gen.noise([0, 1])
    ours = gen(sampling.replicate(bb.params, gen.mesh), bb.encode(prompts), noise)
    pipe = SanaPipeline.from_pretrained(tiny_sana)
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
                      latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="latent",
                      use_resolution_binning=False).images.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), np.abs(ours - theirs).max()
