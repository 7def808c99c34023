"""DDSPO on Stable Diffusion 1.4 (the paper's Tab. 1 model): configs/sd15.py with another base model.

  python -m ddspo_jax.prepare --config configs/sd14.py --config.model.path=/models/sd14 --config.data.prompts=prompts.txt
  python -m ddspo_jax.train --config configs/sd14.py --config.model.path=/models/sd14

config.model.path is a local diffusers pipeline folder (e.g. a download of CompVis/stable-diffusion-v1-4).
"""

from pathlib import Path
from runpy import run_path

_sd15 = run_path(str(Path(__file__).with_name("sd15.py")))["get_config"]


def get_config():
    c = _sd15()
    c.output_dir = "runs/sd14"
    c.model.path = "models/stable-diffusion-v1-4"
    c.data.records = "runs/sd14/records"
    return c
