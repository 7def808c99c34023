"""DDSPO on SDXL base 1.0 with the authors' settings (KU-MIIL/DDSPO scripts/train_ddspo.sh, ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sdxl.py --config.model.path=/models/sdxl --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sdxl.py --config.model.path=/models/sdxl

Where the paper's text and the release differ, the release wins (README "Hyperparameters"): lr 2.5e-9 x 2048
= 5.12e-6, 500 steps (the text: 100), AdamW (the text, after Diffusion-DPO: Adafactor; the release's SDXL
script does not pass --use_adafactor). `--config.train.optimizer=adafactor` gives transformers' Adafactor.
8 pairs per device at fsdp 8 need 26.6 GiB (benchmarks/memory.py's CPU stand-in): fine on 80 GB GPUs. On 16 GB
TPU v5e chips use --config.train.micro_batch_per_device=1 over >= 8 chips (8.2 GiB) and check with
benchmarks/memory.py on the chip (README's memory table).
"""

from ddspo_jax.config import base_config
from ddspo_jax.configs import release_sd


def get_config():
    c = release_sd(base_config(), name="sdxl", steps=500)  # 8 pairs x 64 accumulation x 4 GPUs
    c.model.family = "sdxl"
    c.model.path = "models/stable-diffusion-xl-base-1.0"
    c.schedule.loss_weighting = "linear"  # --loss_weighting linear (SDXL only in the release)
    c.mesh.data, c.mesh.fsdp = 1, -1    # params, reference, optimizer state and gradients sharded over all chips
    return c
