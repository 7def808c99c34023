"""DDSPO on SDXL base 1.0 with the authors' settings (KU-MIIL/DDSPO scripts/train_ddspo.sh, ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sdxl.py --config.model.path=/models/sdxl --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sdxl.py --config.model.path=/models/sdxl

Where the paper's text and the release differ, the release wins (README "Hyperparameters"): lr 2.5e-9 x 2048
= 5.12e-6, 500 steps (the text: 100), AdamW (the text, after Diffusion-DPO: Adafactor; the release's SDXL
script does not pass --use_adafactor). `--config.train.optimizer=adafactor` gives transformers' Adafactor.
Each level's 10 (2) identical transformer blocks run as one lax.scan (model.scan_blocks; measured with the
compilers, docs/performance.md): XLA:GPU compiles the step for 8 H100s in 5.4 min instead of 24 and its peak
at the release's 8 pairs per GPU, fsdp 8, is 20.5 GiB instead of 24.6; the TPU compiler fits one pair per
v5e chip in 9.7 of 16 GiB, a compile this 2-core VM could not finish unrolled. On TPU slices
`launch/gke_tpu.sh --tpu-type` sets the micro-batch that fits each chip (launch/tpu_settings.tsv).
"""

from ddspo_jax.config import base_config
from ddspo_jax.configs import release_sd


def get_config():
    c = release_sd(base_config(), name="sdxl", steps=500)  # 8 pairs x 64 accumulation x 4 GPUs
    c.model.family = "sdxl"
    c.model.path = "models/stable-diffusion-xl-base-1.0"
    c.schedule.loss_weighting = "linear"  # --loss_weighting linear (SDXL only in the release)
    c.mesh.data, c.mesh.fsdp = 1, -1    # params, reference, optimizer state and gradients sharded over all chips
    c.model.scan_blocks = True          # one block body per transformer stack: compile time and memory fall
    return c
