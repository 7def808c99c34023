"""Points at the shipped config ddspo_jax/configs/sd15_ddcpp.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sd15_ddcpp.py:pair
"""

from ddspo_jax.configs.sd15_ddcpp import get_config  # noqa: F401
