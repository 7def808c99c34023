"""Points at the shipped config ddspo_jax/configs/tiny.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/tiny.py
"""

from ddspo_jax.configs.tiny import get_config  # noqa: F401
