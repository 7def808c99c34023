"""Points at the shipped config ddspo_jax/configs/sdxl_ddcpp.py (installed with the package); copy that file to change it.

  python -m ddspo_jax.train --config configs/sdxl_ddcpp.py:pair
"""

from ddspo_jax.configs.sdxl_ddcpp import get_config  # noqa: F401
