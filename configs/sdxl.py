"""Points at the shipped config ddspo_jax/configs/sdxl.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sdxl.py
"""

from ddspo_jax.configs.sdxl import get_config  # noqa: F401
