"""Points at the shipped config ddspo_jax/configs/sd3.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sd3.py
"""

from ddspo_jax.configs.sd3 import get_config  # noqa: F401
