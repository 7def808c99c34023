"""DD-CPP on sd15 with the release's settings (KU-MIIL/DDSPO scripts/train_ddspo_lora_target.sh): a winning and
a losing LoRA adapter trained on a human preference dataset, then DDSPO with their predictions as the targets.

  python -m ddspo_jax.prepare import-preferences /data/pickapic_v2 --config configs/sd15_ddcpp.py
  python -m ddspo_jax.train --config configs/sd15_ddcpp.py:pair      # -> runs/sd15_ddcpp_pair
  python -m ddspo_jax.train --config configs/sd15_ddcpp.py           # DDSPO, beta 8000, targets from the pair

Stage "pair": rank 4, alpha 4 on to_q/to_k/to_v/to_out.0, AdamW lr 1e-4, 300 steps, effective batch 2048,
plain denoising MSE of each adapter on its own images (one t per pair, independent noise), conditioned on the
caption. Stage "ddspo": the sd15 release config with beta 8000 and 100 steps, train.cpp = "pair".
"""

from ddspo_jax.configs import release_ddcpp
from ddspo_jax.configs.sd15 import get_config as family_config


def get_config(stage=None):
    return release_ddcpp(family_config(), name="sd15", stage=stage)
