"""sample CLI: PNGs + grid, same noise as prepare, run folders, --compare."""

import json

import numpy as np
import pytest
from PIL import Image

from ddspo_jax import sample
from ddspo_jax.backbones import ensure_tiny_model
from ddspo_jax.backbones.tiny import TINY_PROMPTS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny-sd")


def png(path):
    return np.asarray(Image.open(path))


def test_sample_pngs_grid_and_compare(tiny, tmp_path):
    args = ["--model", str(tiny), "--prompts", str(TINY_PROMPTS), "--limit", "3", "--batch", "2", "--steps", "3",
            "--out", str(tmp_path / "a"), "--compare", str(tiny)]
    assert sample.main(args) == 0
    out = tmp_path / "a"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000_seed0.png", "00001_seed0.png", "00002_seed0.png", "compare.png", "grid.png"]
    imgs = [png(out / n) for n in names[:3]]
    assert imgs[0].shape == (64, 64, 3) and not np.array_equal(imgs[0], imgs[1])
    for n in names[:3]:  # the same model compared with itself: identical images, same seeds
        np.testing.assert_array_equal(png(out / n), png(out / "compare" / n))
    assert png(out / "compare.png").shape[0] > 2 * 64  # two rows
    meta = json.loads((out / "samples.json").read_text())
    assert meta["settings"]["steps"] == 3 and meta["settings"]["sampler"] == "pndm"
    # deterministic: the same call again gives the same bytes
    assert sample.main(args[:-2] + ["--out", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(png(out / "grid.png"), png(tmp_path / "b" / "grid.png"))


def test_sample_equals_the_diffusers_pipeline(tiny, tmp_path):
    """Independent reference: diffusers' StableDiffusionPipeline on the same folder, the same initial latents
    (our per-(seed, index) noise, NCHW), the folder's DDIM, CFG 7.5, 3 steps, gives the PNG `sample` writes."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ddspo_jax import sampling

    prompts = [line.strip() for line in open(TINY_PROMPTS) if line.strip()][:2]
    assert sample.main(["--model", str(tiny), "--prompts", str(TINY_PROMPTS), "--limit", "2", "--steps", "3",
                        "--out", str(tmp_path / "s"), "--batch", "2", "--dtype", "float32", "--sampler", "ddim"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, requires_safety_checker=False)
    s = 64 // pipe.vae_scale_factor
    lat = sampling.initial_noise(0, [0, 1], (s, s, pipe.unet.config.in_channels))
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=3, guidance_scale=7.5, height=64, width=64, output_type="np",
                   latents=torch.from_numpy(np.ascontiguousarray(lat.transpose(0, 3, 1, 2)))).images
    for i in range(2):
        ours = png(tmp_path / "s" / f"0000{i}_seed0.png").astype(np.float32)
        theirs = np.round(np.clip(out[i], 0, 1) * 255)
        assert np.abs(ours - theirs).max() <= 2.0, np.abs(ours - theirs).max()  # uint8 rounding of ~1e-5 diffs


def test_sample_equals_decoded_prepare_record(tiny, tmp_path):
    """The sampler is shared with prepare: the image of prompt i is the decoded x0_w of record i."""
    from ddspo_jax import prepare
    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.config import base_config
    from ddspo_jax.data.loader import PairSource

    c = base_config()
    c.model.path, c.model.dtype = str(tiny), "float32"
    c.data.prompts, c.data.records, c.data.prompt_limit = str(TINY_PROMPTS), str(tmp_path / "rec"), 2
    c.data.shard_size, c.data.record_dtype, c.prepare.batch_size, c.prepare.steps = 2, "float32", 2, 3
    prepare.run_prepare(c, progress=False)
    rec = PairSource(tmp_path / "rec")[1]
    assert sample.main(["--model", str(tiny), "--prompts", str(TINY_PROMPTS), "--limit", "2", "--steps", "3",
                        "--out", str(tmp_path / "s"), "--batch", "2"]) == 0
    bb = load_backbone(c.model, c.schedule, text=False, vae=True)
    img = np.round(bb.decode(np.asarray(rec["x0_w"], np.float32)[None])[0] * 255)
    got = png(tmp_path / "s" / "00001_seed0.png").astype(np.float32)
    assert np.abs(got - img).max() <= 1.0  # uint8 rounding


def test_sample_from_run_folder_and_errors(tiny, tmp_path, capsys):
    from test_export import fake_run

    run, _, _ = fake_run(tmp_path, "sd")
    base = ["--prompts", str(TINY_PROMPTS), "--limit", "2", "--steps", "2", "--batch", "2"]
    assert sample.main(["--model", str(run), "--out", str(tmp_path / "r"), "--compare", "tiny:" + str(tiny),
                        *base]) == 0
    trained, ref = png(tmp_path / "r" / "00000_seed0.png"), png(tmp_path / "r" / "compare" / "00000_seed0.png")
    assert not np.array_equal(trained, ref)  # the run's trained UNet was used
    assert sample.main(["--model", str(run), "--step", "4", "--out", str(tmp_path / "x"), *base]) == 2
    assert "no checkpoint for step 4" in capsys.readouterr().err
    assert sample.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), *base]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_model_folder_carries_its_own_generation_settings(tiny, tmp_path, capsys):
    """ddspo_generation.json in a model folder replaces the family's paper defaults (SD: 7.5 / 25 / pndm):
    sampling the folder without flags gives the same bytes as the plain folder sampled with those settings as
    explicit flags; flags still win over the file; a bad key is refused, naming the file and the key."""
    import shutil

    own = tmp_path / "own"
    shutil.copytree(tiny, own)
    (own / "ddspo_generation.json").write_text(json.dumps({"_why": "a comment", "guidance": 2.0, "steps": 3,
                                                           "sampler": "ddim"}))
    base = ["--prompts", str(TINY_PROMPTS), "--limit", "2", "--batch", "2"]
    assert sample.main(["--model", str(own), "--out", str(tmp_path / "a"), *base]) == 0
    assert sample.main(["--model", str(tiny), "--out", str(tmp_path / "b"), "--guidance", "2", "--steps", "3",
                        "--sampler", "ddim", *base]) == 0
    s = json.loads((tmp_path / "a" / "samples.json").read_text())["settings"]
    assert (s["guidance"], s["steps"], s["sampler"]) == (2.0, 3, "ddim")
    np.testing.assert_array_equal(png(tmp_path / "a" / "00001_seed0.png"), png(tmp_path / "b" / "00001_seed0.png"))
    assert sample.main(["--model", str(own), "--out", str(tmp_path / "c"), "--guidance", "7.5", *base]) == 0
    assert json.loads((tmp_path / "c" / "samples.json").read_text())["settings"]["guidance"] == 7.5
    assert not np.array_equal(png(tmp_path / "a" / "00001_seed0.png"), png(tmp_path / "c" / "00001_seed0.png"))
    for bad, named in (({"cfg": 2.0}, "'cfg'"), ({"sampler": "heun"}, "'heun'"), ({"steps": "many"}, "'many'"),
                       ({"steps": 0}, "steps must be >= 1"), ([5.0], "expected a JSON object"),
                       ("{guidance: 5", "not valid JSON")):
        (own / "ddspo_generation.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert sample.main(["--model", str(own), "--out", str(tmp_path / "d"), *base]) == 2
        err = capsys.readouterr().err
        assert "ddspo_generation.json" in err and named in err, (bad, err)
