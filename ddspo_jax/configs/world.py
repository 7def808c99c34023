"""The embedded default: DDSPO on the scene world's pre-trained model, measured on a CPU in minutes.

  python -m ddspo_jax.train --config configs/world.py

The world model (ddspo_jax/world/model: a small SD-architecture pipeline the project trained itself on
rendered scenes, `python -m ddspo_jax.world pretrain`) is the reference. Preference pairs are prepared from
the world's training captions with the paper's default degradation (random removal of 40-70 % of the words);
DDSPO fine-tunes it; at the end both the reference and the fine-tuned model are scored on the held-out
GenEval-style prompts (world_eval.jsonl) by the pixel judge, and the per-tag table is printed.
"""

from pathlib import Path

from ddspo_jax.config import base_config

PROMPTS = Path(__file__).resolve().parent / "prompts"
WORLD_MODEL = Path(__file__).resolve().parent.parent / "world" / "model"


def get_config():
    c = base_config()
    c.output_dir = "runs/world"
    c.model.path = str(WORLD_MODEL)
    c.model.dtype = "float32"           # bf16 is slow on CPUs
    c.data.prompts = str(PROMPTS / "world_train.jsonl")
    # Fresh pairs, as the paper trains (100 steps x 2048 pairs from 200K prompts: each pair seen once): 40 steps
    # x 32 pairs = 1280 distinct training captions, none seen twice.
    c.data.prompt_limit = 1280
    c.data.records = "runs/world/records"
    c.data.shard_size = 64
    c.prepare.batch_size = 32
    # sampler, steps and CFG scale: the world model's own (its ddspo_generation.json: DDIM 20 steps, CFG 5.0)
    c.train.objective = "ddspo"
    # lr and beta: DDSPO's best on the dev split (world_dev.jsonl) of the study's sweep, lr {1e-6, 5e-6, 2e-5,
    # 1e-4} at beta 16000, then beta {8000, 32000} at the best lr (benchmarks/world_study.py, docs/world/study.md)
    c.train.beta = 8000.0
    c.train.lr = 2e-5
    c.train.batch_size = 32
    c.train.micro_batch_per_device = 16
    c.train.steps = 40
    c.train.warmup_steps = 5
    c.train.checkpoint_every = 20
    c.train.sample_every = 40
    c.train.sample_prompts = ("a photo of a red circle", "a photo of three squares",
                              "a photo of a blue triangle left of a yellow ring", "a photo of a green ring and a square")
    c.train.eval_prompts = str(PROMPTS / "world_eval.jsonl")
    c.train.eval_scorer = "shapes"
    return c
