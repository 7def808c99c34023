"""DDSPO on Stable Diffusion 1.5 with the authors' settings (KU-MIIL/DDSPO scripts/train_ddspo.sh, ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sd15.py --config.model.path=/models/sd15 --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sd15.py --config.model.path=/models/sd15

config.model.path is a local diffusers pipeline folder (e.g. a download of stable-diffusion-v1-5).
Where the paper's text and the release differ, the release wins (README "Hyperparameters"): lr 2.5e-9 x 2048
pairs = 5.12e-6 (the text: beta / 2.048e8 = 7.8e-5), 200 steps (the text: 100).
Diffusion-DPO baseline: --config.train.objective=dpo --config.train.beta=8000.
"""

from ddspo_jax.config import base_config
from ddspo_jax.configs import release_sd


def get_config():
    c = release_sd(base_config(), name="sd15", steps=200)  # 8 pairs x 16 accumulation x 16 GPUs
    c.model.family = "sd"
    c.model.path = "models/stable-diffusion-v1-5"
    return c
