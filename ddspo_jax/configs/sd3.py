"""DDSPO on SD3 (1024px) with LoRA, with the authors' settings (KU-MIIL/DDSPO `scripts/train_ddspo_sd3.sh`,
`ddspo/adapters/sd3.py`, `ddspo/args.py`).

  python -m ddspo_jax.prepare --config configs/sd3.py --config.model.path=/models/stable-diffusion-3-medium-diffusers
  python -m ddspo_jax.train --config configs/sd3.py --config.model.path=/models/stable-diffusion-3-medium-diffusers
  python -m ddspo_jax.train --config configs/sd3.py:tiny    # the whole road on a CPU: tiny-sd3, CPU-sized

The release's SD3 run, and where this config follows it:
  * LoRA rank = alpha = 128 on the joint attention of both streams (to_q, to_k, to_v, to_out.0, add_q_proj,
    add_k_proj, add_v_proj, to_add_out), PEFT's gaussian A init; the reference is the transformer with the
    LoRA off (here: the frozen base weights the factors are added to; no second copy);
  * timesteps: logit-normal u (mean 0, std 1), sigma from the scheduler's shifted table (shift 3.0):
    timestep_sampling logit_normal + train_flow_shift 3 (the release indexes a 1000-entry table; here sigma
    is continuous); noise shared by the pair; no loss weighting;
  * --precondition_outputs 1: the loss compares x_0 = x_t - sigma v (schedule.precondition_outputs);
  * beta: the script's --beta_dpo 1000 (issue 32 and the script's header comment say 2000 / "beta 1000";
    the command line is what ran: 1000);
  * lr: --learning_rate 4e-8 --scale_lr -> 4e-8 x 2048 pairs = 8.19e-5 (the script's header: effective batch
    2048; its defaults, 4 x 256 accumulation on one GPU, would give 1024); constant, no warmup, AdamW, 100 steps;
  * text: T5 on 77 tokens (--max_sequence_length 77 for SD3), embeddings stored in the records.
Generation (records and grids): the pipeline's FlowMatchEuler, 25 steps, CFG 7.5 (ddspo/prepare_latents.py and
scripts/prepare_latents.sh), 1024^2 (the family's defaults, backbones/sd3.py).
"""

from ddspo_jax.config import base_config
from ddspo_jax.configs import FOLDER
from ddspo_jax.errors import ConfigError

MODELS = {"medium": "models/stable-diffusion-3-medium-diffusers", "tiny": "tiny-sd3"}


def get_config(size=None):
    size = (size or "medium").lower()
    if size not in MODELS:
        raise ConfigError(f"sd3.py takes ':medium' or ':tiny' after the file, got {size!r}")
    c = base_config()
    c.output_dir, c.data.records = f"runs/sd3_{size}", f"runs/sd3_{size}/records"
    c.model.family = "sd3"
    c.model.path = MODELS[size]
    c.model.dtype = "bfloat16"          # the release trains in fp16 mixed precision; LoRA factors stay float32
    c.model.remat_policy = "block"
    c.schedule.kind = "flow"            # (the pipeline's scheduler_config.json says so too)
    c.schedule.timestep_sampling = "logit_normal"
    c.schedule.train_flow_shift = 3.0   # the scheduler's shift applied to the training sigmas, as the release
    c.schedule.precondition_outputs = True
    c.model.lora_rank = 128
    c.model.lora_alpha = 128.0
    c.train.objective = "ddspo"
    c.train.beta = 1000.0               # --beta_dpo 1000
    c.train.batch_size = 2048
    c.train.micro_batch_per_device = 4  # --train_batch_size 4 per GPU
    c.train.lr_per_pair = 4e-8          # --learning_rate 4e-8 --scale_lr -> 8.19e-5
    c.train.steps = 100
    c.train.warmup_steps = 0
    c.train.optimizer = "adamw"
    c.train.checkpoint_every = 50
    if size == "tiny":  # the embedded tiny SD3 pipeline (64x64, random weights): the same road, CPU-sized
        c.model.dtype = "float32"
        c.data.prompts, c.data.prompt_limit = str(FOLDER / "prompts" / "tiny_prompts.txt"), 32
        c.data.shard_size, c.prepare.batch_size, c.prepare.steps = 16, 16, 10
        c.model.lora_rank, c.model.lora_alpha = 4, 4.0
        c.train.batch_size, c.train.micro_batch_per_device, c.train.steps = 8, 4, 6
        c.train.lr = 1e-3                # the per-pair rule at 8 pairs would not move a random tiny model
        c.train.checkpoint_every, c.train.sample_every = 3, 6
        c.train.sample_prompts = ("a red cube on top of a blue sphere", "two green cars on a snowy street")
    return c
