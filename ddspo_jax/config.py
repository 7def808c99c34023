"""The one config schema: every key, its default, its type and what it means.

Config files are plain Python (`configs/*.py`) whose `get_config()` starts from `base_config()` and
changes values; `ml_collections.config_flags` applies `--config.a.b=v` overrides on top. `validate`
runs before any compute and rejects unknown keys and wrong types with a message naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict


from ddspo_jax.errors import ConfigError  # noqa: E402  (re-exported: config.ConfigError)
from ddspo_jax.errors import user_exits


@dataclasses.dataclass(frozen=True)
class _F:
    default: Any
    doc: str
    type: type | None = None  # needed when default is None
    choices: tuple | None = None


OBJECTIVES = ("ddspo", "dpo", "dspo", "dspo_cpp", "sft", "sft_pair")

# Dotted key -> field. Sections are created from the dots.
SCHEMA: dict[str, _F] = {
    "seed": _F(0, "Root PRNG seed; step, process and pair indices are folded into it."),
    "output_dir": _F("runs/default", "Checkpoints, TensorBoard events, samples and exports go here."),
    # --- model -----------------------------------------------------------------------------
    "model.family": _F("", "Backbone family ('': detected from model.path's model_index.json; when set, it must "
                           "agree). Names: ddspo_jax.backbones.FAMILY_NAMES."),
    "model.path": _F("", "Base model: a diffusers pipeline folder."),
    "model.dtype": _F("bfloat16", "Compute dtype.", choices=("float32", "bfloat16", "float16")),
    "model.param_dtype": _F("float32", "Master weight dtype.", choices=("float32", "bfloat16")),
    "model.ref_dtype": _F("", "Dtype of the frozen reference's weights ('' : model.dtype, the compute dtype).",
                          choices=("", "float32", "bfloat16", "float16")),
    "model.remat_policy": _F("none", "What each ResNet / transformer block keeps for the backward pass: none (all) | "
                             "dots_saveable (matmul/conv outputs) | block (its inputs only) | full (block, and "
                             "the whole forward recomputed). benchmarks/memory.py measures them.",
                             choices=("none", "dots_saveable", "block", "full")),
    "model.scan_blocks": _F(False, "Run each stack of identical transformer blocks (SDXL's 10 per level, SANA's 20-28, "
                            "SD3's joint blocks) as one lax.scan over their stacked weights: the compiler sees one "
                            "block body, so compile time and compile memory fall; costs a stacked copy of the "
                            "stack's weight shards and of their gradients. Same values, same parameter tree and "
                            "files (docs/performance.md)."),
    "model.lora_rank": _F(0, "0: full fine-tune; r > 0: train rank-r LoRA on the attention projections (SANA: 512)."),
    "model.lora_alpha": _F(0.0, "LoRA scale alpha (update = alpha / r * A B); 0 means alpha = r."),
    "model.attention": _F("auto", "auto (cuDNN flash on GPU where it applies, else XLA; query-chunked XLA for "
                          ">= 2048 tokens) | xla | cudnn | chunked.", choices=("auto", "xla", "cudnn", "chunked")),
    # --- noise schedule --------------------------------------------------------------------
    "schedule.kind": _F("ddpm", "Discrete DDPM (SD-1.x, SDXL) or rectified flow (SANA).", choices=("ddpm", "flow")),
    "schedule.num_train_timesteps": _F(1000, "T."),
    "schedule.beta_schedule": _F("scaled_linear", "DDPM betas.", choices=("scaled_linear", "linear")),
    "schedule.beta_start": _F(0.00085, "First DDPM beta."),
    "schedule.beta_end": _F(0.012, "Last DDPM beta."),
    "schedule.prediction_type": _F("epsilon", "What the DDPM model predicts.", choices=("epsilon", "v_prediction")),
    "schedule.flow_shift": _F(3.0, "SANA's sampling timestep shift s' = k s / (1 + (k - 1) s)."),
    "schedule.train_flow_shift": _F(1.0, "The shift of flow training timesteps (1: uniform sigma, as the release)."),
    "schedule.timestep_sampling": _F(
        "uniform", "Training timestep density. DDPM: uniform | linear | sigmoid; flow: uniform | logit_normal | mode.",
        choices=("uniform", "linear", "sigmoid", "logit_normal", "mode")),
    "schedule.logit_mean": _F(0.0, "logit_normal: mean m of u = sigmoid(N(m, s))."),
    "schedule.logit_std": _F(1.0, "logit_normal: std s."),
    "schedule.mode_scale": _F(1.29, "mode sampling: scale (SD3's default)."),
    "schedule.precondition_outputs": _F(False, "Flow only: the loss compares x_0 = x_t - sigma v instead of velocities "
                                        "(the release's SD3 --precondition_outputs 1; sigma^2 times the velocity errors)."),
    "schedule.loss_weighting": _F("none", "Per-pair loss weight: none | linear (t / (T-1)).", choices=("none", "linear")),
    # --- objective and optimisation --------------------------------------------------------
    "train.objective": _F("ddspo", "Preference objective.", choices=OBJECTIVES),
    "train.cpp": _F("reference", "Where ddspo / dspo_cpp take their contrastive targets: reference (TF-CPP: the "
                    "frozen reference on c and c-) | pair (DD-CPP: the winning / losing adapters of an sft_pair run, "
                    "train.cpp_pair, both on c).", choices=("reference", "pair")),
    "train.cpp_pair": _F("", "train.cpp=pair: the run folder of a train.objective=sft_pair run (its latest "
                         "checkpoint's two LoRA adapters on this run's base model)."),
    "train.beta": _F(16000.0, "Logit scale beta (paper: 16000 SD/SDXL, 2000 SANA, 8000 for D-DPO)."),
    "train.dspo_weight": _F(None, "DSPO's preference weight w; None uses beta (as the reference code does).", float),
    "train.lr_per_pair": _F(2.5e-9, "Base learning rate per pair: the peak lr is lr_per_pair x train.batch_size "
                            "(the release's --learning_rate with --scale_lr; SD/SDXL 2.5e-9, SANA 4e-8)."),
    "train.lr": _F(None, "Peak learning rate, overriding lr_per_pair x batch_size (None: use that product).", float),
    "train.steps": _F(100, "Optimizer steps."),
    "train.warmup_steps": _F(100, "Linear warmup steps (0 for SANA)."),
    "train.batch_size": _F(2048, "Global pairs per optimizer step (accumulated over micro-batches)."),
    "train.micro_batch_per_device": _F(0, "At most this many pairs per device per micro-batch (gradients are "
                                       "accumulated over batch_size / (this x devices) micro-batches, so one config "
                                       "runs on one GPU and on a pod); 0: the whole batch at once."),
    "train.max_skipped_steps": _F(3, "A step with a non-finite loss or gradient is skipped on device; stop after "
                                  "this many in a row (the checkpoints never hold a non-finite state)."),
    "train.optimizer": _F("adamw", "adamw (torch.optim.AdamW) or adafactor (transformers.Adafactor with "
                          "scale_parameter=False, relative_step=False), as the release builds them (optim.py).",
                          choices=("adamw", "adafactor")),
    "train.weight_decay": _F(1e-2, "Decoupled weight decay of AdamW and Adafactor (release: 1e-2)."),
    "train.adam_b1": _F(0.9, "AdamW beta1."),
    "train.adam_b2": _F(0.999, "AdamW beta2."),
    "train.adam_eps": _F(1e-8, "AdamW epsilon."),
    "train.grad_clip": _F(1.0, "AdamW: global-norm gradient clipping; Adafactor: its per-update clip_threshold "
                          "(0 disables)."),
    "train.share_noise": _F(True, "Same t and noise for both members of a pair (as Diffusion-DPO does)."),
    "train.log_every": _F(1, "Write scalar metrics every this many steps."),
    "train.checkpoint_every": _F(50, "Save an Orbax checkpoint every this many steps (and at the end)."),
    "train.keep_checkpoints": _F(3, "Keep the last K checkpoints."),
    "train.sample_every": _F(0, "Write a ref-vs-current sample grid every this many steps (0: only at the end; "
                               "-1: never)."),
    "train.sample_prompts": _F(("a red cube on top of a blue sphere", "three yellow apples"),
                               "Fixed prompts of the sample grid."),
    "train.eval_prompts": _F("", "Prompt file scored during training ('' : no evaluation); e.g. the scene "
                             "world's ddspo_jax/configs/prompts/world_eval.jsonl with eval_scorer=shapes."),
    "train.eval_every": _F(0, "Score the model on train.eval_prompts every this many steps (0: only at the end), "
                           "logged to TensorBoard as eval/* beside the reference's score."),
    "train.eval_scorer": _F("shapes", "A scorer of ddspo_jax.scoring (shapes, clip_score, pickscore, aesthetic)."),
    "train.eval_scorer_path": _F("", "The scorer's local model folder (CLIP-based scorers)."),
    "train.eval_limit": _F(0, "Score only the first N prompts of train.eval_prompts (0: all)."),
    "train.export_at_end": _F(True, "Write a diffusers pipeline of the final model to <output_dir>/export."),
    # --- data (records) --------------------------------------------------------------------
    "data.records": _F("", "Folder of preference records (ArrayRecord shards + manifest.json) made by prepare."),
    "data.variant": _F("paired", "paired | not_paired | rand_positive (paper Sec. 4.4 efficient variants).",
                       choices=("paired", "not_paired", "rand_positive")),
    "data.cond_mode": _F("embeddings", "What records store for c and c-: the text encoders' embeddings, or only "
                         "token ids (4-8x smaller records; the train step then runs the frozen encoders).",
                         choices=("embeddings", "token_ids")),
    "data.extra_records": _F("", "Records of extra prompts for rand_cond (their cond / neg_cond are used)."),
    "data.rand_cond": _F("none", "The authors' rand_cond: with probability p(t) a pair's prompts become an extra "
                         "prompt and its degraded variant (latents stay).",
                         choices=("none", "sigmoid", "exponential", "constant")),
    "data.rand_cond_lambda": _F(20.0, "lambda of the rand_cond p(t) schedule."),
    "data.shuffle_seed": _F(0, "Loader shuffle seed."),
    "data.worker_count": _F(0, "Grain worker processes (0: in-process)."),
    # data preparation (python -m ddspo_jax.prepare): prompts -> c- -> reference samples -> records
    "data.prompts": _F("", "Prompt file for prepare: .txt (one per line), .jsonl, .csv/.tsv or .parquet."),
    "data.prompt_field": _F("", "JSONL key / CSV or Parquet column holding the prompt ('' means 'prompt')."),
    "data.prompt_limit": _F(0, "Use only the first N prompts (0: all)."),
    "data.perturb": _F(("random_removal:1.0",), "c -> c- strategy mix as 'name:weight' (random_removal, "
                       "word_swap, llm_compositional, llm_aesthetic); the paper's App. C mix is random_removal:0.5, "
                       "llm_aesthetic:0.5 and needs data.llm_url or data.llm_path."),
    "data.removal_range": _F((0.4, 0.7), "Fraction of words random_removal drops, and of the group words "
                             "word_swap replaces (uniform in this range)."),
    "data.word_groups": _F("", "JSON file {group: [words]} for the word_swap strategy: 40-70 % of a prompt's words "
                           "found in a group are replaced by another word of the group (e.g. colours, objects)."),
    "data.llm_url": _F("", "OpenAI-compatible endpoint base URL for the llm_* strategies (e.g. http://host:8000/v1)."),
    "data.llm_model": _F("", "Model name sent to data.llm_url."),
    "data.llm_path": _F("", "Local transformers causal-LM folder for the llm_* strategies (instead of llm_url)."),
    "data.llm_cache": _F("", "LLM answer cache folder ('' means <data.records>/llm_cache)."),
    "data.llm_threads": _F(8, "Concurrent LLM requests while perturbing a shard."),
    "data.llm_on_error": _F("raise", "A failing LLM backend stops prepare (raise) or falls back to random removal.",
                            choices=("raise", "fallback")),
    "data.efficient": _F(False, "Efficient mode (paper Sec. 4.4): sample only x0_w; train with not_paired / "
                         "rand_positive."),
    "data.shard_size": _F(1000, "Records per ArrayRecord shard: the unit of resumption and of multi-host work."),
    "data.record_dtype": _F("bfloat16", "Storage dtype of latents and embeddings.",
                            choices=("bfloat16", "float16", "float32")),
    # --- prepare: the reference model's sampler ------------------------------------------------
    "prepare.batch_size": _F(16, "Prompts per sampler call per process (a pair is 2 samples, x2 again for CFG)."),
    "prepare.sampler": _F("", "'' (the family's paper default, Backbone.defaults) | ddim | pndm | euler | flow_euler | flow_dpmpp_2m.",
                          choices=("", "ddim", "pndm", "euler", "flow_euler", "flow_dpmpp_2m")),
    "prepare.steps": _F(0, "Sampler steps (0: family default: SD 25, SDXL 25, SANA 20)."),
    "prepare.guidance": _F(None, "CFG scale (None: family default: SD 7.5, SDXL 5.0, SANA 4.5).", float),
    "prepare.resolution": _F(0, "Image resolution in pixels (0: the model's default, unet sample_size x VAE scale)."),
    # --- multi-process runtime (jax.distributed) -------------------------------------------
    # Left at their defaults, JAX's own detection decides (TPU pods, SLURM under srun, Kubernetes JobSets
    # with JAX_COORDINATOR_ADDRESS ...); set, they override it (e.g. several processes on one machine).
    "runtime.coordinator": _F("", "Coordinator 'host:port' of jax.distributed ('' : detect from the environment)."),
    "runtime.num_processes": _F(0, "Processes of the run (0: detect; 1: single-process, skip detection)."),
    "runtime.process_id": _F(-1, "This process's index in [0, num_processes) (-1: detect)."),
    # --- mesh ------------------------------------------------------------------------------
    "mesh.data": _F(-1, "Data-parallel axis size (-1: all devices not used by fsdp)."),
    "mesh.fsdp": _F(1, "FSDP axis size (params and optimizer state sharded over it)."),
    # --- toy (python -m ddspo_jax.toy) -----------------------------------------------------
    "toy.n_modes": _F(8, "Classes = Gaussian modes on a circle."),
    "toy.radius": _F(4.0, "Radius of the circle of modes."),
    "toy.mode_std": _F(0.35, "Std of each mode."),
    "toy.label_noise": _F(0.3, "Fraction of reference-training samples labelled with a neighbouring class."),
    "toy.ref_samples": _F(20000, "Noisy training set size for the reference."),
    "toy.ref_steps": _F(6000, "Reference training steps."),
    "toy.ref_batch": _F(512, "Reference batch size."),
    "toy.ref_lr": _F(2e-3, "Reference learning rate."),
    "toy.hidden": _F(128, "MLP width."),
    "toy.num_train_timesteps": _F(100, "T of the toy's DDPM schedule (linear betas)."),
    "toy.n_pairs": _F((12, 120, 1200), "Preference pairs (total over classes) per fine-tune."),
    "toy.betas": _F((200.0, 400.0, 800.0), "Objective beta values."),
    "toy.methods": _F(("dpo", "dspo", "ddspo"), "Objectives compared."),
    "toy.seeds": _F(3, "Seeds per cell (mean ± std reported)."),
    "toy.ft_steps": _F(500, "Fine-tuning steps."),
    "toy.ft_batch": _F(256, "Pairs per fine-tuning step (drawn with replacement from the N pairs)."),
    "toy.ft_lr": _F(1e-4, "Fine-tuning learning rate."),
    "toy.eval_samples": _F(2000, "Generated samples per evaluation."),
    "toy.sample_steps": _F(50, "DDIM steps for sampling."),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default; config files start here and change values."""
    cfg = ml_collections.ConfigDict()
    for key, f in SCHEMA.items():
        *sections, name = key.split(".")
        node = cfg
        for s in sections:
            if s not in node:
                node[s] = ml_collections.ConfigDict()
            node = node[s]
        node[name] = config_dict.placeholder(f.type) if f.default is None else f.default
    return cfg


def _flat(cfg, prefix=""):
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from _flat(v, key + ".")
        else:
            yield key, v


# Numeric ranges: key -> (low, high, low inclusive); a value must be finite and in range. A negative lr is
# gradient ascent, steps 0 trains nothing, checkpoint_every 0 divides by zero: stopped before any compute.
_INF = float("inf")
RANGES: dict[str, tuple[float, float, bool]] = {
    "train.lr": (0.0, 1.0, False), "train.lr_per_pair": (0.0, 1.0, False), "train.beta": (0.0, _INF, False),
    "train.dspo_weight": (0.0, _INF, True), "train.steps": (1, _INF, True), "train.warmup_steps": (0, _INF, True),
    "train.batch_size": (1, _INF, True), "train.micro_batch_per_device": (0, _INF, True),
    "train.max_skipped_steps": (1, _INF, True), "train.weight_decay": (0.0, _INF, True),
    "train.adam_b1": (0.0, 1.0, True), "train.adam_b2": (0.0, 1.0, True), "train.adam_eps": (0.0, _INF, False),
    "train.grad_clip": (0.0, _INF, True), "train.log_every": (1, _INF, True),
    "train.checkpoint_every": (1, _INF, True), "train.keep_checkpoints": (1, _INF, True),
    "train.eval_every": (0, _INF, True), "train.eval_limit": (0, _INF, True), "train.sample_every": (-1, _INF, True),
    "data.prompt_limit": (0, _INF, True), "data.shard_size": (1, _INF, True), "data.rand_cond_lambda": (0.0, _INF, True),
    "prepare.batch_size": (1, _INF, True), "prepare.steps": (0, _INF, True), "prepare.guidance": (0.0, _INF, True),
    "prepare.resolution": (0, _INF, True), "model.lora_rank": (0, _INF, True), "model.lora_alpha": (0.0, _INF, True),
    "seed": (0, _INF, True), "toy.n_modes": (1, _INF, True), "toy.seeds": (1, _INF, True),
    "toy.ft_steps": (1, _INF, True), "toy.ref_steps": (1, _INF, True), "toy.eval_samples": (1, _INF, True),
}


def _range_problem(key: str, value) -> str | None:
    lo, hi, lo_in = RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    if v != v or v in (_INF, -_INF):
        return f"config key '{key}' is {value!r}; it must be a finite number"
    if v < lo or (v == lo and not lo_in) or v > hi:
        low = f"{'>=' if lo_in else '>'} {lo:g}"
        return f"config key '{key}' is {value!r}; it must be {low}" + (f" and <= {hi:g}" if hi != _INF else "")
    return None


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Rejects unknown keys, wrong types, values outside the allowed choices or ranges, naming the key."""
    problems = []
    seen = set()
    for key, value in _flat(cfg):
        seen.add(key)
        f = SCHEMA.get(key)
        if f is None:
            close = [k for k in SCHEMA if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown config key '{key}'{hint}")
            continue
        want = f.type or type(f.default)
        if value is None:
            if f.default is not None:
                problems.append(f"config key '{key}' must not be None")
            continue
        ok = isinstance(value, want) or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if want is tuple:
            ok = isinstance(value, (tuple, list))
        if want is int and isinstance(value, bool):
            ok = False
        if not ok:
            problems.append(f"config key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
        elif f.choices and value not in f.choices:
            problems.append(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, f.choices))}")
        elif key in RANGES and _range_problem(key, value):
            problems.append(_range_problem(key, value))
    rr = cfg.get("data", {}).get("removal_range")
    if isinstance(rr, (tuple, list)) and (len(rr) != 2 or not all(isinstance(x, (int, float)) for x in rr)
                                          or not 0 <= rr[0] <= rr[1] <= 1):
        problems.append(f"config key 'data.removal_range' is {tuple(rr)!r}; it must be (low, high) with "
                        "0 <= low <= high <= 1")
    t = cfg.train
    if not problems and t.objective == "sft_pair" and cfg.model.lora_rank <= 0:
        problems.append("train.objective='sft_pair' trains two LoRA adapters: set model.lora_rank (the release: 4)")
    if not problems and t.cpp == "pair" and t.objective not in ("ddspo", "dspo_cpp"):
        problems.append(f"config key 'train.cpp' is 'pair', but train.objective={t.objective!r} takes no CPP "
                        "targets: use ddspo or dspo_cpp, or train.cpp='reference'")
    if not problems and t.cpp == "pair" and not t.cpp_pair:
        problems.append("train.cpp='pair' needs train.cpp_pair: the run folder of a train.objective=sft_pair run")
    if not problems and cfg.data.rand_cond != "none" and cfg.train.objective not in ("ddspo", "dspo_cpp"):
        problems.append(f"config key 'data.rand_cond' is {cfg.data.rand_cond!r}, but it swaps c and c- for the "
                        f"CPP targets, which train.objective={cfg.train.objective!r} does not use: set it to 'none' "
                        "or use ddspo / dspo_cpp")
    toy = cfg.get("toy", {})
    bad_methods = [m for m in toy.get("methods", ()) if m not in OBJECTIVES or m == "sft_pair"]
    if bad_methods:
        problems.append(f"config key 'toy.methods' names {bad_methods}; allowed: "
                        f"{', '.join(o for o in OBJECTIVES if o != 'sft_pair')}")
    missing = sorted(set(SCHEMA) - seen)
    if missing:
        problems.append("missing config keys (start from ddspo_jax.config.base_config()): " + ", ".join(missing))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def learning_rate(cfg) -> float:
    """The peak learning rate: train.lr if set, else train.lr_per_pair x train.batch_size.

    That product is what the authors ran (`--learning_rate 2.5e-9 --scale_lr` at 2048 pairs: 5.12e-6 for
    SD/SDXL; 4e-8 x 2048 = 8.19e-5 for SANA), Diffusion-DPO's convention. The paper's text writes
    lr = beta / 2.048e8 (7.8e-5 at beta 16000); set train.lr to that to follow the text instead."""
    return cfg.train.lr if cfg.train.lr is not None else cfg.train.lr_per_pair * cfg.train.batch_size


def describe() -> str:
    """A table of every key for `--help`-style listings."""
    width = max(map(len, SCHEMA))
    return "\n".join(f"  {k:<{width}}  {f.default!r:<22} {f.doc}" for k, f in SCHEMA.items())


def load_config_flag(flag_value) -> ml_collections.ConfigDict:
    """Validates what `config_flags.DEFINE_config_file` produced, turning schema errors into exit messages."""
    try:
        return validate(flag_value)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def check_override_keys(argv: list[str], flag: str = "config") -> None:
    """Rejects `--config.<key>=v` overrides of unknown keys before flag parsing.

    config_flags would otherwise fail deep inside absl's parser with a traceback."""
    bad = []
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}."):
            key = arg[len(flag) + 3:].split("=", 1)[0]
            if key not in SCHEMA:
                close = [k for k in SCHEMA if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
                bad.append(f"unknown config key '{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if bad:
        _user_exit("; ".join(bad) + "\nThe keys: python -c 'import ddspo_jax.config as c; print(c.describe())'")


def _user_exit(message: str):
    """A mistake found before the command's body runs (its flags are checked at import): the same handler."""

    with user_exits():
        raise ConfigError(message)


def check_config_file(argv: list[str], flag: str = "config") -> None:
    """Loads `--config FILE[:variant]` once before absl does, so that a missing file, a syntax error, a file
    without get_config(), an unknown variant or a config missing keys ends in one line naming the file (absl's
    loader raises these with a traceback while it parses flags)."""
    import importlib.util
    import traceback

    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    if not value:
        return
    path, _, variant = value.partition(":")
    import os

    if not os.path.isfile(path):
        _user_exit(f"config file {path} not found")
    try:
        spec = importlib.util.spec_from_file_location("_ddspo_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        _user_exit(f"config file {path}: syntax error at line {e.lineno}: {e.msg}")
    except Exception as e:  # noqa: BLE001  (the user's file: any failure is theirs, named in one line)
        _user_exit(f"config file {path} fails to load: {type(e).__name__}: {e}")
    if not callable(getattr(module, "get_config", None)):
        _user_exit(f"config file {path} has no get_config() function (start from configs/tiny.py)")
    try:
        cfg = module.get_config(*([variant] if variant else []))
    except ConfigError as e:
        _user_exit(f"config file {path}: {e}")
    except Exception as e:  # noqa: BLE001
        if os.environ.get("DDSPO_DEBUG"):
            traceback.print_exc()
        _user_exit(f"config file {path}: get_config({variant!r}) failed: {type(e).__name__}: {e}" if variant else
                   f"config file {path}: get_config() failed: {type(e).__name__}: {e}")
    if not isinstance(cfg, ml_collections.ConfigDict):
        _user_exit(f"config file {path}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    missing = sorted(set(SCHEMA) - {k for k, _ in _flat(cfg)})
    if missing:
        _user_exit(f"config file {path} lacks {len(missing)} keys ({', '.join(missing[:4])}"
                   f"{', ...' if len(missing) > 4 else ''}): start from ddspo_jax.config.base_config()")


def define_config_flag(default: str, help: str = "Config file whose get_config() returns the run's ConfigDict."):
    """`--config` for a command, with `--config.<key>=v` overrides checked against the schema first.

    config_flags scans sys.argv for overrides when the flag is defined, and fails there with a traceback
    on an unknown key; checking first turns that into one clear line."""
    import sys

    from absl import flags
    from ml_collections import config_flags

    if "config" in flags.FLAGS:  # another command's module was imported first (as a library): share its flag
        return _SharedConfigFlag()
    check_override_keys(sys.argv)
    check_config_file(sys.argv)
    return config_flags.DEFINE_config_file("config", default, help, lock_config=True)


class _SharedConfigFlag:
    @property
    def value(self):
        from absl import flags

        return flags.FLAGS.config
