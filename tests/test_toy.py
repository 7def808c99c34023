"""The 2D toy experiment end to end (--quick settings) and its pieces."""

import csv
import subprocess
import sys

import numpy as np
import pytest

from ddspo_jax import toy
from ddspo_jax.config import base_config


def test_toy_quick_end_to_end(tmp_path):
    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.toy", "--quick", f"--config.output_dir={out}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "toy_results.csv")))
    cells = {(r["method"], r["n_pairs"], r["beta"]) for r in rows}
    assert ("reference", "0", "0.0") in cells
    assert len(rows) == 1 + 3 * 2 * 2  # reference + methods x N x betas (quick settings)
    for r in rows:
        assert 0.0 <= float(r["acc_mean"]) <= 1.0 and float(r["dist_mean"]) > 0
    ref_acc = float(rows[0]["acc_mean"])
    assert ref_acc > 1.5 / 6  # far above chance: the reference learned the modes
    # README's claim at --quick scale: DDSPO separates the classes better than the reference it starts from
    ddspo = [float(r["acc_mean"]) for r in rows if r["method"] == "ddspo"]
    assert min(ddspo) > ref_acc, (ddspo, ref_acc)
    png = (out / "toy_figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "class acc" in res.stdout or "class acc" in res.stderr


@pytest.mark.slow  # the full sweep, ~7 min on 2 cores
def test_full_run_reproduces_the_landed_table(tmp_path):
    """docs/toy/toy_results.csv (README's toy table) is what `python -m ddspo_jax.toy` writes (to 0.01)."""
    from pathlib import Path

    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.toy", f"--config.output_dir={out}"],
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    landed = list(csv.DictReader(open(Path(__file__).resolve().parents[1] / "docs" / "toy" / "toy_results.csv")))
    fresh = list(csv.DictReader(open(out / "toy_results.csv")))
    assert [(r["method"], r["n_pairs"], r["beta"]) for r in fresh] == [(r["method"], r["n_pairs"], r["beta"])
                                                                        for r in landed]
    # Not bit for bit: XLA:CPU's reductions are not run-to-run deterministic, and one flipped sample of the
    # 2000 x 3 seeds moves acc_mean by 1.7e-4 (measured: 8.3e-4 on the D-DPO N=12 cell). The table's claims
    # hold to 0.01, and DDSPO is the best method in every cell in both.
    for a, b in zip(fresh, landed):
        assert abs(float(a["acc_mean"]) - float(b["acc_mean"])) <= 0.01, (a, b)
        assert abs(float(a["dist_mean"]) - float(b["dist_mean"])) <= 0.05, (a, b)
    for rows in (fresh, landed):
        cells = {(r["n_pairs"], r["beta"]) for r in rows if r["method"] != "reference"}
        for n, beta in cells:
            acc = {r["method"]: float(r["acc_mean"]) for r in rows if (r["n_pairs"], r["beta"]) == (n, beta)}
            assert max(acc, key=acc.get) == "ddspo", (n, beta, acc)


def test_toy_rejects_bad_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.toy", "--quick", "--config.toy.n_modez=3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "n_modez" in res.stderr


def test_class_metrics_and_noisy_labels():
    cfg = base_config().toy
    rng = np.random.default_rng(0)
    labels = np.arange(600) % cfg.n_modes
    x = toy.sample_class(rng, cfg, labels)
    acc, dist = toy.class_metrics(cfg, x, labels)
    assert acc > 0.99 and abs(dist - cfg.mode_std * np.sqrt(np.pi / 2)) < 0.05  # Rayleigh mean
    _, noisy = toy.noisy_dataset(rng, cfg, 20000)
    xs, ys = toy.noisy_dataset(np.random.default_rng(1), cfg, 20000)
    nearest = np.linalg.norm(xs[:, None] - toy.mode_centers(cfg)[None], axis=-1).argmin(1)
    assert abs(np.mean(nearest != ys) - cfg.label_noise) < 0.02
