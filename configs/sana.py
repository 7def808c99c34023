"""Points at the shipped config ddspo_jax/configs/sana.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sana.py
"""

from ddspo_jax.configs.sana import get_config  # noqa: F401
