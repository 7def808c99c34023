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
    """docs/toy/toy_results.csv (README's toy table) is what `python -m ddspo_jax.toy` writes, within seed noise.

    Not bit for bit, and not to a fixed 0.01 either: XLA:CPU's matmul kernels differ with the CPU's vector
    width (CI's machine is not this one) and threads, and 40-400 optimizer steps amplify a 1e-7 difference
    into a different trajectory. CI measured 0.0103 on DSPO N=1200 beta=800, whose 3-seed std is 0.0079. So each
    cell is compared to 3 standard errors of the difference of two 3-seed means (floor 0.01): a method
    change that moves a low-variance cell (DDSPO N=1200: std 0.0009) by 0.01 still fails.
    """
    from pathlib import Path

    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.toy", f"--config.output_dir={out}"],
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    landed = list(csv.DictReader(open(Path(__file__).resolve().parents[1] / "docs" / "toy" / "toy_results.csv")))
    fresh = list(csv.DictReader(open(out / "toy_results.csv")))
    assert [(r["method"], r["n_pairs"], r["beta"]) for r in fresh] == [(r["method"], r["n_pairs"], r["beta"])
                                                                        for r in landed]

    def tol(a, b, key, floor):
        n = int(b["seeds"])
        return max(floor, 3.0 * np.sqrt((float(a[key + "_std"]) ** 2 + float(b[key + "_std"]) ** 2) / n))

    for a, b in zip(fresh, landed):
        assert abs(float(a["acc_mean"]) - float(b["acc_mean"])) <= tol(a, b, "acc", 0.01), (a, b)
        assert abs(float(a["dist_mean"]) - float(b["dist_mean"])) <= tol(a, b, "dist", 0.05), (a, b)
    # README's claim: DDSPO separates the classes best in every cell. The landed table shows it strictly; a
    # fresh run may not reverse any gap by more than 3 standard errors of the difference.
    cells = {(r["n_pairs"], r["beta"]) for r in landed if r["method"] != "reference"}
    for rows, strict in ((landed, True), (fresh, False)):
        for n, beta in cells:
            cell = {r["method"]: r for r in rows if (r["n_pairs"], r["beta"]) == (n, beta)}
            d = cell["ddspo"]
            for m, r in cell.items():
                gap = float(d["acc_mean"]) - float(r["acc_mean"])
                assert gap > 0 if (strict and m != "ddspo") else gap >= -tol(d, r, "acc", 0.0), (n, beta, m, gap)
