"""Points at the shipped config ddspo_jax/configs/toy.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/toy.py
"""

from ddspo_jax.configs.toy import get_config  # noqa: F401
