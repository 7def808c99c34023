"""Points at the shipped config ddspo_jax/configs/world.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/world.py
"""

from ddspo_jax.configs.world import get_config  # noqa: F401
