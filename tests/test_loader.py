"""Grain loader: read-back, sharding by process, resume equality, variants, rand_cond, bad input."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

from ddspo_jax.data import records as R
from ddspo_jax.data.loader import PairLoader
from ddspo_jax.step import apply_rand_cond, rand_cond_prob


def _lat(i, k):
    # distinct, bf16-exact values: record i, slot k
    return np.full((4, 4, 2), i * 4 + k, np.float32)


def _cond(i, k):
    return {"hidden": np.full((5, 8), i * 4 + k, np.float32), "pooled": np.full((3,), -(i * 4 + k), np.float32)}


def make_dataset(folder, n=10, per_shard=4, kind="pairs", prefix="pairs"):
    plan = R.plan_shards(n, per_shard)
    shards = []
    for shard, start, stop in plan:
        with R.ShardWriter(os.path.join(folder, R.shard_name(shard, len(plan), prefix))) as w:
            for i in range(start, stop):
                w.write(R.PairRecord(index=i, prompt=f"c{i}", neg_prompt=f"c-{i}", cond=_cond(i, 0),
                                     neg_cond=_cond(i, 1),
                                     x0_w=None if kind == "prompts" else _lat(i, 2),
                                     x0_l=_lat(i, 3) if kind == "pairs" else None))
        shards.append(w.entry)
    return R.write_manifest(folder, shards=shards, kind=kind, model="toy")


def _ids(batch):
    return batch["index"].tolist()


def test_reads_back_everything_exactly(tmp_path):
    make_dataset(tmp_path, n=10)
    loader = PairLoader(tmp_path, batch_size=5, seed=0, num_epochs=1, keep_text=True,
                        process_index=0, process_count=1)
    batches = list(loader)
    assert len(batches) == 2
    seen = sorted(sum((_ids(b) for b in batches), []))
    assert seen == list(range(10))  # every record exactly once per epoch
    b = batches[0]
    assert b["x0_w"].shape == (5, 4, 4, 2) and b["x0_w"].dtype == ml_dtypes.bfloat16
    assert b["cond_w"]["hidden"].shape == (5, 5, 8) and b["paired"].all()
    for j, i in enumerate(_ids(b)):
        np.testing.assert_array_equal(b["x0_w"][j].astype(np.float32), _lat(i, 2))
        np.testing.assert_array_equal(b["x0_l"][j].astype(np.float32), _lat(i, 3))
        np.testing.assert_array_equal(b["cond_w"]["hidden"][j].astype(np.float32), _cond(i, 0)["hidden"])
        np.testing.assert_array_equal(b["cond_l"]["pooled"][j].astype(np.float32), _cond(i, 1)["pooled"])
        assert b["prompt"][j] == f"c{i}" and b["neg_prompt"][j] == f"c-{i}"
    assert _ids(batches[0]) != list(range(5))  # shuffled
    # same seed -> same order; cast option
    again = PairLoader(tmp_path, batch_size=5, seed=0, num_epochs=1, dtype="float32", process_index=0, process_count=1)
    b2 = next(again)
    assert _ids(b2) == _ids(b) and b2["x0_w"].dtype == np.float32


def test_process_sharding_disjoint(tmp_path):
    make_dataset(tmp_path, n=12)
    per_host = [sum((_ids(b) for b in PairLoader(tmp_path, batch_size=2, seed=3, num_epochs=1,
                                                  process_index=p, process_count=3)), []) for p in range(3)]
    assert sorted(sum(per_host, [])) == list(range(12))
    assert all(len(h) == 4 for h in per_host)


def test_resume_gives_same_next_batch(tmp_path):
    make_dataset(tmp_path, n=10)
    kw = dict(batch_size=3, seed=1, process_index=0, process_count=1)
    a = PairLoader(tmp_path, **kw)
    for _ in range(5):  # past the first epoch boundary
        next(a)
    state = a.get_state()
    want = [next(a) for _ in range(3)]
    b = PairLoader(tmp_path, **kw)
    b.set_state(state)
    got = [next(b) for _ in range(3)]
    for w, g in zip(want, got):
        assert _ids(w) == _ids(g)
        jax.tree.map(np.testing.assert_array_equal, w, g)


def test_variants(tmp_path):
    make_dataset(tmp_path, n=8, kind="positives")
    with pytest.raises(ValueError, match="no x0_l"):
        PairLoader(tmp_path, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        PairLoader(tmp_path, batch_size=1, variant="not_paired", process_index=0, process_count=1)
    for variant in ("not_paired", "rand_positive"):
        b = next(PairLoader(tmp_path, batch_size=4, seed=0, variant=variant, keep_text=True,
                            process_index=0, process_count=1))
        ids = _ids(b)
        for j, i in enumerate(ids):
            other = ids[j - 1]
            assert other != i
            np.testing.assert_array_equal(b["x0_w"][j].astype(np.float32), _lat(i, 2))
            np.testing.assert_array_equal(b["x0_l"][j].astype(np.float32), _lat(other, 2))  # another's x0_w
            np.testing.assert_array_equal(b["cond_w"]["hidden"][j].astype(np.float32), _cond(i, 0)["hidden"])
            want_l = _cond(i, 1) if variant == "not_paired" else _cond(other, 0)  # own c- / other's own c
            assert b["neg_prompt"][j] == (f"c-{i}" if variant == "not_paired" else f"c{other}")
            for k in ("hidden", "pooled"):
                np.testing.assert_array_equal(b["cond_l"][k][j].astype(np.float32), want_l[k])


def test_rand_cond_extra_prompts(tmp_path):
    make_dataset(tmp_path / "pairs", n=8)
    make_dataset(tmp_path / "extra", n=5, kind="prompts", prefix="extra")
    with pytest.raises(ValueError, match="prompts-only"):
        PairLoader(tmp_path / "extra", batch_size=2, process_index=0, process_count=1)
    loader = PairLoader(tmp_path / "pairs", batch_size=4, seed=0, extra_dir=tmp_path / "extra",
                        process_index=0, process_count=1)
    b = next(loader)
    # extra embeddings are those of real extra records (hidden value e*4 and e*4+1 of the same e)
    ew = b["extra_cond_w"]["hidden"][:, 0, 0].astype(np.float32)
    el = b["extra_cond_l"]["hidden"][:, 0, 0].astype(np.float32)
    assert np.all(ew % 4 == 0) and np.all(el == ew + 1) and np.all(ew // 4 < 5)

    # on device: p(t) schedules, and the per-pair choice
    T = 1000
    t = np.array([0, 500, 700, 999])
    sig = np.asarray(rand_cond_prob(t, T, "sigmoid", 20.0))
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-20 * (t / T - 0.7))), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rand_cond_prob(t, T, "exponential", 20.0)),
                               np.exp(-20 * (1 - t / T)), rtol=1e-5)
    assert np.all(np.asarray(rand_cond_prob(t, T, "constant")) == 1)
    with pytest.raises(ValueError, match="rand_cond kind"):
        rand_cond_prob(t, T, "linear")
    f = jax.jit(apply_rand_cond, static_argnames=("T", "kind", "lam"))
    cw, cl, paired = f(np.array([0.5, 0.9, 0.5, 0.9]), np.array([999, 999, 0, 0]), T=T, batch=b, kind="sigmoid")
    cw, cl, paired = map(np.asarray, (cw["hidden"], cl["hidden"], paired))
    # t=0 -> p~1e-6: own prompts kept; t=999 -> p~0.998: swapped (for these uniforms)
    np.testing.assert_array_equal(cw[2:], b["cond_w"]["hidden"][2:])
    np.testing.assert_array_equal(cw[:2], b["extra_cond_w"]["hidden"][:2])
    np.testing.assert_array_equal(cl[:2], b["extra_cond_l"]["hidden"][:2])
    assert paired.tolist() == [False, False, True, True]


def test_bad_input_errors(tmp_path):
    # no manifest
    with pytest.raises(FileNotFoundError, match="no manifest.json.*python -m ddspo_jax.prepare --config"):
        PairLoader(tmp_path, batch_size=2, process_index=0, process_count=1)

    # a record with another schema version, and a corrupt record, inside a shard
    from flax import serialization

    good = R.encode_record(R.PairRecord(index=0, prompt="a", neg_prompt="b", cond=_cond(0, 0), neg_cond=_cond(0, 1),
                                        x0_w=_lat(0, 2), x0_l=_lat(0, 3)))
    wrong = serialization.msgpack_serialize({**serialization.msgpack_restore(good), "schema_version": 2})
    for name, bad in (("wrong", wrong), ("corrupt", good[: len(good) // 2])):
        folder = tmp_path / name
        with R.ShardWriter(folder / "pairs-00000-of-00001.array_record") as w:
            w.write_bytes(good)
            w.write_bytes(bad)
        R.write_manifest(folder, shards=[w.entry], kind="pairs")
        loader = PairLoader(folder, batch_size=2, shuffle=False, num_epochs=1, num_threads=0,
                            process_index=0, process_count=1)
        match = "schema version 2" if name == "wrong" else "corrupt or truncated"
        with pytest.raises(R.RecordError, match=rf"pairs-00000-of-00001.array_record: record 1: {match}"):
            next(loader)

    # a truncated shard file
    folder = tmp_path / "trunc"
    make_dataset(folder, n=6, per_shard=3)
    path = folder / R.shard_name(1, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(R.RecordError, match=r"pairs-00001-of-00002.array_record: cannot open"):
        PairLoader(folder, batch_size=2, process_index=0, process_count=1)


@pytest.mark.slow
def test_worker_processes_same_batches_and_resume(tmp_path):
    make_dataset(tmp_path, n=10)
    kw = dict(batch_size=3, seed=1, process_index=0, process_count=1)
    with PairLoader(tmp_path, **kw) as ref, PairLoader(tmp_path, worker_count=1, **kw) as mp:
        assert [_ids(next(ref)) for _ in range(4)] == [_ids(next(mp)) for _ in range(4)]
        state = mp.get_state()
        want = _ids(next(mp))
    with PairLoader(tmp_path, worker_count=1, **kw) as again:
        again.set_state(state)
        assert _ids(next(again)) == want


@pytest.mark.parametrize("variant", ["paired", "not_paired", "rand_positive"])
def test_hosts_blocks_make_the_single_host_global_batch(tmp_path, variant):
    # Host p takes the contiguous block p of every global batch (the rows its devices hold), so the global
    # batch -- including the variants' roll across block edges and the rand_cond extras -- does not depend
    # on the number of hosts.
    make_dataset(tmp_path / "pairs", n=13)
    make_dataset(tmp_path / "extra", n=5, kind="prompts", prefix="extra")
    kw = dict(seed=2, variant=variant, keep_text=True, extra_dir=tmp_path / "extra")
    single = PairLoader(tmp_path / "pairs", batch_size=6, process_index=0, process_count=1, **kw)
    hosts = [PairLoader(tmp_path / "pairs", batch_size=2, process_index=p, process_count=3, **kw) for p in range(3)]
    for _ in range(5):  # crosses epochs (13 records, 6 per step)
        want = next(single)
        got = jax.tree.map(lambda *xs: np.concatenate(xs), *[next(h) for h in hosts])
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    finite = [PairLoader(tmp_path / "pairs", batch_size=2, num_epochs=1, process_index=p, process_count=3, **kw)
              for p in range(3)]
    assert [len(list(h)) for h in finite] == [2, 2, 2]  # only complete global batches: equal step counts
