"""DD-CPP end to end on the tiny model: a Pick-a-Pic-layout Parquet file (real JPEG bytes, a tie, a corrupt
image) imported as pair records, the winning / losing adapters trained (sft_pair), DDSPO with their
predictions as targets (train.cpp = "pair"), and both exports."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from ddspo_jax.configs.tiny import get_config as tiny_config

N_GOOD = 8


def _jpeg(seed, w, h):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("ddcpp")
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "extra": []}
    for i in range(N_GOOD + 2):
        rows["caption"].append(["a red cube", "two green cars", "a cat left of a dog", "three apples"][i % 4])
        rows["jpg_0"].append(_jpeg(2 * i, 70 + i, 50))
        rows["jpg_1"].append(_jpeg(2 * i + 1, 45, 60 + i))
        label = [(1.0, 0.0), (0.0, 1.0)][i % 2]
        if i == 3:
            label = (0.5, 0.5)  # a tie: dropped
        rows["label_0"].append(label[0])
        rows["label_1"].append(label[1])
        rows["extra"].append(i)
    rows["jpg_1"][6] = b"\xff\xd8 not really a jpeg"  # undecodable: dropped, named
    for bad in ({"label_0": 2.0, "label_1": 0.3}, {"label_0": None}, {"jpg_0": None}):  # corrupt rows: dropped
        for k in rows:
            rows[k].append({**{c: v[0] for c, v in rows.items()}, **bad}[k])
    pq.write_table(pa.table(rows), root / "train-00000.parquet")
    return root


def _cfg(root, **over):
    c = tiny_config()
    c.data.records = str(root / "records")
    c.data.shard_size = 4
    c.prepare.batch_size = 3
    c.train.batch_size = 8
    c.train.micro_batch_per_device = 1
    c.train.sample_every = -1
    c.train.checkpoint_every = 100
    c.train.warmup_steps = 0
    for k, v in over.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def imported(dataset):
    from ddspo_jax.prepare import run_import_preferences

    cfg = _cfg(dataset)
    m = run_import_preferences(cfg, str(dataset / "train-00000.parquet"), progress=False)
    return cfg, m


def test_import_latents_are_the_vae_encoding_and_drops_are_named(dataset, imported):
    from diffusers import AutoencoderKL

    from ddspo_jax.backbones import resolve_path
    from ddspo_jax.data.loader import PairSource

    cfg, m = imported
    assert m["num_records"] == N_GOOD and m["counts"]["dropped"] == {
        "tie": 1, "undecodable image": 1, "invalid labels": 2, "image jpg_0 is null": 1}
    dropped = [json.loads(line) for line in (dataset / "records" / "dropped.jsonl").read_text().splitlines()]
    why = {d["id"]: d["reason"] for d in dropped}
    assert sorted(why) == [f"train-00000.parquet:{i}" for i in (10, 11, 12, 3, 6)]
    assert why["train-00000.parquet:3"] == "tie" and "undecodable image" in why["train-00000.parquet:6"]
    assert why["train-00000.parquet:10"] == "labels (2.0, 0.3) are not a preference"

    import pyarrow.parquet as pq
    table = pq.read_table(dataset / "train-00000.parquet").to_pydict()
    vae = AutoencoderKL.from_pretrained(resolve_path("tiny") / "vae").eval()
    src = PairSource(cfg.data.records)
    kept = [i for i in range(N_GOOD + 2) if i not in (3, 6)]
    for rec_i, row in enumerate(kept[:3]):
        rec = src[rec_i]
        w, l = ("jpg_0", "jpg_1") if table["label_0"][row] > table["label_1"][row] else ("jpg_1", "jpg_0")
        size = rec["x0_w"].shape[0] * 2 ** (len(vae.config.block_out_channels) - 1)
        for key, col in (("x0_w", w), ("x0_l", l)):
            # decode -> shortest side to `size` (bilinear) -> centre crop, written out here
            im = Image.open(io.BytesIO(table[col][row])).convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(size, int(im.size[0] * s)), max(size, int(im.size[1] * s))), Image.BILINEAR)
            left, top = round((im.size[0] - size) / 2), round((im.size[1] - size) / 2)
            x = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1.0
            with torch.no_grad():
                z = vae.encode(torch.from_numpy(x.transpose(2, 0, 1))[None]).latent_dist.mean * vae.config.scaling_factor
            np.testing.assert_allclose(np.asarray(rec[key], np.float32), z[0].numpy().transpose(1, 2, 0),
                                       atol=0.02, rtol=0.02)  # records store bfloat16
        assert rec["prompt"] == table["caption"][row] == rec["neg_prompt"]
    # a second import reuses the finished shards
    from ddspo_jax.prepare import run_import_preferences
    before = {p.name: p.stat().st_mtime_ns for p in (dataset / "records").glob("*.array_record")}
    again = run_import_preferences(cfg, str(dataset / "train-00000.parquet"), progress=False)
    assert again["num_records"] == m["num_records"]
    assert {p.name: p.stat().st_mtime_ns for p in (dataset / "records").glob("*.array_record")} == before


@pytest.fixture(scope="module")
def pair_run(dataset, imported):
    from ddspo_jax import train

    cfg = _cfg(dataset, **{"output_dir": str(dataset / "pair"), "train.objective": "sft_pair",
                           "model.lora_rank": 2, "model.lora_alpha": 2.0, "train.lr": 3e-3, "train.steps": 12,
                           "train.export_at_end": True})
    summary = train.train(cfg, log=lambda *a, **k: None)
    return cfg, summary


def _own_mse(bb, params_w, params_l, src, n_draws=24):
    """Each adapter's denoising MSE on its own images over fixed (t, noise) draws, and the base's."""
    from ddspo_jax import lora

    recs = [src[i] for i in range(len(src))]
    x0w = jnp.asarray(np.stack([r["x0_w"] for r in recs]), jnp.float32)
    x0l = jnp.asarray(np.stack([r["x0_l"] for r in recs]), jnp.float32)
    cond = {k: jnp.asarray(np.stack([r["cond"][k] for r in recs]), jnp.float32) for k in recs[0]["cond"]}
    sched = bb.schedule
    out = {"w": [0.0, 0.0], "l": [0.0, 0.0]}
    for d in range(n_draws):
        kt, kn = jax.random.split(jax.random.key(d))
        t = jax.random.randint(kt, (len(recs),), 0, 1000)
        for name, x0, f in (("w", x0w, params_w), ("l", x0l, params_l)):
            noise = jax.random.normal(kn, x0.shape)
            xt = sched.add_noise(x0, noise, t)
            base = bb.denoise(bb.params, xt, sched.model_timestep(t), cond)
            with lora.forward(f, 2.0):
                tuned = bb.denoise(bb.params, xt, sched.model_timestep(t), cond)
            out[name][0] += float(jnp.mean((base - noise) ** 2)) / n_draws
            out[name][1] += float(jnp.mean((tuned - noise) ** 2)) / n_draws
    return out


def test_sft_pair_fits_each_adapter_to_its_own_images_and_trains_only_factors(pair_run):
    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.data.loader import PairSource
    from ddspo_jax.checkpoint import restore_checkpoint_params

    cfg, summary = pair_run
    params, step, _ = restore_checkpoint_params(Path(cfg.output_dir))
    assert step == 12 and set(params) == {"w", "l"}
    assert all(set(f) == {"a", "b"} for f in params["w"].values())  # factors only: the base is not trained
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    mse = _own_mse(bb, params["w"], params["l"], PairSource(cfg.data.records))
    for name in ("w", "l"):
        base, tuned = mse[name]
        assert tuned < 0.97 * base, (name, mse)
    # the two LoRA files: names diffusers' UNet has, and W + B A reproduces our merged UNet
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    from ddspo_jax import lora
    from ddspo_jax.backbones import resolve_path

    unet = UNet2DConditionModel.from_pretrained(resolve_path("tiny") / "unet").eval()
    sd = load_file(str(Path(summary["export"]) / "winning" / "pytorch_lora_weights.safetensors"))
    modules = dict(unet.named_modules())
    state = unet.state_dict()
    for k in [k for k in sd if k.endswith("lora_A.weight")]:
        mod = k[len("unet."):-len(".lora_A.weight")]
        assert mod in modules, mod
        state[mod + ".weight"] = state[mod + ".weight"] + torch.from_numpy(sd[k.replace("lora_A", "lora_B")]
                                                                          @ sd[k])
    unet.load_state_dict(state)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    ours = bb.denoiser.apply({"params": lora.merge(bb.params, params["w"], 2.0)}, x, np.array([500]), ctx)
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(ctx)).sample.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs.transpose(0, 2, 3, 1), atol=1e-4)


def test_ddspo_with_the_trained_pair_runs_and_exports(dataset, pair_run):
    from diffusers import StableDiffusionPipeline

    from ddspo_jax import train

    pair_cfg, _ = pair_run
    cfg = _cfg(dataset, **{"output_dir": str(dataset / "ddspo"), "train.cpp": "pair",
                           "train.cpp_pair": pair_cfg.output_dir, "train.beta": 8000.0, "train.steps": 2})
    summary = train.train(cfg, log=lambda *a, **k: None)
    assert summary["steps"] == 2
    StableDiffusionPipeline.from_pretrained(summary["export"], safety_checker=None)
    # a pair folder that is not an sft_pair run is refused, naming it
    from ddspo_jax.errors import ConfigError
    bad = _cfg(dataset, **{"output_dir": str(dataset / "bad"), "train.cpp": "pair",
                           "train.cpp_pair": cfg.output_dir, "train.steps": 1})
    with pytest.raises(ConfigError, match="not 'sft_pair'"):
        train.train(bad, log=lambda *a, **k: None)


def _np_ddspo(mw, ml, rw, rl, tw, tl, beta):
    d = lambda a, b: ((np.float64(a) - np.float64(b)) ** 2).reshape(len(a), -1).mean(1)  # noqa: E731
    inside = (d(tw, mw) - d(tw, rw)) - (d(tl, ml) - d(tl, rl))
    return float(np.mean(np.logaddexp(0.0, 0.5 * beta * inside)))


def test_cpp_pair_step_loss_by_hand_and_zero_adapters_are_tf_cpp_with_c_minus_c():
    from ddspo_jax import lora, parallel, step, trainable
    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.config import base_config

    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.train.beta = "tiny", "float32", 500.0
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    p = bb.params
    rnd = lambda f, s: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(s), x.shape), f)  # noqa
    fw, fl = rnd(lora.init(p, 2, jax.random.key(1)), 2), rnd(lora.init(p, 2, jax.random.key(3)), 4)
    model = jax.tree.map(lambda x: x * 1.01, p)  # a trainable UNet != the reference
    rng = np.random.default_rng(0)
    n = 3
    batch = {"x0_w": jnp.asarray(rng.standard_normal((n, 8, 8, 4)), jnp.float32),
             "x0_l": jnp.asarray(rng.standard_normal((n, 8, 8, 4)), jnp.float32),
             "cond_w": {"prompt_embeds": jnp.asarray(rng.standard_normal((n, 77, 32)), jnp.float32)},
             "cond_l": {"prompt_embeds": jnp.asarray(rng.standard_normal((n, 77, 32)), jnp.float32)}}
    ids, key = jnp.arange(n), jax.random.key(7)

    _, denoise_ref = trainable.make_denoisers(bb, pair_alpha=2.0)  # the reference train.py's step calls

    def loss(cpp, pair, b):
        c = base_config()
        c.train.objective, c.train.beta, c.train.cpp = "ddspo", 500.0, cpp
        ref = {"unet": p, "pair": pair}
        g = parallel.Gather(parallel.fsdp_axes(ref, 1), jnp.float32)
        fn = step.pair_forward(denoise_ref, bb.schedule, c, model, ref, b, ids, key,
                               model_apply=lambda m, r, x, t, cc, gp, gr: bb.denoise(m, x, t, cc), gathers=(g, g))
        return float(jax.jit(lambda m: fn(m)[0])(model))

    # by hand: the same t and noise, each network called on its own
    t, nw, nl, _ = step.pair_noise(bb.schedule, cfg, key, ids, batch["x0_w"])
    xw, xl = bb.schedule.add_noise(batch["x0_w"], nw, t), bb.schedule.add_noise(batch["x0_l"], nl, t)
    tm, c = bb.schedule.model_timestep(t), batch["cond_w"]
    fwd = jax.jit(lambda params, x: bb.denoise(params, x, tm, c))
    out = lambda params, x: np.asarray(fwd(params, x))  # noqa: E731
    want = _np_ddspo(out(model, xw), out(model, xl), out(p, xw), out(p, xl),
                     out(lora.merge(p, fw, 2.0), xw), out(lora.merge(p, fl, 2.0), xl), 500.0)
    np.testing.assert_allclose(loss("pair", {"w": fw, "l": fl}, batch), want, rtol=1e-4)
    # zero adapters: the pair is the reference itself, i.e. TF-CPP with c- = c
    zero = jax.tree.map(jnp.zeros_like, fw)
    same = dict(batch, cond_l=batch["cond_w"])
    np.testing.assert_allclose(loss("pair", {"w": zero, "l": zero}, batch), loss("reference", None, same), rtol=1e-5)


def test_import_from_a_folder_layout(tmp_path):
    from ddspo_jax.data.loader import PairSource
    from ddspo_jax.prepare import run_import_preferences

    src = tmp_path / "prefs"
    src.mkdir()
    lines = []
    for i in range(3):
        for side in ("a", "b"):
            (src / f"{i}{side}.jpg").write_bytes(_jpeg(10 * i + (side == "b"), 40, 56))
        lines.append({"prompt": f"prompt {i}", "preferred": f"{i}a.jpg", "dispreferred": f"{i}b.jpg", "id": f"p{i}"})
    lines.append({"prompt": "gone", "preferred": "missing.jpg", "dispreferred": "0b.jpg", "id": "p3"})
    (src / "preferences.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    cfg = _cfg(tmp_path)
    m = run_import_preferences(cfg, str(src), progress=False)
    assert m["num_records"] == 3 and m["counts"]["dropped"] == {"missing image": 1}  # not "undecodable"
    recs = PairSource(cfg.data.records)
    assert [recs[i]["prompt"] for i in range(3)] == ["prompt 0", "prompt 1", "prompt 2"]
    assert not np.allclose(np.asarray(recs[0]["x0_w"], np.float32), np.asarray(recs[0]["x0_l"], np.float32))
    (src / "preferences.jsonl").write_text('{"prompt": "x", "preferred": "0a.jpg"}\n')
    from ddspo_jax.errors import DataError
    with pytest.raises(DataError, match="dispreferred"):
        run_import_preferences(_cfg(tmp_path / "other"), str(src), progress=False)
    for line, words in (('[1, 2]', "a JSON object is expected, got list"),
                        ('{"prompt": null, "preferred": "0a.jpg", "dispreferred": "0b.jpg"}',
                         "field 'prompt' must be a string, got None")):
        (src / "preferences.jsonl").write_text(line + "\n")
        with pytest.raises(DataError, match=re.escape(f"preferences.jsonl:1: {words}")):
            run_import_preferences(_cfg(tmp_path / "other"), str(src), progress=False)
