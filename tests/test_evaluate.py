"""`python -m ddspo_jax.evaluate` end to end on tiny random models: generation, scoring, the statistics and
resumption; the bootstrap interval against the normal-theory interval."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddspo_jax import evaluate
from ddspo_jax.convert.common import read_state_dict, write_safetensors

from test_scorers import make_clip_folder  # noqa: E402


def test_bootstrap_interval_matches_normal_theory():
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = evaluate.bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert abs((hi - lo) / 2 - half) < 0.1 * half
    assert abs((lo + hi) / 2 - x.mean()) < 0.2 * half


def test_summary_statistics_by_hand():
    a = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 1.0]])  # per-prompt means 2, 2, 0.5
    b = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])  # 1, 2, 1
    s = evaluate.summarize({"model": a, "compare": b}, prefer=np.array([[0.9, 0.7], [0.5, 0.5], [0.2, 0.4]]))
    assert s["models"]["model"]["mean"] == pytest.approx(4.5 / 3)
    assert s["paired"]["difference"] == pytest.approx((1 + 0 - 0.5) / 3)
    assert s["paired"]["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts half
    assert s["paired"]["preference"] == pytest.approx((0.8 + 0.5 + 0.3) / 3)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from ddspo_jax.backbones import resolve_path

    base = resolve_path("tiny")
    other = tmp_path_factory.mktemp("models") / "tiny_b"
    shutil.copytree(base, other)
    unet = other / "unet" / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(unet)
    rng = np.random.default_rng(0)
    write_safetensors({k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in sd.items()}, unet)
    return str(base), str(other)


def test_evaluate_compare_pickscore_end_to_end(tmp_path, two_models):
    clip, _ = make_clip_folder(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog!\nthe cat and the dog\n")
    out = tmp_path / "eval"
    argv = ["--model", two_models[0], "--compare", two_models[1], "--prompts", str(prompts), "--scorer",
            "pickscore", "--scorer-path", str(clip), "--images-per-prompt", "2", "--steps", "3", "--out", str(out),
            "--batch", "4"]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2
    summary = json.loads((out / "summary.json").read_text())
    # the summary is the statistics of results.jsonl, recomputed here by hand
    per = {m: np.array([[r["score"] for r in rows if r["model"] == m and r["prompt_index"] == i] for i in range(3)])
           for m in ("model", "compare")}
    assert summary["models"]["model"]["mean"] == pytest.approx(per["model"].mean())
    diff = per["model"].mean(1) - per["compare"].mean(1)
    assert summary["paired"]["difference"] == pytest.approx(diff.mean())
    lo, hi = summary["paired"]["difference_ci95"]
    assert lo <= diff.mean() <= hi
    pref = np.array([r["preference"] for r in rows if r["model"] == "model"])
    assert summary["paired"]["preference"] == pytest.approx(pref.mean())
    # the score of an image is the scorer applied to its PNG; the two models' images differ
    from ddspo_jax.scorers import make_scorer
    png = evaluate._read_png(out / rows[0]["file"])
    assert make_scorer("pickscore", str(clip)).score(png[None], [rows[0]["prompt"]])[0] == pytest.approx(
        rows[0]["score"], abs=1e-5)
    assert not np.array_equal(png, evaluate._read_png(out / "compare" / "00000_0.png"))
    grid = evaluate._read_png(out / "grid.png")
    assert grid.shape[0] > 3 * 96 and grid.std() > 0.05
    # resumption: nothing is generated again and the numbers are the same
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert evaluate.main(argv) == 0
    assert "6 images found" in buf.getvalue() and "0 generated" in buf.getvalue()
    assert json.loads((out / "summary.json").read_text())["paired"] == summary["paired"]
    # other generation settings into the same folder are refused, naming the setting
    assert evaluate.main(argv[:-4] + ["--seed", "3", "--out", str(out)]) == 2
