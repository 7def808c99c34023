"""The paper's 2D toy experiment (Sec. 4.1, Fig. A): python -m ddspo_jax.toy [--quick]."""

from ddspo_jax.config import base_config


def get_config():
    c = base_config()
    c.output_dir = "runs/toy"
    c.toy.n_modes = 6  # N in {12, 120, 1200} pairs = {2, 20, 200} per class, as in Fig. 1 (N=2 per class)
    return c
