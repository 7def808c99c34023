"""Bad input and faults: nothing the user had is lost, nothing stale or half-written is trusted, and a mistake
ends in one line naming the culprit. Each case is a hand-made situation a user can get into; the command's
own result is compared with what must hold (folders hashed before and after)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddspo_jax import export as ex
from ddspo_jax import train
from ddspo_jax.config import base_config, validate
from ddspo_jax.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_export import fake_run  # noqa: E402
from test_loader import make_dataset  # noqa: E402


def tree_hash(folder: Path) -> str:
    """Every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("DDSPO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def assert_one_line(res, *words):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])  # the one exit code of a user mistake
    msg = res.stderr[res.stderr.rfind("error:"):]
    assert msg.startswith("error:") and len(msg.splitlines()) <= 4, res.stderr[-2000:]
    for w in words:
        assert w in msg, (w, msg)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("where", ["run", "above", "cwd"])
def test_export_overwrite_never_removes_a_run(tmp_path, where):
    run, _, _ = fake_run(tmp_path, "sd")
    before = tree_hash(run)
    out = {"run": run, "above": tmp_path, "cwd": Path(".")}[where]
    res = run_cli(["ddspo_jax.export", "--run", str(run), "--out", str(out), "--overwrite"],
                  cwd=tmp_path if where == "cwd" else None)
    assert_one_line(res, "--overwrite" if where != "run" else "training run")
    assert tree_hash(run) == before


def test_export_overwrite_replaces_only_an_export(tmp_path):
    run, _, _ = fake_run(tmp_path, "sd")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ex.ExportError, match="not written by export"):
        ex.export(run, user, overwrite=True, log=lambda *_: None)
    assert (user / "notes.txt").read_text() == "keep me"
    out = tmp_path / "exported"
    ex.export(run, out, step=3, log=lambda *_: None)
    assert json.loads((out / ex.EXPORT_MARK).read_text())["step"] == 3
    ex.export(run, out, overwrite=True, log=lambda *_: None)  # an export's own folder: replaced
    assert json.loads((out / ex.EXPORT_MARK).read_text())["step"] == 5
    (tmp_path / "file").write_text("x")
    with pytest.raises(ex.ExportError, match="existing file"):
        ex.export(run, tmp_path / "file", log=lambda *_: None)


# -------------------------------------------------------------------------------------------- evaluate
def test_evaluate_cache_identity_follows_the_checkpoint(tmp_path):
    """The images' cache key names the run's step: after the run trains on, it differs (a stale cache of the
    old step is not scored as the new model)."""
    from ddspo_jax.sample import model_identity

    run, model_dir, _ = fake_run(tmp_path, "sd", steps=(3, 5))
    first = model_identity(str(run))
    assert first["step"] == 5 and model_identity(str(run), 3)["step"] == 3
    (tmp_path / "b").mkdir()
    run2, _, _ = fake_run(tmp_path / "b", "sd", steps=(3, 5, 7))
    assert model_identity(str(run2))["step"] == 7
    a = model_identity(str(model_dir))
    os.utime(next(model_dir.rglob("*.safetensors")), ns=(1, 1))
    assert model_identity(str(model_dir)) != a  # replaced weights: another identity


def test_png_writes_are_atomic(tmp_path, monkeypatch):
    """A failure mid-write leaves no file under the final name (a re-run regenerates it)."""
    from PIL import Image

    from ddspo_jax.sample import save_png

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_orphan_temps_of_dead_writers_only_are_removed(tmp_path):
    """A SIGKILLed writer leaves its temp file (no `finally` runs): the next run deletes it, and never the temp
    file of a writer that is still running, nor a file that only looks alike."""
    from ddspo_jax.files import remove_orphan_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"orphan": f".00003_0.png.tmp-{dead.pid}", "live": f".00004_0.png.tmp-{live.pid}",
                 "dir": f".export.tmp-{dead.pid}", "user": "notes.tmp-1", "png": "00001_0.png"}
        for key, name in names.items():
            (tmp_path / name).mkdir() if key == "dir" else (tmp_path / name).write_text("x")
        (tmp_path / names["dir"] / "unet").mkdir()
        assert remove_orphan_temps(tmp_path, "elsewhere") == []  # `name` limits it to one target
        assert sorted(remove_orphan_temps(tmp_path)) == sorted([names["orphan"], names["dir"]])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["user"], names["png"]])
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------- train
def fake_backbone(tmp_path, family="sd", res=64, scale=4, ch=4):
    return SimpleNamespace(family=family, path=tmp_path / "model", default_resolution=lambda: res, vae_scale=scale,
                           latent_channels=ch)


def records_for(folder, model, family="sd"):
    m = make_dataset(str(folder), n=4, per_shard=4)  # latents [4, 4, 2]
    m["model"] = str(model)
    m["settings"] = {"family": family, "model": str(model)}
    (folder / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("case", ["family", "model", "shape", "ok"])
def test_train_checks_records_against_the_model(tmp_path, case):
    bb = fake_backbone(tmp_path, res=16, ch=2)  # 16 px / 4 -> [4, 4, 2] latents, as the records
    cfg = base_config()
    cfg.data.records = str(tmp_path / "rec")
    m = records_for(tmp_path / "rec", tmp_path / ("other" if case == "model" else "model"),
                    family="sana" if case == "family" else "sd")
    if case == "shape":
        bb.default_resolution = lambda: 32
    if case == "ok":
        train.check_records(cfg, m, bb)
        return
    with pytest.raises(DataError, match={"family": "'sana' model", "model": "records made by the model",
                                         "shape": r"latents of shape \[4, 4, 2\]"}[case]):
        train.check_records(cfg, m, bb)


def fake_trained_run(tmp_path):
    cfg = base_config()
    cfg.output_dir = str(tmp_path / "run")
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    return cfg, run


def test_resume_refuses_structural_changes_before_writing(tmp_path):
    cfg, run = fake_trained_run(tmp_path)
    before = tree_hash(run)
    c = cfg.copy_and_resolve_references()
    c.model.lora_rank, c.train.objective = 4, "dpo"
    with pytest.raises(ConfigError, match=r"model.lora_rank \(0 -> 4\).*train.objective \('ddspo' -> 'dpo'\)"):
        train.check_resume(run, c)
    assert tree_hash(run) == before
    c = cfg.copy_and_resolve_references()
    c.train.lr, c.train.steps = 1e-5, 200
    changed = train.check_resume(run, c)
    assert any(s.startswith("train.lr None -> 1e-05") for s in changed) and any("train.steps" in s for s in changed)
    assert train.check_resume(tmp_path / "fresh", c) == []


@pytest.mark.parametrize("key,value,words", [
    ("train.lr", -1e-3, "must be > 0"), ("train.lr", float("nan"), "finite"), ("train.lr", 1e39, "<= 1"),
    ("train.steps", 0, ">= 1"), ("train.steps", -5, ">= 1"), ("train.checkpoint_every", 0, ">= 1"),
    ("data.prompt_limit", -3, ">= 0"), ("train.beta", 0.0, "> 0"), ("data.removal_range", (0.7, 0.4), "low <= high"),
])
def test_numbers_out_of_range_are_refused_naming_the_key(key, value, words):
    cfg = base_config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        validate(cfg)
    assert words in str(e.value)


def test_train_cli_refuses_a_bad_number_in_one_line(tmp_path):
    res = run_cli(["ddspo_jax.train", "--config", "configs/tiny.py", f"--config.output_dir={tmp_path / 'r'}",
                   "--config.train.checkpoint_every=0"], cwd=Path(__file__).resolve().parents[1])
    assert_one_line(res, "train.checkpoint_every")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_settings_protect_only_finished_shards(tmp_path):
    from ddspo_jax import prepare
    from ddspo_jax.errors import UserError

    out = tmp_path / "rec"
    out.mkdir()
    old = {"prompts_sha256": "aaaa", "shard_size": 4}
    (out / prepare.SETTINGS_FILE).write_text(json.dumps(old))
    new = dict(old, prompts_sha256="bbbb")  # the prompt file was edited
    prepare._check_settings(out, new, write=True)  # no shard finished: the old settings protect nothing
    assert json.loads((out / prepare.SETTINGS_FILE).read_text()) == new
    (out / "pairs-00000-of-00002.array_record").write_bytes(b"x")
    with pytest.raises((UserError, SystemExit), match="prompts_sha256"):
        prepare._check_settings(out, old, write=True)
    assert json.loads((out / prepare.SETTINGS_FILE).read_text()) == new


def test_prompts_digest_follows_the_content():
    from ddspo_jax import prepare

    assert prepare.prompts_digest(["a red circle", "a square"]) != prepare.prompts_digest(["a red circle", "a ring"])
    assert prepare.prompts_digest(["x"]) == prepare.prompts_digest(["x"])


# ------------------------------------------------------------------------------ the bad-input table (CLI)
ROOT = Path(__file__).resolve().parents[1]


def _cases(tmp: Path):
    """(argv, words the error names, paths that must not exist afterwards)."""
    (tmp / "afile").write_text("x")
    (tmp / "syntax.py").write_text("def get_config(:\n")
    rec = tmp / "noshards"
    rec.mkdir()
    (rec / "manifest.json").write_text(json.dumps({"format": "ddspo_jax.records", "schema_version": 1}))
    tiny = ["--config", "configs/tiny.py"]
    return [
        (["ddspo_jax.train", "--config", str(tmp / "syntax.py")], ["syntax.py", "syntax error"], []),
        (["ddspo_jax.train", *tiny, f"--config.output_dir={tmp / 'afile' / 'run'}"], ["output_dir"], []),
        (["ddspo_jax.train", *tiny, f"--config.output_dir={tmp / 'r1'}", "--config.train.lr=-0.001"],
         ["train.lr", "> 0"], [tmp / "r1"]),
        (["ddspo_jax.train", *tiny, f"--config.output_dir={tmp / 'r2'}", f"--config.data.records={rec}"],
         ["manifest.json", "shards"], []),
        (["ddspo_jax.prepare", *tiny, f"--config.data.records={tmp / 'p1'}", "--config.data.removal_range=(0.7, 0.4)"],
         ["data.removal_range"], [tmp / "p1"]),
        (["ddspo_jax.prepare", *tiny, f"--config.data.records={tmp / 'p2'}", "--config.data.perturb=('bogus',)"],
         ["bogus"], [tmp / "p2" / "prepare_settings.json"]),
        (["ddspo_jax.prepare", *tiny, f"--config.data.records={tmp / 'p3'}", "--config.data.prompt_limit=-3"],
         ["data.prompt_limit"], [tmp / "p3"]),
        (["ddspo_jax.toy", "--config", "configs/toy.py", "--config.toy.methods=('dpo', 'bogus')"], ["toy.methods"], []),
        (["ddspo_jax.world", "prompts", "--train", "-3", "--out", str(tmp / "w1")], ["--train"], [tmp / "w1"]),
        (["ddspo_jax.world", "prompts", "--out", str(tmp / "afile")], ["existing file"], []),
        (["ddspo_jax.world", "pretrain", "--resolution", "7", "--out", str(tmp / "w2")], ["--resolution"], [tmp / "w2"]),
        (["ddspo_jax.world", "pretrain", "--batch", "0", "--out", str(tmp / "w3")], ["--batch"], [tmp / "w3"]),
        (["ddspo_jax.sample", "--model", "tiny", "--prompts", "x.txt", "--out", str(tmp / "afile")], ["existing file"], []),
        (["ddspo_jax.sample", "--model", "tiny", "--compare", str(tmp / "nope"), "--prompts", "x.txt", "--out",
          str(tmp / "s1")], ["--compare", "no such"], [tmp / "s1"]),
        (["ddspo_jax.evaluate", "--model", "tiny", "--prompts", "x.txt", "--limit", "-1", "--out", str(tmp / "e1")],
         ["--limit"], [tmp / "e1"]),
    ]


N_CASES = 15


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_input_table(tmp_path, i):
    """Each bad input: exit 2, the last message names the culprit, no traceback, nothing written where the
    command should have stopped first, and the user's files unchanged."""
    cases = _cases(tmp_path)
    assert len(cases) == N_CASES
    argv, words, absent = cases[i]
    before = tree_hash(tmp_path)
    res = run_cli(argv, cwd=ROOT)
    assert_one_line(res, *words)
    for p in absent:
        assert not p.exists(), p
    assert tree_hash(tmp_path) == before


def test_a_wrong_model_config_names_the_first_mismatches_and_the_count():
    """Hundreds of mismatched keys (a wrong unet config) end in a short message: the first few of each kind
    and how many there are."""
    import jax

    from ddspo_jax.convert.common import SHOWN, ConversionError, KeyTable, params_from_state_dict

    shapes = {f"layer_{i}": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)} for i in range(40)}
    state = {f"other.{i}.weight": np.zeros((3, 2), np.float32) for i in range(300)}
    with pytest.raises(ConversionError) as e:
        params_from_state_dict(KeyTable(), shapes, state, source="unet.safetensors")
    msg = str(e.value)
    assert "40 missing keys (first 5)" in msg and "300 unexpected keys (first 5)" in msg, msg
    assert len(msg.splitlines()) == 1 + 2 * (1 + SHOWN), msg


def test_debug_shows_the_traceback_beside_the_line(tmp_path):
    env_debug = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", DDSPO_DEBUG="1")
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.train", "--config", "configs/tiny.py",
                          f"--config.output_dir={tmp_path / 'r'}", "--config.train.steps=0"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env_debug)
    assert res.returncode == 2 and "Traceback" in res.stderr and "train.steps" in res.stderr.splitlines()[-1] + \
        res.stderr.splitlines()[-2], res.stderr[-1500:]


def test_model_errors_name_the_folder_not_a_config_key(tmp_path):
    from ddspo_jax.errors import UserError
    from ddspo_jax.sample import load_model

    (tmp_path / "notamodel").mkdir()
    with pytest.raises(UserError) as e:
        load_model(str(tmp_path / "notamodel"), dtype="float32")
    assert "config.model.path" not in str(e.value) and str(tmp_path / "notamodel") in str(e.value)


# ------------------------------------------------------------------------- kill and re-run (slow suite)
def _kill_when(proc, ready, timeout=600) -> bool:
    """SIGKILL as soon as `ready()`; False when the command finished first (a short window on a busy machine)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
def test_evaluate_killed_midway_then_rerun_equals_uninterrupted(tmp_path):
    from ddspo_jax.configs.world import PROMPTS, WORLD_MODEL

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join((PROMPTS / "world_eval.jsonl").read_text().splitlines()[::50]) + "\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def cmd(out):
        return [sys.executable, "-m", "ddspo_jax.evaluate", "--model", str(WORLD_MODEL), "--prompts", str(prompts),
                "--scorer", "shapes", "--steps", "2", "--images-per-prompt", "2", "--batch", "2", "--out", str(out)]

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(proc, lambda: len(list((killed / "model").glob("*.png"))) >= 3)
    assert not (killed / "summary.json").exists()
    for c, out in ((cmd(killed), killed), (cmd(clean), clean)):
        res = subprocess.run(c, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    assert not list(killed.rglob("*.tmp-*"))
    a, b = (json.loads((d / "summary.json").read_text())["models"] for d in (killed, clean))
    assert a == b
    for p in sorted((clean / "model").glob("*.png")):
        assert (killed / "model" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.slow
def test_export_killed_midway_leaves_nothing_trusted(tmp_path):
    run, _, _ = fake_run(tmp_path, "sd")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = tmp_path / "exported"
    for _ in range(5):  # the write takes a fraction of a second: try until the kill lands inside it
        proc = subprocess.Popen([sys.executable, "-m", "ddspo_jax.export", "--run", str(run), "--out", str(out)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _kill_when(proc, lambda: any(p.name.startswith(".exported.tmp-") for p in tmp_path.iterdir())):
            break
        shutil.rmtree(out)
    else:
        pytest.fail("export always finished before the kill")
    assert not out.exists()  # the pipeline appears only whole, by one rename
    res = run_cli(["ddspo_jax.export", "--run", str(run), "--out", str(out)], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(tmp_path.glob(".exported.tmp-*"))  # the killed export's half-written folder is gone too
    clean = tmp_path / "clean"
    ex.export(run, clean, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in (clean / "unet").iterdir():
        assert (out / "unet" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.parametrize("line,words", [('{"prompt": "a", "neg_prompt": "b"}', "field 'pos_file' missing"),
                                        ("[1]", "a JSON object is expected"), ("{oops", "not valid JSON")])
def test_authors_release_metadata_errors_name_the_line(tmp_path, line, words):
    from ddspo_jax.data.records import import_authors_release

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "metadata.jsonl").write_text('{"prompt": "x", "neg_prompt": "y", "pos_file": "p.npy"}\n'
                                                     + line + "\n")
    with pytest.raises(DataError, match=f"metadata.jsonl:2: {words}"):
        import_authors_release(tmp_path / "src", tmp_path / "out", encode=lambda texts: {})


def test_prepare_says_when_llm_rewrites_fell_back(tmp_path, monkeypatch, capsys):
    """data.llm_on_error=fallback with a dead LLM endpoint: the records are made with random removal, and
    prepare says how many rewrites fell back (before: only the manifest's counters knew)."""
    from ddspo_jax import prepare
    from ddspo_jax.configs.tiny import get_config as tiny_config
    from ddspo_jax.data import perturb as P

    dead = P.OpenAIChatBackend("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=2)
    mix = P.Perturber({"llm_compositional": 1}, rewriters={"llm_compositional": P.LLMRewriter("compositional", dead)},
                      on_error="fallback")
    monkeypatch.setattr(prepare, "make_perturber", lambda cfg, out: mix)
    c = tiny_config()
    c.data.records, c.data.prompt_limit, c.data.shard_size = str(tmp_path / "rec"), 2, 2
    c.prepare.steps, c.prepare.batch_size = 2, 2
    prepare.run_prepare(validate(c), progress=False)
    err = capsys.readouterr().err
    assert "2 LLM rewrite(s) failed and fell back to random_removal" in err, err


def test_every_jsonl_reader_names_the_file_line_and_key(tmp_path):
    """One reader (files.iter_jsonl) behind prompts, preference folders, the authors' release and the shapes
    scorer: a line missing a key is one DataError naming file:line and the key, for each of them."""
    from ddspo_jax.data.preferences import iter_preferences
    from ddspo_jax.data.prompts import load_prompts
    from ddspo_jax.data.records import import_authors_release
    from ddspo_jax.scoring import make_scorer

    good = {"prompt": "a photo of a ring", "include": [{"class": "ring", "count": 1}],
            "preferred": "a.png", "dispreferred": "b.png", "neg_prompt": "x", "pos_file": "p.npy"}
    cases = [("prompts.jsonl", "prompt", lambda p: load_prompts(p)),
             ("preferences.jsonl", "dispreferred", lambda p: list(iter_preferences(p.parent))),
             ("metadata.jsonl", "pos_file", lambda p: import_authors_release(p.parent, tmp_path / "out",
                                                                           encode=lambda t: {})),
             ("meta.jsonl", "include", lambda p: make_scorer("shapes", str(p)))]
    for name, key, read in cases:
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        bad = {k: v for k, v in good.items() if k != key}
        (folder / name).write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"{name}:3: (not a GenEval metadata line: )?field '{key}' missing"):
            read(folder / name)
