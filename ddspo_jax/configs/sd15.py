"""DDSPO on Stable Diffusion 1.5 with the authors' settings (KU-MIIL/DDSPO scripts/train_ddspo.sh, ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sd15.py --config.model.path=/models/sd15 --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sd15.py --config.model.path=/models/sd15

config.model.path is a local diffusers pipeline folder (e.g. a download of stable-diffusion-v1-5).
Where the paper's text and the release differ, the release wins (README "Hyperparameters"): lr 2.5e-9 x 2048
pairs = 5.12e-6 (the text: beta / 2.048e8 = 7.8e-5), 200 steps (the text: 100).
Diffusion-DPO baseline: --config.train.objective=dpo --config.train.beta=8000.
"""

from ddspo_jax.config import base_config


def get_config():
    c = base_config()
    c.output_dir = "runs/sd15"
    c.model.family = "sd"
    c.model.path = "models/stable-diffusion-v1-5"
    c.model.dtype = "bfloat16"          # compute and the frozen reference; master weights stay float32
    c.model.remat_policy = "block"      # the smallest policy by benchmarks/memory.py (README's memory table)
    c.train.objective = "ddspo"
    c.train.beta = 16000.0              # --beta_dpo 16000
    c.train.batch_size = 2048           # 8 pairs x 16 accumulation steps x 16 GPUs in the release
    c.train.micro_batch_per_device = 8  # the release's per-GPU batch (--train_batch_size 8); not yet measured
                                        # on a GPU here: benchmarks/memory.py --gpu says what fits
    c.train.lr_per_pair = 2.5e-9        # --learning_rate 2.5e-9 --scale_lr -> 5.12e-6
    c.train.steps = 200                 # --max_train_steps 200 (the paper's text: 100)
    c.train.warmup_steps = 100          # --lr_warmup_steps 100, constant_with_warmup
    c.train.optimizer = "adamw"         # AdamW(0.9, 0.999, eps 1e-8, wd 1e-2), clip_grad_norm 1.0 (args.py)
    c.train.checkpoint_every = 50       # --checkpointing_steps 50
    c.data.records = "runs/sd15/records"
    return c
