"""prepare on the tiny SD and SDXL models: records the loader reads back, pair noise, efficient mode, resumption
(kill -9 after the first shard, re-run, same shards as an uninterrupted run) and clear errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ddspo_jax import config as config_lib
from ddspo_jax import prepare
from ddspo_jax.data.loader import PairLoader, PairSource
from ddspo_jax.data.records import read_manifest
from ddspo_jax.backbones import ensure_tiny_model
from ddspo_jax.backbones.tiny import TINY_PROMPTS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinymodels")
    ensure_tiny_model(root / "sd")
    ensure_tiny_model(root / "sdxl", family="sdxl")
    return root


def _cfg(tiny_root, out, family="sd", **over):
    c = config_lib.base_config()
    c.model.family = family
    c.model.path = f"tiny:{tiny_root / family}"
    c.model.dtype = "float32"
    c.data.prompts = str(TINY_PROMPTS)
    c.data.records = str(out)
    c.data.prompt_limit = 5
    c.data.shard_size = 2
    c.prepare.batch_size = 2
    c.prepare.steps = 2
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return config_lib.validate(c)


def _records(folder):
    src = PairSource(folder)
    return [src[i] for i in range(len(src))]


def test_prepare_tiny_sd_pairs_read_back(tiny_root, tmp_path, capsys):
    cfg = _cfg(tiny_root, tmp_path / "rec")
    summary = prepare.run_prepare(cfg, progress=False)
    out = capsys.readouterr().out
    assert "prepare: wrote 5 pairs" in out and "pairs/s per device" in out
    assert summary["pairs_written"] == 5
    m = read_manifest(tmp_path / "rec")
    assert m["kind"] == "pairs" and m["num_records"] == 5 and len(m["shards"]) == 3
    assert m["settings"]["sampler"] == "pndm" and m["settings"]["guidance"] == 7.5  # SD family defaults (paper)
    assert m["settings"]["latent_shape"] == [16, 16, 4] and m["conditioning"] == {"prompt_embeds": [77, 32]}
    recs = _records(tmp_path / "rec")
    assert [r["index"] for r in recs] == list(range(5))
    prompts = TINY_PROMPTS.read_text().splitlines()[:5]
    assert [r["prompt"] for r in recs] == prompts
    for r in recs:
        assert r["x0_w"].shape == r["x0_l"].shape == (16, 16, 4) and r["x0_w"].dtype == ml_dtypes.bfloat16
        assert r["neg_prompt"] != r["prompt"] and r["strategy"] == "random_removal" and r["seed"] == 0
        assert not np.array_equal(r["x0_w"], r["x0_l"])
        assert np.isfinite(r["x0_w"].astype(np.float32)).all()

    # the loader returns exactly what was written
    with PairLoader(tmp_path / "rec", batch_size=5, shuffle=False, num_epochs=1, keep_text=True) as loader:
        batch = next(loader)
    np.testing.assert_array_equal(batch["index"], np.arange(5))
    np.testing.assert_array_equal(batch["x0_w"], np.stack([r["x0_w"] for r in recs]))
    np.testing.assert_array_equal(batch["x0_l"], np.stack([r["x0_l"] for r in recs]))
    np.testing.assert_array_equal(batch["cond_l"]["prompt_embeds"],
                                  np.stack([r["neg_cond"]["prompt_embeds"] for r in recs]))

    # and it is what the model makes: conditioning = encode(prompt); a record sampled alone from its own
    # (seed, index) noise equals the batched one (the data does not depend on the batch layout)
    bb = prepare._load_backbone(cfg)
    settings = prepare.resolve_settings(cfg, bb)
    emb = bb.encode([recs[3]["prompt"], recs[3]["neg_prompt"]])["prompt_embeds"]
    np.testing.assert_allclose(recs[3]["cond"]["prompt_embeds"].astype(np.float32), emb[0], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(recs[3]["neg_cond"]["prompt_embeds"].astype(np.float32), emb[1], rtol=1e-2, atol=1e-2)
    from ddspo_jax import parallel
    from ddspo_jax.data.perturb import Perturbation

    gen = prepare.PairGenerator(bb, settings, parallel.make_mesh())
    alone = gen([3], [Perturbation(recs[3]["prompt"], recs[3]["neg_prompt"], "random_removal", "random_removal")])[0]
    for k in ("x0_w", "x0_l"):
        np.testing.assert_allclose(recs[3][k].astype(np.float32), getattr(alone, k), rtol=2e-2, atol=2e-2)

    # a re-run is a no-op; other settings into the same folder are refused
    assert prepare.run_prepare(cfg, progress=False)["pairs_written"] == 0
    with pytest.raises(SystemExit, match="steps: 2 -> 3"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "rec", **{"prepare.steps": 3}), progress=False)


def test_prepare_tiny_sdxl_efficient(tiny_root, tmp_path):
    cfg = _cfg(tiny_root, tmp_path / "xl", family="sdxl", **{"data.efficient": True, "data.prompt_limit": 3,
                                                              "prepare.resolution": 32})
    prepare.run_prepare(cfg, progress=False)
    m = read_manifest(tmp_path / "xl")
    assert m["kind"] == "positives" and m["settings"]["sampler"] == "euler" and m["settings"]["guidance"] == 5.0
    assert m["conditioning"] == {"prompt_embeds": [77, 64], "pooled_prompt_embeds": [32], "add_time_ids": [6]}
    recs = _records(tmp_path / "xl")
    assert len(recs) == 3
    for r in recs:
        assert "x0_l" not in r and r["x0_w"].shape == (8, 8, 4)
        np.testing.assert_array_equal(r["cond"]["add_time_ids"], [32, 32, 0, 0, 32, 32])  # follows resolution
        assert set(r["neg_cond"]) == set(r["cond"])
    with PairLoader(tmp_path / "xl", batch_size=3, shuffle=False, num_epochs=1, variant="not_paired") as loader:
        batch = next(loader)
    np.testing.assert_array_equal(batch["x0_w"], np.stack([r["x0_w"] for r in recs]))
    np.testing.assert_array_equal(batch["cond_w"]["pooled_prompt_embeds"],
                                  np.stack([r["cond"]["pooled_prompt_embeds"] for r in recs]))


def test_clear_errors(tiny_root, tmp_path):
    with pytest.raises(SystemExit, match=r"data.prompts='/no/such.txt': prompt file not found"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "a", **{"data.prompts": "/no/such.txt"}), progress=False)
    with pytest.raises(SystemExit, match=r"config.model.path='/no/model' is not a diffusers model folder"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "b", **{"model.path": "/no/model"}), progress=False)
    with pytest.raises(SystemExit, match="data.records is empty"):
        prepare.run_prepare(_cfg(tiny_root, "", **{}), progress=False)
    with pytest.raises(SystemExit, match="needs an LLM"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "c", **{"data.perturb": ("llm_aesthetic:1",)}), progress=False)
    with pytest.raises(SystemExit, match="'word_swap', which needs data.word_groups"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "d", **{"data.perturb": ("word_swap:1",)}), progress=False)
    with pytest.raises(SystemExit, match=r"data.word_groups: /no/groups.json: cannot read word groups"):
        prepare.run_prepare(_cfg(tiny_root, tmp_path / "e", **{"data.perturb": ("word_swap:1",),
                                                                "data.word_groups": "/no/groups.json"}), progress=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


CONFIG_FILE = """
from ddspo_jax.config import base_config

def get_config():
    c = base_config()
    c.model.path = "tiny:{model}"
    c.model.dtype = "float32"
    c.data.prompts = "{prompts}"
    c.data.records = "{out}"
    c.data.prompt_limit = 6
    c.data.shard_size = 2
    c.prepare.batch_size = 1
    c.prepare.steps = 3
    return c
"""


def _run_cli(cfg_path, out):
    return subprocess.Popen([sys.executable, "-m", "ddspo_jax.prepare", "--config", str(cfg_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)


@pytest.mark.slow
def test_kill_and_rerun_equals_uninterrupted(tiny_root, tmp_path):
    def config(out):
        path = tmp_path / f"{out.name}.py"
        path.write_text(CONFIG_FILE.format(model=tiny_root / "sd", prompts=TINY_PROMPTS, out=out))
        return path

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    first = killed / "pairs-00000-of-00003.array_record"
    proc = _run_cli(config(killed), killed)
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stdout.read()
    assert not (killed / "manifest.json").exists()  # it was killed before finishing
    rerun = _run_cli(config(killed), killed)
    log = rerun.communicate()[0]
    assert rerun.returncode == 0, log
    assert "already complete" in log and "already there" in log
    ref = _run_cli(config(clean), clean)
    assert ref.communicate()[0] and ref.returncode == 0
    assert not [p for p in os.listdir(killed) if ".tmp-" in p]
    a, b = _records(killed), _records(clean)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for k in ("index", "prompt", "neg_prompt", "seed", "strategy"):
            assert ra[k] == rb[k]
        for k in ("x0_w", "x0_l"):
            np.testing.assert_array_equal(ra[k], rb[k])
        np.testing.assert_array_equal(ra["cond"]["prompt_embeds"], rb["cond"]["prompt_embeds"])
    for name in sorted(p for p in os.listdir(clean) if p.endswith(".array_record")):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
