"""Token-ids-only records: 4-8x smaller, and training on them equals training on stored embeddings."""

import jax
import numpy as np
import pytest

from ddspo_jax import prepare, train
from ddspo_jax.config import base_config, validate
from ddspo_jax.data.loader import PairSource
from ddspo_jax.data.records import read_manifest
from ddspo_jax.backbones import ensure_tiny_model
from ddspo_jax.backbones.tiny import TINY_PROMPTS


@pytest.mark.parametrize("family", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])  # sdxl: slow (95 s)
def test_token_id_records_train_like_embeddings(tmp_path, family):
    model = ensure_tiny_model(tmp_path / f"tiny-{family}", family=family)

    def cfg(mode):
        c = base_config()
        c.model.family, c.model.path, c.model.dtype = family, str(model), "float32"
        c.data.prompts, c.data.prompt_limit, c.data.shard_size = str(TINY_PROMPTS), 8, 8
        c.data.records, c.data.record_dtype, c.data.cond_mode = str(tmp_path / f"rec-{mode}"), "float32", mode
        c.prepare.batch_size, c.prepare.steps, c.prepare.resolution = 8, 2, 32
        c.output_dir = str(tmp_path / f"run-{mode}")
        c.train.batch_size, c.train.steps, c.train.warmup_steps, c.train.lr = 8, 2, 0, 1e-3
        c.train.beta, c.train.checkpoint_every = 500.0, 2
        c.train.sample_every, c.train.export_at_end = -1, False
        return validate(c)

    results = {}
    for mode in ("embeddings", "token_ids"):
        c = cfg(mode)
        prepare.run_prepare(c, progress=False)
        results[mode] = train.train(c, log=lambda *_: None)
    ids = read_manifest(tmp_path / "rec-token_ids")
    want = {"input_ids": [77]} if family == "sd" else {"input_ids": [77], "input_ids_2": [77], "add_time_ids": [6]}
    assert ids["conditioning"] == want
    from ddspo_jax.data.records import encode_record

    rec = PairSource(tmp_path / "rec-token_ids")[0]
    rec_emb = PairSource(tmp_path / "rec-embeddings")[0]
    size = lambda r: len(encode_record({k: v for k, v in r.items() if k in (  # noqa: E731
        "index", "prompt", "neg_prompt", "cond", "neg_cond", "seed", "strategy", "id")}))
    assert size(rec) < size(rec_emb) / 2  # (tiny embeddings are only 32 wide; SD's 768 make it ~13x)
    assert rec["cond"]["input_ids"].dtype == np.int32 and rec["neg_cond"]["input_ids"].shape == (77,)
    a = jax.device_get(results["embeddings"]["params"])
    b = jax.device_get(results["token_ids"]["params"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(
        jax.device_get(__import__("ddspo_jax.convert", fromlist=["load_unet"]).load_unet(model)[1]))))
