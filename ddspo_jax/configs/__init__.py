"""The shipped configs (plain Python, `get_config()`), installed with the package so every command finds its
default config and prompt files from a wheel too. `configs/` at the top of the repository points here."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The file of a shipped config by name ("tiny", "sdxl", ...)."""
    return FOLDER / f"{name}.py"


def release_sd(c, *, name: str, steps: int):
    """What KU-MIIL/DDSPO's scripts/train_ddspo.sh runs for SD-1.x and SDXL (README's hyperparameter table),
    on top of base_config(); each config adds its family's differences."""
    c.output_dir, c.data.records = f"runs/{name}", f"runs/{name}/records"
    c.model.dtype = "bfloat16"          # compute and the frozen reference; master weights stay float32
    c.model.remat_policy = "block"      # the smallest policy by benchmarks/memory.py (README's memory table)
    c.train.objective = "ddspo"
    c.train.beta = 16000.0              # --beta_dpo 16000
    c.train.batch_size = 2048           # 8 pairs per GPU x accumulation x GPUs in the release
    c.train.micro_batch_per_device = 8  # the release's per-GPU batch (--train_batch_size 8); not yet measured
                                        # on a GPU here: benchmarks/memory.py --gpu says what fits
    c.train.lr_per_pair = 2.5e-9        # --learning_rate 2.5e-9 --scale_lr -> 5.12e-6
    c.train.steps = steps               # --max_train_steps (the paper's text: 100)
    c.train.warmup_steps = 100          # --lr_warmup_steps 100, constant_with_warmup
    c.train.optimizer = "adamw"         # AdamW(0.9, 0.999, eps 1e-8, wd 1e-2), clip_grad_norm 1.0 (args.py)
    c.train.checkpoint_every = 50       # --checkpointing_steps 50
    return c
