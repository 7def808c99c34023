"""The shipped configs (plain Python, `get_config()`), installed with the package so every command finds its
default config and prompt files from a wheel too. `configs/` at the top of the repository points here."""

from pathlib import Path
from ddspo_jax.errors import ConfigError

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
    c.train.micro_batch_per_device = 8  # the release's per-GPU batch (--train_batch_size 8); CPU stand-in of
                                        # benchmarks/memory.py: SD-1.5 24.4 GiB on one device, SDXL 26.6 at
                                        # fsdp 8 (README); --gpu measures the chip itself
    c.train.lr_per_pair = 2.5e-9        # --learning_rate 2.5e-9 --scale_lr -> 5.12e-6
    c.train.steps = steps               # --max_train_steps (the paper's text: 100)
    c.train.warmup_steps = 100          # --lr_warmup_steps 100, constant_with_warmup
    c.train.optimizer = "adamw"         # AdamW(0.9, 0.999, eps 1e-8, wd 1e-2), clip_grad_norm 1.0 (args.py)
    c.train.checkpoint_every = 50       # --checkpointing_steps 50
    return c


def release_ddcpp(c, *, name: str, stage: str | None):
    """DD-CPP as the release runs it (scripts/train_ddspo_lora_target.sh, ddspo/train_lora_target.py), on top of
    a family's release config: stage "pair" trains the winning / losing adapters, stage "ddspo" (default) runs
    DDSPO with them as the CPP targets."""

    stage = stage or "ddspo"
    if stage not in ("pair", "ddspo"):
        raise ConfigError(f"{name}_ddcpp.py takes the stage 'pair' or 'ddspo' (':pair' after the file), got {stage!r}")
    pair_dir = f"runs/{name}_ddcpp_pair"
    c.data.records = f"runs/{name}_ddcpp/records"  # python -m ddspo_jax.prepare import-preferences <Pick-a-Pic>
    if stage == "pair":
        c.output_dir = pair_dir
        c.train.objective = "sft_pair"   # pos/neg LoRA UNets, plain MSE, one t per pair, independent noise
        c.model.lora_rank = 4            # --lora_rank 4
        c.model.lora_alpha = 4.0         # --lora_alpha 4.0 (targets to_q/to_k/to_v/to_out.0: lora.TARGETS)
        c.train.lr = 1e-4                # --lora_lr 1e-4 (not scaled by the batch)
        c.train.steps = 300              # --max_train_steps 300
        c.train.warmup_steps = 0         # constant_with_warmup, --lr_warmup_steps 0 (its default)
        c.train.optimizer = "adamw"      # torch.optim.AdamW(lr) defaults: wd 1e-2; clip_grad_norm 1.0
        c.train.export_at_end = True     # two diffusers LoRA files: winning/ and losing/
        c.train.sample_every = -1
    else:
        c.output_dir = f"runs/{name}_ddcpp"
        c.train.cpp, c.train.cpp_pair = "pair", pair_dir  # --cpp --lora_path
        c.train.beta = 8000.0            # --beta_dpo 8000
        c.train.steps = 100              # --max_train_steps 100 (lr 2.5e-9 x 2048, warmup 100 as TF-CPP)
    return c
