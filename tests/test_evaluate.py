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
    from ddspo_jax.scoring import make_scorer
    png = evaluate._read_png(out / rows[0]["file"])
    assert make_scorer("pickscore", str(clip)).score(png[None], [rows[0]["prompt"]])[0] == pytest.approx(
        rows[0]["score"], abs=1e-5)
    assert not np.array_equal(png, evaluate._read_png(out / "compare" / "00000_0.png"))
    # the grid: the three prompts side by side, each with both models' image 0 (nearest-upscaled to 96 px)
    from PIL import Image
    grid = np.round(evaluate._read_png(out / "grid.png") * 255).astype(np.uint8)
    assert grid.shape[1] > 3 * 2 * 96
    for j, folder in enumerate((out / "model", out / "compare")):
        first = Image.fromarray(np.round(evaluate._read_png(folder / "00000_0.png") * 255).astype(np.uint8))
        x = 6 + j * 98
        np.testing.assert_array_equal(grid[17:17 + 96, x:x + 96], np.asarray(first.resize((96, 96), Image.NEAREST)))
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


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 20), (5, 10), (37, 40), (400, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(evaluate.wilson(k, n), (ci.low, ci.high), atol=1e-6)


def test_geneval_tag_summary_by_hand():
    a = np.array([[1, 1], [1, 0], [0, 0], [1, 1]], float)  # tags x, x, y, y
    b = np.array([[0, 0], [1, 0], [0, 0], [0, 1]], float)
    s = evaluate.tag_summary({"model": a, "compare": b}, ["x", "x", "y", "y"])
    assert s["models"]["model"]["per_tag"]["x"]["accuracy"] == 0.75
    assert s["models"]["model"]["overall"] == pytest.approx((0.75 + 0.5) / 2)  # GenEval: mean of the tags
    assert s["models"]["compare"]["overall"] == pytest.approx((0.25 + 0.25) / 2)
    assert s["paired"]["overall_difference"] == pytest.approx(0.625 - 0.25)
    lo, hi = s["models"]["model"]["overall_ci95"]
    assert lo <= 0.625 <= hi


def test_evaluate_shapes_scorer_on_the_world_prompts(tmp_path, two_models):
    from ddspo_jax.world.__main__ import PROMPT_DIR

    lines = (PROMPT_DIR / "world_eval.jsonl").read_text().splitlines()
    picked = [next(x for x in lines if f'"tag": "{t}"' in x) for t in ("single_object", "two_object", "counting",
                                                                       "colors", "position", "color_attr")]
    prompts = tmp_path / "six.jsonl"
    prompts.write_text("\n".join(picked) + "\n")
    out = tmp_path / "eval"
    assert evaluate.main(["--model", two_models[0], "--compare", two_models[1], "--prompts", str(prompts),
                          "--scorer", "shapes", "--steps", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["geneval"]
    assert len(s["tags"]) == 6 and set(s["models"]) == {"model", "compare"}
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in rows} == set(s["tags"]) and all(r["score"] in (0.0, 1.0) for r in rows)
    # the verdicts are the judge's on the written PNGs
    from ddspo_jax.world.judge import judge
    meta = {json.loads(x)["prompt"]: json.loads(x) for x in picked}
    for r in rows:
        assert judge(evaluate._read_png(out / r["file"]), meta[r["prompt"]])[0] == bool(r["score"])


def test_training_eval_refuses_a_prompt_file_without_metadata_before_training(tmp_path):
    from ddspo_jax.config import base_config
    from ddspo_jax.errors import DataError

    cfg = base_config()
    (tmp_path / "p.txt").write_text("a photo of a circle\n")
    cfg.train.eval_prompts = str(tmp_path / "p.txt")
    with pytest.raises(DataError, match="not valid JSON"):
        evaluate.TrainingEval(cfg, None, None, None, None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}\n'
                                      '{"prompt": "no metadata"}\n')
    cfg.train.eval_prompts = str(tmp_path / "p.jsonl")
    with pytest.raises(DataError, match="not a GenEval metadata line"):
        evaluate.TrainingEval(cfg, None, None, None, None)
