"""The embedded default: the whole road on a CPU in a few minutes, nothing downloaded.

  python -m ddspo_jax.train --config configs/tiny.py

A tiny SD-architecture model (UNet, CLIP text encoder, tokenizer, VAE) is built deterministically on first use
(model.path = "tiny", cached under ~/.cache/ddspo_jax); preference records are prepared from the shipped
prompt file when missing; then DDSPO trains, checkpoints, exports to diffusers and writes a sample grid.
"""

from pathlib import Path

from ddspo_jax.config import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts" / "tiny_prompts.txt"


def get_config():
    c = base_config()
    c.output_dir = "runs/tiny"
    c.model.family = "sd"
    c.model.path = "tiny"
    c.model.dtype = "float32"           # bf16 is slow on CPUs
    c.data.prompts = str(PROMPTS)
    c.data.prompt_limit = 96
    c.data.records = "runs/tiny/records"
    c.data.shard_size = 32
    c.prepare.batch_size = 16
    c.prepare.steps = 10
    c.train.objective = "ddspo"
    c.train.beta = 16000.0
    c.train.lr = 16000.0 / 2.048e8      # the paper's text's rule (the release's 2.5e-9 x 16 pairs barely moves)
    c.train.batch_size = 16
    c.train.micro_batch_per_device = 8
    c.train.steps = 30
    c.train.warmup_steps = 5
    c.train.checkpoint_every = 10
    c.train.sample_every = 15
    c.train.sample_prompts = ("a red cube on top of a blue sphere", "three yellow apples on a wooden table",
                              "a photo of a cat to the left of a dog", "two green cars on a snowy street")
    return c
