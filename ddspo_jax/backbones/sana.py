"""SANA's prompt encoding (the text side of the SANA backbone): prompts -> Gemma-2 hidden states + mask,
exactly as diffusers' `SanaPipeline.encode_prompt` computes them.

  * prompts are lower-cased and stripped (clean_caption=False, the pipeline's default);
  * the "complex human instruction" (paper Sec. 3.1 of SANA; the pipeline's default list, joined by newlines)
    is prepended to each prompt; the tokenizer pads right to num_instruction_tokens + max_sequence_length - 2;
  * Gemma-2 runs on the whole padded sequence with its attention mask; then only position 0 (BOS) and the
    last max_sequence_length - 1 positions are kept, embeddings and mask alike (300 by default);
  * negative prompts are encoded without the instruction, padded to max_sequence_length, nothing dropped.
Tokenization stays in Python (transformers' Gemma tokenizer from the pipeline's `tokenizer/`); Gemma runs in
JAX under one jit.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.common import ConversionError

COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def load_gemma_tokenizer(folder: str | os.PathLike):
    """The pipeline's Gemma tokenizer from a local folder (tokenizer.json); never downloads."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder}: no usable Gemma tokenizer ({e})") from None
    tok.padding_side = "right"  # what SanaPipeline sets before every call
    return tok


@functools.partial(jax.jit, static_argnums=0)
def _hidden(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)


class SanaPromptEncoder:
    """`encode(prompts)` / `encode_negative(n, texts)` -> {"prompt_embeds" [B, L, D], "prompt_attention_mask"
    [B, L]} as numpy arrays in the encoder's dtype (L = max_sequence_length)."""

    def __init__(self, tokenizer, model, params, *, max_sequence_length: int = 300,
                 instruction: Sequence[str] | None = COMPLEX_HUMAN_INSTRUCTION):
        self.tokenizer, self.model, self.params = tokenizer, model, params
        self.max_sequence_length = int(max_sequence_length)
        self.instruction = tuple(instruction or ())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype=jnp.bfloat16, **kw) -> "SanaPromptEncoder":
        from ddspo_jax.convert.gemma import load_gemma2

        folder = Path(folder)
        model, params = load_gemma2(folder, dtype=dtype, param_dtype=dtype)
        return cls(load_gemma_tokenizer(folder / "tokenizer"), model, params, **kw)

    def tokenize(self, texts: Sequence[str], *, instruction: bool = True) -> tuple[np.ndarray, np.ndarray]:
        texts = [t.lower().strip() for t in texts]
        length = self.max_sequence_length
        if instruction and self.instruction:
            chi = "\n".join(self.instruction)
            texts = [chi + t for t in texts]
            length = len(self.tokenizer.encode(chi)) + self.max_sequence_length - 2
        out = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def _run(self, ids, mask):
        return np.asarray(_hidden(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask)))

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = self.tokenize(texts, instruction=True)
        keep = [0] + list(range(ids.shape[1] - self.max_sequence_length + 1, ids.shape[1]))
        emb = self._run(ids, mask)
        return {"prompt_embeds": emb[:, keep], "prompt_attention_mask": mask[:, keep]}

    def encode_negative(self, batch_size: int, negative_texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        texts = list(negative_texts) if negative_texts is not None else [""] * batch_size
        ids, mask = self.tokenize(texts, instruction=False)
        return {"prompt_embeds": self._run(ids, mask), "prompt_attention_mask": mask}
