"""Config schema: defaults validate, unknown keys / wrong types / bad choices are named."""

import pytest

from ddspo_jax.config import SCHEMA, ConfigError, base_config, check_override_keys, describe, learning_rate, validate


def test_base_config_is_valid_and_complete():
    cfg = validate(base_config())
    assert cfg.train.objective == "ddspo" and cfg.train.beta == 16000.0
    # the release: --learning_rate 2.5e-9 --scale_lr at an effective batch of 2048 pairs
    assert learning_rate(cfg) == pytest.approx(5.12e-6)
    cfg.train.batch_size = 256
    assert learning_rate(cfg) == pytest.approx(2.5e-9 * 256)
    cfg.train.lr = 1e-5
    assert learning_rate(cfg) == 1e-5
    assert all(k in describe() for k in SCHEMA)


def test_unknown_key_named():
    cfg = base_config()
    cfg.train.betta = 3.0
    with pytest.raises(ConfigError, match="train.betta"):
        validate(cfg)


def test_wrong_type_and_choice_named():
    cfg = base_config()
    with pytest.raises(TypeError, match="steps"):  # ConfigDict itself refuses a str where an int was
        cfg.train.steps = "100"
    cfg2 = base_config()  # a config file that builds its own section bypasses that; validate catches it
    cfg2.train = dict(cfg2.train.to_dict(), steps="100")
    with pytest.raises(ConfigError, match="train.steps.*int"):
        validate(cfg2)
    cfg3 = base_config()
    cfg3.train.objective = "dpo2"
    with pytest.raises(ConfigError, match="train.objective.*allowed"):
        validate(cfg3)
    cfg4 = base_config()
    cfg4.train.beta = 8000  # ints are fine where floats are expected
    validate(cfg4)


def test_missing_key_named():
    cfg = base_config()
    del cfg.train["beta"]
    with pytest.raises(ConfigError, match="train.beta"):
        validate(cfg)


def test_override_keys_checked(capsys):
    check_override_keys(["prog", "--config.train.beta=3", "--config=configs/x.py", "--other"])
    with pytest.raises(SystemExit) as e:
        check_override_keys(["prog", "--config.train.bta=3"])
    assert e.value.code == 2 and "unknown config key 'train.bta'" in capsys.readouterr().err


@pytest.mark.parametrize("text,words", [
    (None, "not found"), ("def get_config(:\n", "syntax error at line 1"), ("x = 1\n", "no get_config()"),
    ("import ml_collections\ndef get_config():\n    c = ml_collections.ConfigDict()\n    c.seed = 1\n    return c\n",
     "lacks"),
    ("def get_config(v=None):\n    raise KeyError(v)\n", "get_config('huge') failed: KeyError"),
])
def test_bad_config_files_end_in_one_line(tmp_path, capsys, text, words):
    from ddspo_jax.config import check_config_file

    path = tmp_path / "c.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as e:
        check_config_file(["prog", "--config", f"{path}:huge" if "huge" in words else str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: config file {path}") and words in err, err
    check_config_file(["prog", "--config=configs/tiny.py"])  # a good file passes


def test_shipped_configs_validate():
    import importlib.util
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.py"))
    assert {"sd14.py", "sd15.py", "sdxl.py", "toy.py"} <= {f.name for f in files}
    for f in files:
        spec = importlib.util.spec_from_file_location(f.stem, f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = validate(mod.get_config())
        if f.stem in ("sd14", "sd15", "sdxl"):  # the release's values: the next test
            assert cfg.train.lr is None


@pytest.mark.parametrize("key,value", [("model.remat_policy", "sometimes"), ("model.attention", "flash"),
                                       ("model.ref_dtype", "int8")])
def test_choices_named(key, value):
    cfg = base_config()
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_shipped_configs_carry_the_release_hyperparameters():
    """scripts/train_ddspo.sh + ddspo/args.py of KU-MIIL/DDSPO (README's table)."""
    from pathlib import Path
    from runpy import run_path

    root = Path(__file__).resolve().parent.parent / "configs"
    for name, steps, weighting in (("sd15", 200, "none"), ("sd14", 200, "none"), ("sdxl", 500, "linear")):
        c = validate(run_path(str(root / f"{name}.py"))["get_config"]())
        assert learning_rate(c) == pytest.approx(5.12e-6), name
        assert (c.train.batch_size, c.train.beta, c.train.warmup_steps, c.train.steps) == (2048, 16000.0, 100, steps)
        assert (c.train.optimizer, c.train.adam_b1, c.train.adam_b2, c.train.adam_eps, c.train.weight_decay,
                c.train.grad_clip) == ("adamw", 0.9, 0.999, 1e-8, 1e-2, 1.0), name
        assert c.schedule.loss_weighting == weighting, name


def test_rand_cond_needs_an_objective_with_cpp_targets():
    cfg = base_config()
    cfg.data.rand_cond, cfg.train.objective = "sigmoid", "dpo"
    with pytest.raises(ConfigError, match="data.rand_cond"):
        validate(cfg)
    cfg.train.objective = "dspo_cpp"
    validate(cfg)


def test_user_errors_are_one_family():
    """Commands catch ddspo_jax.errors.UserError only: the project's user-mistake classes are in it, a
    plain ValueError (a bug) is not."""
    from ddspo_jax.convert.common import ConversionError
    from ddspo_jax.data.records import RecordError
    from ddspo_jax.errors import UserError
    from ddspo_jax.checkpoint import RunError
    from ddspo_jax.export import ExportError
    from ddspo_jax.train import OutOfMemory, TrainingDiverged

    for cls in (ConfigError, ConversionError, RecordError, RunError, ExportError, TrainingDiverged, OutOfMemory):
        assert issubclass(cls, UserError), cls
    assert not issubclass(ValueError, UserError)


def test_scheduler_folder_override_is_reported(tmp_path):
    import json

    from ddspo_jax.backbones import schedule_from_folder

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
         "num_train_timesteps": 1000, "prediction_type": "v_prediction"}))
    said = []
    sched = schedule_from_folder(tmp_path, base_config().schedule, said.append)
    assert len(said) == 1 and "schedule.prediction_type='v_prediction'" in said[0] and "beta_schedule" in said[0]
    assert sched.prediction_type == "v_prediction"
    said.clear()
    cfg = base_config().schedule
    cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.prediction_type = "linear", 0.0001, 0.02, "v_prediction"
    schedule_from_folder(tmp_path, cfg, said.append)
    assert said == []  # nothing replaced, nothing said


def test_ddcpp_configs_carry_the_release_values():
    """scripts/train_ddspo_lora_target.sh + ddspo/train_lora_target.py of KU-MIIL/DDSPO (README's DD-CPP table)."""
    from pathlib import Path
    from runpy import run_path

    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("sd15", "sdxl"):
        get = run_path(str(root / f"{name}_ddcpp.py"))["get_config"]
        pair, ddspo = validate(get("pair")), validate(get())
        assert (pair.train.objective, pair.model.lora_rank, pair.model.lora_alpha, learning_rate(pair),
                pair.train.steps, pair.train.batch_size, pair.train.warmup_steps) == (
                    "sft_pair", 4, 4.0, 1e-4, 300, 2048, 0), name
        assert (ddspo.train.cpp, ddspo.train.cpp_pair, ddspo.train.beta, ddspo.train.steps) == (
            "pair", pair.output_dir, 8000.0, 100), name
        assert learning_rate(ddspo) == pytest.approx(5.12e-6) and ddspo.data.records == pair.data.records
        with pytest.raises(ConfigError, match="stage"):
            get("stage2")


def test_cpp_and_sft_pair_validation_names_the_keys():
    cfg = base_config()
    cfg.train.objective = "sft_pair"
    with pytest.raises(ConfigError, match="model.lora_rank"):
        validate(cfg)
    cfg = base_config()
    cfg.train.cpp, cfg.train.objective = "pair", "dpo"
    with pytest.raises(ConfigError, match="train.cpp"):
        validate(cfg)
    cfg.train.objective = "ddspo"
    with pytest.raises(ConfigError, match="train.cpp_pair"):
        validate(cfg)
