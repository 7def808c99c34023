"""A scene world where prompt alignment is measurable on a CPU (GenEval's protocol on procedural scenes).

  scenes.py   shapes of a few colours, counted and placed, rendered anti-aliased with numpy
  prompts.py  GenEval-format metadata lines: the held-out evaluation set and compound training captions
  judge.py    judges an image against a metadata line from its pixels alone

`python -m ddspo_jax.world prompts` rewrites the shipped prompt files (ddspo_jax/configs/prompts/world_*.jsonl).
"""
