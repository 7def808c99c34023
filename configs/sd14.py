"""Points at the shipped config ddspo_jax/configs/sd14.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sd14.py
"""

from ddspo_jax.configs.sd14 import get_config  # noqa: F401
