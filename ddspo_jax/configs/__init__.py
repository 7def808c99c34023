"""The shipped configs (plain Python, `get_config()`), installed with the package so every command finds its
default config and prompt files from a wheel too. `configs/` at the top of the repository points here."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The file of a shipped config by name ("tiny", "sdxl", ...)."""
    return FOLDER / f"{name}.py"
