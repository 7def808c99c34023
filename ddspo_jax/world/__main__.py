"""python -m ddspo_jax.world prompts | pretrain: the scene world's prompt files and its pre-trained model.

prompts [--out DIR] [--train N] [--dev M] [--seed S]:
world_eval.jsonl  every GenEval-template prompt of the scene world (the held-out evaluation set)
world_train.jsonl N training captions for `prepare` (none of them an evaluation prompt)
world_dev.jsonl   M captions of the same five forms, balanced, in neither file: where choices are made
world_word_groups.json  the world's vocabulary in groups, for data.perturb=word_swap (data.word_groups)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddspo_jax.errors import user_exits
from ddspo_jax.files import write_text_atomic
from ddspo_jax.world import pretrain, prompts

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

PROMPT_DIR = Path(__file__).resolve().parent.parent / "configs" / "prompts"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddspo_jax.world", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write world_eval.jsonl, world_train.jsonl, world_dev.jsonl and world_word_groups.json")
    p.add_argument("--out", default=str(PROMPT_DIR), help="folder (default: the shipped prompt folder)")
    p.add_argument("--train", type=int, default=2000, help="number of training captions")
    p.add_argument("--dev", type=int, default=200, help="number of dev captions (the five forms balanced)")
    p.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("pretrain", help="train the world's text-to-image model (VAE, then UNet) and write it")
    pretrain.add_arguments(q)
    args = ap.parse_args(argv)
    if args.cmd == "pretrain":
        from ddspo_jax import parallel


        parallel.cpu_host_setup()  # before JAX starts its backends, as the other commands
        with user_exits():
            pretrain.pretrain(pretrain.from_args(args))
        return 0

    out = Path(args.out)
    if args.train < 1 or args.dev < 0:
        ap.error(f"--train must be >= 1 and --dev >= 0, got {args.train} and {args.dev}")
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is an existing file; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    ev = prompts.geneval_set()
    tr, dev = prompts.split_dev(prompts.training_set(args.train + args.dev, args.seed), args.dev, args.seed)
    tr = tr[:args.train]
    prompts.write_jsonl(ev, out / "world_eval.jsonl")
    prompts.write_jsonl(tr, out / "world_train.jsonl")
    prompts.write_jsonl(dev, out / "world_dev.jsonl")
    write_text_atomic(out / "world_word_groups.json", json.dumps(prompts.word_groups(), indent=1) + "\n")
    print(f"world prompts: {len(ev)} evaluation prompts in {out / 'world_eval.jsonl'}, {len(tr)} training captions "
          f"in {out / 'world_train.jsonl'}, {len(dev)} dev captions in {out / 'world_dev.jsonl'}, word_swap groups in "
          f"{out / 'world_word_groups.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
