"""DDSPO on SDXL base 1.0 with the authors' settings (KU-MIIL/DDSPO scripts/train_ddspo.sh, ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sdxl.py --config.model.path=/models/sdxl --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sdxl.py --config.model.path=/models/sdxl

Where the paper's text and the release differ, the release wins (README "Hyperparameters"): lr 2.5e-9 x 2048
= 5.12e-6, 500 steps (the text: 100), AdamW (the text, after Diffusion-DPO: Adafactor; the release's SDXL
script does not pass --use_adafactor). `--config.train.optimizer=adafactor` gives transformers' Adafactor.
On 16 GB TPU v5e chips start from --config.train.micro_batch_per_device=1 over >= 8 chips and check with
benchmarks/memory.py on the chip (README's memory table).
"""

from ddspo_jax.config import base_config


def get_config():
    c = base_config()
    c.output_dir = "runs/sdxl"
    c.model.family = "sdxl"
    c.model.path = "models/stable-diffusion-xl-base-1.0"
    c.model.dtype = "bfloat16"          # compute and the frozen reference; master weights stay float32
    c.model.remat_policy = "block"      # the smallest policy by benchmarks/memory.py (README's memory table)
    c.schedule.loss_weighting = "linear"  # --loss_weighting linear (SDXL only in the release)
    c.train.objective = "ddspo"
    c.train.beta = 16000.0              # --beta_dpo 16000
    c.train.batch_size = 2048           # 8 pairs x 64 accumulation steps x 4 GPUs in the release
    c.train.micro_batch_per_device = 8  # the release's per-GPU batch (--train_batch_size 8); not yet measured
                                        # on a GPU here: benchmarks/memory.py --gpu says what fits
    c.train.lr_per_pair = 2.5e-9        # --learning_rate 2.5e-9 --scale_lr -> 5.12e-6
    c.train.steps = 500                 # --max_train_steps 500 (the paper's text: 100)
    c.train.warmup_steps = 100          # --lr_warmup_steps 100, constant_with_warmup
    c.train.optimizer = "adamw"         # AdamW(0.9, 0.999, eps 1e-8, wd 1e-2), clip_grad_norm 1.0 (args.py)
    c.train.checkpoint_every = 50       # --checkpointing_steps 50
    c.mesh.data, c.mesh.fsdp = 1, -1    # params, reference, optimizer state and gradients sharded over all chips
    c.data.records = "runs/sdxl/records"
    return c
