"""python -m ddspo_jax.tiny [FOLDER] [--family F] [--write-prompts]: build (or find) the embedded tiny model
of a family (`--help` lists them) and print its folder; the commands reach it by
`model.path=tiny[-<family>][:FOLDER]`.

The tiny model is a complete diffusers pipeline folder with random weights, built offline and deterministically
(ddspo_jax/backbones/tiny.py), so the whole road runs on a CPU in minutes with nothing downloaded.
"""

from __future__ import annotations

import argparse
import sys

from ddspo_jax.backbones import ensure_tiny_model, FAMILY_NAMES
from ddspo_jax.backbones.tiny import compose_prompts, TINY_PROMPTS
from ddspo_jax.errors import run_command
from ddspo_jax.files import write_text_atomic


def write_prompts() -> None:
    write_text_atomic(TINY_PROMPTS, "\n".join(compose_prompts()) + "\n")
    print(f"wrote {TINY_PROMPTS}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddspo_jax.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", default=None,
                    help="where to build it (default: $DDSPO_JAX_CACHE or ~/.cache/ddspo_jax/tiny-<family>-v<N>)")
    ap.add_argument("--family", default="sd", choices=FAMILY_NAMES, help="architecture (default: sd)")
    ap.add_argument("--write-prompts", action="store_true", help=f"(re)write {TINY_PROMPTS} from compose_prompts()")
    a = ap.parse_args(argv)
    if a.write_prompts:
        return run_command(write_prompts)
    return run_command(lambda: print(ensure_tiny_model(a.folder, family=a.family, verbose=True)))


if __name__ == "__main__":
    sys.exit(main())
