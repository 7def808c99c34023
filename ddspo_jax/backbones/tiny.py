"""The embedded tiny model's parts: its prompt vocabulary, BPE tokenizer, configs and deterministic weights.

`backbones.ensure_tiny_model(folder)` (built from these by each family's `build_tiny`) writes a complete diffusers pipeline folder (UNet, CLIP text encoder(s), tokenizer(s),
VAE, scheduler, model_index.json) the first time it is called and returns the cached folder afterwards, so a new
user runs the whole road (prepare -> train -> export -> sample) on a CPU in minutes with nothing downloaded.

Why it is built this way:
  * No torch: the main install has none. Weights are made for our Flax modules and written with our own
    exporters (`ddspo_jax.convert`), so the folder is also a check that export writes what diffusers reads.
  * Deterministic to the byte on every machine: weights come from numpy's PCG64 uniform draws (integer bit
    operations plus exact scaling), never from XLA's random kernels, and every JSON file has sorted keys and
    fixed version strings. A test builds twice and compares the files.
  * A real BPE vocabulary: trained here (classic pair-count BPE, ties broken by the pair's text) on the words of
    the shipped prompt files, so every word of `ddspo_jax/configs/prompts/tiny_prompts.txt` and of the scene
    world's prompts (world_*.jsonl) is a single token and
    `CLIPTokenizer.from_pretrained` reads the folder unchanged.
  * Atomic: built in a temporary sibling folder and renamed into place, so a killed build never leaves a
    half-written model under the final name and two processes racing both end with the same folder.
"""

from __future__ import annotations

import json
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["TINY_PROMPTS", "TINY_VERSION", "compose_prompts", "tiny_vocab_and_merges"]

TINY_VERSION = 2  # bump when anything written changes: cached folders of another version are rebuilt elsewhere
MARKER = "ddspo_tiny.json"
TINY_PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "tiny_prompts.txt"
FAKE_DIFFUSERS_VERSION = "0.30.0"  # written into tiny configs: their bytes do not depend on the installed diffusers
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# ------------------------------------------------------------------------------------------ prompt words
# The compositional vocabulary of the shipped prompt file (objects, colours, counts, positions, scenes, styles).
OBJECTS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("horse", "horses"), ("car", "cars"),
           ("bicycle", "bicycles"), ("apple", "apples"), ("banana", "bananas"), ("cup", "cups"),
           ("book", "books"), ("chair", "chairs"), ("clock", "clocks"), ("ball", "balls"),
           ("flower", "flowers"), ("tree", "trees"), ("house", "houses"), ("boat", "boats"),
           ("bottle", "bottles"), ("lamp", "lamps"), ("hat", "hats"), ("umbrella", "umbrellas"),
           ("cube", "cubes"), ("sphere", "spheres"), ("vase", "vases"), ("bench", "benches"),
           ("kite", "kites"), ("train", "trains"), ("bowl", "bowls"), ("candle", "candles"),
           ("rabbit", "rabbits")]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "brown", "gray"]
COUNTS = ["two", "three", "four", "five"]
ADJECTIVES = ["small", "large", "shiny", "wooden", "striped", "fluffy", "metal", "glass", "old", "round"]
POSITIONS = ["to the left of", "to the right of", "above", "below", "next to", "on top of", "behind",
             "in front of"]
SCENES = ["on a wooden table", "in a grassy field", "on a snowy street", "in a bright kitchen", "on the beach",
          "in a dark room", "under a cloudy sky", "in a quiet garden"]
STYLES = ["a photo of", "a painting of", "a sketch of", "a 3d render of", "a watercolor of", "a close up of"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _one(rng, adj: bool = False) -> str:
    noun = OBJECTS[rng.integers(len(OBJECTS))][0]
    words = ([ADJECTIVES[rng.integers(len(ADJECTIVES))]] if adj else []) + [COLOURS[rng.integers(len(COLOURS))], noun]
    return f"{_article(words[0])} {' '.join(words)}"


def _many(rng) -> str:
    return (f"{COUNTS[rng.integers(len(COUNTS))]} {COLOURS[rng.integers(len(COLOURS))]} "
            f"{OBJECTS[rng.integers(len(OBJECTS))][1]}")


def compose_prompts(n: int = 400, seed: int = 0) -> list[str]:
    """The generator of `ddspo_jax/configs/prompts/tiny_prompts.txt` (run once; the file is committed): compositional
    prompts over objects, colours, counts, positions, scenes and styles, unique, in a fixed order."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        kind = int(rng.integers(5))
        pos = POSITIONS[rng.integers(len(POSITIONS))]
        if kind == 0:
            p = f"{STYLES[rng.integers(len(STYLES))]} {_one(rng, adj=bool(rng.integers(2)))}"
        elif kind == 1:
            p = f"{_one(rng)} {pos} {_one(rng)}"
        elif kind == 2:
            p = f"{_many(rng)} {SCENES[rng.integers(len(SCENES))]}"
        elif kind == 3:
            p = f"{STYLES[rng.integers(len(STYLES))]} {_one(rng, adj=True)} {pos} {_many(rng)}"
        else:
            p = f"{_many(rng)} {pos} {_one(rng)}, {SCENES[rng.integers(len(SCENES))]}"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# The scene world's vocabulary (ddspo_jax/world/scenes.py), written here rather than imported: the world builds
# on this module, not the other way (tests/test_tiny.py holds the two lists equal).
WORLD_SHAPES = ("circle", "square", "triangle", "ring")
WORLD_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def prompt_words() -> list[str]:
    """Every word the prompt generator or the scene world's prompts can emit (what the tokenizer must know as
    single tokens: a shape word split into letters, "c i r c le", leaves a random frozen text encoder's
    outputs for "circle" and "ring" sharing their tokens, and the world model's UNet confused them)."""
    world = [f"{s} {s}s" for s in WORLD_SHAPES] + list(WORLD_COLOURS) + ["one two three four left right of and"]
    text = " ".join([" ".join(o) for o in OBJECTS] + COLOURS + COUNTS + ADJECTIVES + POSITIONS + SCENES + STYLES
                    + ["a an"] + world)
    return sorted(set(re.findall(r"[a-z]+|[0-9]", text)))


# --------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the base alphabet of the vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP-style byte-level BPE trained on the prompt words until each is one token.

    Layout as CLIP's: 256 byte characters, the same with "</w>", the merged tokens in merge order, then BOS and
    EOS as the two largest ids (transformers' legacy pooling takes the argmax id as EOS)."""
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in prompt_words()]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, ties by text: deterministic
        merges.append(f"{best[0]} {best[1]}")
        vocab_list.append(best[0] + best[1])
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(tuple(out))
        words = new_words
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True})


# ----------------------------------------------------------------------------------------------- weights


def fill_params(shapes, seed: int, path=()) -> dict:
    """Deterministic weights for a parameter tree of ShapeDtypeStructs.

    Uniform draws with the variance of a fan-in (LeCun) init for kernels, small values for biases and
    embeddings, scales near 1 for norms: non-trivial everywhere, so a swapped or untransposed weight shows up
    in parity tests. Each leaf has its own generator seeded by (seed, crc32 of its path): order-independent."""
    out = {}
    for name in sorted(shapes):
        v = shapes[name]
        p = path + (name,)
        if isinstance(v, dict):
            out[name] = fill_params(v, seed, p)
            continue
        rng = np.random.default_rng([seed, zlib.crc32("/".join(p).encode())])
        u = (rng.random(v.shape) * 2.0 - 1.0) * np.sqrt(3.0)  # unit variance
        if name == "kernel":
            fan_in = int(np.prod(v.shape[:-1]))
            arr = u / np.sqrt(fan_in)
        elif name == "scale":
            arr = 1.0 + 0.1 * u
        elif name == "embedding":
            arr = 0.5 * u
        else:  # bias
            arr = 0.05 * u
        out[name] = arr.astype(np.float32)
    return out


def clip_text_config(with_projection: bool, act: str) -> dict:
    vocab, _ = tiny_vocab_and_merges()
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": len(vocab), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": 32,
            "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS],
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}


