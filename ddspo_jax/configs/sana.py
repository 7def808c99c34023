"""DDSPO on SANA (1024px) with LoRA, with the authors' settings (KU-MIIL/DDSPO's SANA script and ddspo/args.py).

  python -m ddspo_jax.prepare --config configs/sana.py --config.model.path=/models/Sana_600M_1024px_diffusers
  python -m ddspo_jax.train --config configs/sana.py --config.model.path=/models/Sana_600M_1024px_diffusers
  python -m ddspo_jax.train --config configs/sana.py:1600m          # Sana_1600M_1024px instead of 600M
  python -m ddspo_jax.train --config configs/sana.py:tiny    # the whole road on a CPU: tiny-sana, CPU-sized

Paper (App., Tab. 2 / Fig. H) and release agree on beta 2000, no warmup and fp32 LoRA; they differ on
  * LoRA rank: the paper's text says 512, the release runs rank 128 on to_q/to_k/to_v of both attentions
    (alpha = rank, PEFT's gaussian A init) -> rank 128 here; `--config.model.lora_rank=512` gives the text's;
  * lr: the release's --learning_rate 4e-8 --scale_lr -> 4e-8 x 2048 pairs = 8.19e-5 (Diffusion-DPO's
    convention; the text's beta / 2.048e8 would be 9.8e-6);
  * steps: the paper's 100; the release's script runs 500 (`--config.train.steps=500`).
Generation (records and grids): DPM-Solver++ 2M with flow sigmas, 20 steps, CFG 4.5, 1024^2 (the family's
defaults, from backbones/sana.py). Training timesteps: uniform sigma (train_flow_shift 1, as the release).
"""

from ddspo_jax.config import base_config
from ddspo_jax.configs import FOLDER
from ddspo_jax.errors import ConfigError

MODELS = {"600m": "models/Sana_600M_1024px_diffusers", "1600m": "models/Sana_1600M_1024px_diffusers",
          "tiny": "tiny-sana"}


def get_config(size=None):

    size = (size or "600m").lower()
    if size not in MODELS:
        raise ConfigError(f"sana.py takes ':600m', ':1600m' or ':tiny' after the file, got {size!r}")
    c = base_config()
    c.output_dir, c.data.records = f"runs/sana_{size}", f"runs/sana_{size}/records"
    c.model.family = "sana"
    c.model.path = MODELS[size]
    c.model.dtype = "float32"           # the paper fine-tunes SANA in fp32
    c.model.remat_policy = "block"
    c.schedule.kind = "flow"            # (the pipeline's scheduler_config.json says so too)
    c.model.lora_rank = 128             # the release (the paper's text: 512)
    c.model.lora_alpha = 128.0          # alpha = rank
    c.train.objective = "ddspo"
    c.train.beta = 2000.0               # --beta_dpo 2000
    c.train.batch_size = 2048
    c.train.micro_batch_per_device = 4  # 1024 tokens per image at f32c32 + patch 1; not measured on a GPU yet
    c.train.lr_per_pair = 4e-8          # --learning_rate 4e-8 --scale_lr -> 8.19e-5
    c.train.steps = 100                 # the paper (the release's script: 500)
    c.train.warmup_steps = 0            # no warmup
    c.train.optimizer = "adamw"
    c.train.checkpoint_every = 50
    if size == "tiny":  # the embedded tiny SANA pipeline (64x64, random weights): the same road, CPU-sized

        c.data.prompts, c.data.prompt_limit = str(FOLDER / "prompts" / "tiny_prompts.txt"), 32
        c.data.shard_size, c.prepare.batch_size, c.prepare.steps = 16, 16, 10
        c.model.lora_rank, c.model.lora_alpha = 4, 4.0
        c.train.batch_size, c.train.micro_batch_per_device, c.train.steps = 8, 4, 6
        c.train.lr = 1e-3                # the per-pair rule at 8 pairs would not move a random tiny model
        c.train.checkpoint_every, c.train.sample_every = 3, 6
        c.train.sample_prompts = ("a red cube on top of a blue sphere", "two green cars on a snowy street")
    return c
