"""Prompt perturbation: c -> c- (the degraded prompt the reference model draws the losing image from).

Strategies (paper App. G):
  * ``random_removal``: drop a uniformly drawn 40-70 % of the words (alignment degradation).
  * ``llm_compositional``: an LLM removes/generalises the key nouns/adjectives (Fig. E top).
  * ``llm_aesthetic``: an LLM rewrites the prompt into a visually worse one (Fig. E bottom).
  * ``word_swap``: Fig. E top's instruction ("alter the important words, keep the structure") without an
    LLM, where the important words form a known vocabulary: 40-70 % of them are replaced by another word
    of their group (colour by colour, object by object, ...), so c- stays a caption the model knows.
A :class:`Perturber` mixes strategies with weights (default: App. C, 50 % random removal + 50 % aesthetic).

Everything is deterministic per (seed, prompt index): randomness comes from numpy Generators seeded with
``[seed, index, stream]``, never from Python's global ``random``, so shards can be (re)made in any order and on
any host. LLM answers are cached on disk keyed by (template text, prompt, model), so a re-run never pays for
the same answer twice; an unusable answer falls back to random removal and is counted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import numpy as np

from ddspo_jax.errors import UserError

__all__ = [
    "random_removal", "Template", "load_template", "TEMPLATES", "parse_neg_prompts", "ChatBackend",
    "OpenAIChatBackend", "TransformersBackend", "AnswerCache", "LLMRewriter", "Perturbation", "Perturber",
    "PAPER_MIX", "LLMBackendError", "word_swap", "load_word_groups",
]

# Streams keep the independent random decisions about one prompt apart.
_STREAM_REMOVAL = 0
_STREAM_MIX = 1
_STREAM_PICK = 2
_STREAM_SWAP = 3


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), stream])


def random_removal(prompt: str, *, seed: int, index: int,
                   frac_range: tuple[float, float] = (0.4, 0.7)) -> str:
    """Drops a uniformly drawn fraction (default 40-70 %, paper App. G) of the words, keeping their order.

    The number dropped is round(frac * n), clamped to [1, n-1] so a prompt of >= 2 words never comes back
    empty nor unchanged. A one-word prompt gives "" (the unconditional prompt: the only degradation left).
    Words are whitespace-separated; punctuation stays attached to its word.
    """
    lo, hi = frac_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"frac_range must satisfy 0 <= lo <= hi <= 1, got {frac_range}")
    words = prompt.split()
    n = len(words)
    if n <= 1:
        return ""
    rng = _rng(seed, index, _STREAM_REMOVAL)
    frac = rng.uniform(lo, hi)
    k = min(max(int(round(frac * n)), 1), n - 1)
    drop = rng.choice(n, size=k, replace=False)
    keep = np.ones(n, bool)
    keep[drop] = False
    return " ".join(w for w, m in zip(words, keep) if m)


_PUNCT = ",.;:!?\"'()"


def word_swap(prompt: str, groups: dict[str, Sequence[str]], *, seed: int, index: int,
              frac_range: tuple[float, float] = (0.4, 0.7)) -> str | None:
    """Replaces a uniformly drawn 40-70 % (at least one) of the prompt's important words -- those in a group
    of ``groups`` -- each by another word of its group; None when the prompt has no important word.

    Why: random removal makes fragments ("photo two red and") that a model trained on whole captions has
    never seen, so eps_ref(x, c-) is an out-of-distribution prediction; a swap keeps c- a caption of the
    model's own distribution that means something else, as the paper's LLM rewrite does. Matching ignores
    case and surrounding punctuation; an "a"/"an" before a replaced word is made to agree with it.
    """
    lo, hi = frac_range
    group_of = {w.lower(): g for g, words in groups.items() for w in words}
    words = prompt.split()
    cores = [w.strip(_PUNCT).lower() for w in words]
    slots = [i for i, c in enumerate(cores) if c in group_of]
    if not slots:
        return None
    rng = _rng(seed, index, _STREAM_SWAP)
    k = min(max(int(round(rng.uniform(lo, hi) * len(slots))), 1), len(slots))
    for i in sorted(rng.choice(slots, size=k, replace=False).tolist()):
        options = [w for w in groups[group_of[cores[i]]] if w.lower() != cores[i]]
        new = options[int(rng.integers(len(options)))]
        a = words[i].lower().find(cores[i])
        words[i] = words[i][:a] + new + words[i][a + len(cores[i]):]
        if i > 0 and words[i - 1].lower() in ("a", "an"):
            article = "an" if new[:1].lower() in "aeiou" else "a"
            words[i - 1] = article.capitalize() if words[i - 1][0].isupper() else article
    return " ".join(words)


def load_word_groups(path: str | os.PathLike) -> dict[str, list[str]]:
    """A word-groups JSON file ({"group": ["word", ...], ...}) for ``word_swap``, checked: every group has
    >= 2 distinct single words and no word is in two groups (a ValueError naming the file and word)."""
    try:
        with open(path, encoding="utf-8") as f:
            groups = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read word groups ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{path}: word groups must be a non-empty object {{group: [words]}}")
    seen: dict[str, str] = {}
    for g, words in groups.items():
        if (not isinstance(words, list) or len({str(w).lower() for w in words}) < 2
                or not all(isinstance(w, str) and w and w == w.strip() and " " not in w for w in words)):
            raise ValueError(f"{path}: group {g!r} must list >= 2 distinct single words, got {words!r}")
        for w in words:
            if w.lower() in seen and seen[w.lower()] != g:
                raise ValueError(f"{path}: word {w!r} is in groups {seen[w.lower()]!r} and {g!r}")
            seen[w.lower()] = g
    return groups


# ----------------------------------------------------------------------------------------------- templates

_USER_MARK = "<<<USER>>>"
_PROMPT_MARK = "<input prompt>"


@dataclasses.dataclass(frozen=True)
class Template:
    """An instruction template: a system message and a user message with the prompt slot.

    The files in ``ddspo_jax/data/templates`` are the paper's Fig. E text without the LLaMA-3 special
    tokens (the backend's chat template adds its own); a line ``<<<USER>>>`` separates the system part from
    the user part, and ``<input prompt>`` marks where the prompt goes.
    """

    name: str
    system: str
    user: str

    @property
    def text(self) -> str:
        return f"{self.system}\n{_USER_MARK}\n{self.user}"

    def messages(self, prompt: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user.replace(_PROMPT_MARK, prompt)}]

    @classmethod
    def from_text(cls, name: str, text: str) -> "Template":
        if _USER_MARK not in text or _PROMPT_MARK not in text:
            raise ValueError(f"template {name!r} needs a {_USER_MARK!r} line and an {_PROMPT_MARK!r} slot")
        system, user = text.split(_USER_MARK, 1)
        return cls(name, system.strip("\n"), user.strip("\n"))


TEMPLATES = {"llm_compositional": "compositional.txt", "llm_aesthetic": "aesthetic.txt"}


def load_template(name_or_path: str) -> Template:
    """Loads a packaged template ("compositional", "aesthetic", or a strategy name) or a template file path."""
    key = name_or_path.removeprefix("llm_")
    if f"llm_{key}" in TEMPLATES:
        text = resources.files("ddspo_jax.data").joinpath("templates", TEMPLATES[f"llm_{key}"]).read_text("utf-8")
        return Template.from_text(key, text)
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"template {name_or_path!r}: not a packaged template "
                                f"({', '.join(TEMPLATES)}) nor an existing file")
    with open(name_or_path, encoding="utf-8") as f:
        return Template.from_text(os.path.basename(name_or_path), f.read())


# ------------------------------------------------------------------------------------------------- parsing

_MAX_NEG_CHARS = 1000


def parse_neg_prompts(answer: str, prompt: str) -> tuple[list[str], str | None]:
    """Finds the last JSON object with a "neg_prompts" list in an LLM answer and validates its entries.

    Returns (usable negatives, None) or ([], reason). Kept entries are non-empty strings, at most
    1000 characters, and different from the prompt itself (case and whitespace ignored).
    """
    if not isinstance(answer, str) or not answer.strip():
        return [], "empty_answer"
    decoder = json.JSONDecoder()
    found = None
    pos = answer.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(answer, pos)
        except json.JSONDecodeError:
            pos = answer.find("{", pos + 1)
            continue
        if isinstance(obj, dict) and "neg_prompts" in obj:
            found = obj
        pos = answer.find("{", end)
    if found is None:
        return [], "no_json"
    negs = found["neg_prompts"]
    if not isinstance(negs, list):
        return [], "not_a_list"
    norm_prompt = " ".join(prompt.lower().split())
    kept = []
    for neg in negs:
        if not isinstance(neg, str):
            continue
        neg = " ".join(neg.split())
        if not neg or len(neg) > _MAX_NEG_CHARS or neg.lower() == norm_prompt or neg == "...":
            continue
        kept.append(neg)
    if not kept:
        return [], "empty_list" if not negs else "no_valid_entry"
    return kept, None


# ------------------------------------------------------------------------------------------------ backends


class LLMBackendError(UserError, RuntimeError):
    """The backend could not produce an answer (after its retries)."""


class ChatBackend(Protocol):
    """What the rewriter needs from an LLM: an id for the cache key and one chat completion."""

    model_id: str

    def chat(self, messages: list[dict[str, str]]) -> str: ...


class OpenAIChatBackend:
    """An OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI ...).

    Greedy decoding (temperature 0) by default so the answer depends only on (template, prompt, model).
    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other HTTP errors are
    raised at once since retrying cannot fix them.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, temperature: float = 0.0, max_tokens: int = 512,
                 extra_body: dict[str, Any] | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"openai:{model}"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body or {})
        self.calls = 0

    def chat(self, messages: list[dict[str, str]]) -> str:
        url = f"{self.base_url}/chat/completions"
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.calls += 1
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                last = e
                if e.code == 429 or e.code >= 500:
                    continue
                raise LLMBackendError(f"{url}: HTTP {e.code} {e.reason}: {e.read()[:300]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = e
                continue
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise LLMBackendError(f"{url}: response is not a chat completion: {str(payload)[:300]}") from None
            return content or ""
        raise LLMBackendError(f"{url}: no answer after {self.max_retries + 1} attempts (last error: {last})")


class TransformersBackend:
    """A local ``transformers`` causal LM folder (e.g. Meta-Llama-3-8B-Instruct, as the paper used).

    Uses the tokenizer's chat template when it has one, else plain "system\\n\\nuser\\n" text. Greedy decoding,
    so answers are reproducible and cacheable. Runs on whatever device torch picks (CPU here).
    """

    def __init__(self, path: str | os.PathLike, *, max_new_tokens: int = 256, torch_dtype: str = "auto",
                 device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"local LLM folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        if device:
            self.model.to(device)
        self.model.eval()
        self.max_new_tokens = max_new_tokens
        self.model_id = f"local:{os.path.basename(os.path.normpath(path))}"
        self.calls = 0
        self._lock = threading.Lock()  # one generate at a time: torch models are not re-entrant-safe here

    def _format(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n"

    def chat(self, messages: list[dict[str, str]]) -> str:
        import torch

        text = self._format(messages)
        with self._lock, torch.no_grad():
            self.calls += 1
            inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = self.tokenizer.eos_token_id
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------- cache


class AnswerCache:
    """Raw LLM answers on disk, one JSON file per sha256(template text, prompt, model id).

    The raw answer is stored (even an unusable one), so parsing/validation can change without paying again.
    Files are written to a temporary name and renamed, so a killed run never leaves a half-written entry.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def key(template: Template, prompt: str, model_id: str) -> str:
        blob = json.dumps([template.text, prompt, model_id], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> str | None:
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)["answer"]
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError):
            return None  # a damaged entry is simply asked again

    def put(self, key: str, answer: str, **meta: Any) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"answer": answer, **meta}, f, ensure_ascii=False)
        os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- rewrite


class LLMRewriter:
    """One LLM strategy: template + backend + cache; returns all usable negatives of a prompt (or a reason)."""

    def __init__(self, template: Template | str, backend: ChatBackend, cache: AnswerCache | str | None = None):
        self.template = load_template(template) if isinstance(template, str) else template
        self.backend = backend
        self.cache = AnswerCache(cache) if isinstance(cache, (str, os.PathLike)) else cache

    def answer(self, prompt: str) -> tuple[str, bool]:
        """(raw answer, came_from_cache)."""
        key = AnswerCache.key(self.template, prompt, self.backend.model_id) if self.cache else ""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit, True
        answer = self.backend.chat(self.template.messages(prompt))
        if self.cache is not None:
            self.cache.put(key, answer, template=self.template.name, prompt=prompt, model=self.backend.model_id)
        return answer, False

    def rewrite(self, prompt: str) -> tuple[list[str], str | None, bool]:
        """(usable negatives, failure reason or None, cache hit)."""
        answer, hit = self.answer(prompt)
        negs, reason = parse_neg_prompts(answer, prompt)
        return negs, reason, hit


# ------------------------------------------------------------------------------------------------------ mix

PAPER_MIX = {"random_removal": 0.5, "llm_aesthetic": 0.5}  # paper App. C


@dataclasses.dataclass(frozen=True)
class Perturbation:
    prompt: str
    neg_prompt: str
    strategy: str  # the strategy drawn for this prompt
    used: str  # the strategy that produced neg_prompt ("random_removal" after a fallback)
    fallback_reason: str | None = None


class Perturber:
    """A weighted mix of strategies, deterministic per (seed, index).

    ``strategies`` maps a name (``random_removal``, ``word_swap``, ``llm_compositional``, ``llm_aesthetic`` or
    any key of ``rewriters``) to a weight; ``rewriters`` maps each LLM strategy name to its :class:`LLMRewriter`;
    ``word_groups`` is what ``word_swap`` swaps within (a prompt with no word of it falls back to removal).
    An LLM answer with several negatives is reduced to one, picked with the (seed, index) generator.
    ``on_error``: "raise" (default: a dead endpoint should stop the run, not silently turn the whole
    dataset into random removal) or "fallback" (count it and use random removal).
    ``counters`` (a Counter) holds strategy draws, uses, fallbacks by reason, cache hits and LLM calls.
    """

    def __init__(self, strategies: dict[str, float] | None = None, *, seed: int = 0,
                 rewriters: dict[str, LLMRewriter] | None = None,
                 word_groups: dict[str, Sequence[str]] | None = None,
                 frac_range: tuple[float, float] = (0.4, 0.7), on_error: str = "raise"):
        strategies = dict(PAPER_MIX if strategies is None else strategies)
        self.rewriters = dict(rewriters or {})
        for name, w in strategies.items():
            if w < 0:
                raise ValueError(f"strategy {name!r}: negative weight {w}")
            if name == "word_swap" and not word_groups:
                raise ValueError("strategy 'word_swap' needs word groups (data.word_groups)")
            if name not in ("random_removal", "word_swap") and name not in self.rewriters:
                raise ValueError(f"strategy {name!r} needs an LLM rewriter (rewriters={{{name!r}: LLMRewriter(...)}})"
                                 if name in TEMPLATES else f"unknown strategy {name!r}")
        total = sum(strategies.values())
        if total <= 0:
            raise ValueError(f"strategy weights must sum to > 0, got {strategies}")
        if on_error not in ("raise", "fallback"):
            raise ValueError(f"on_error must be 'raise' or 'fallback', got {on_error!r}")
        self.names = list(strategies)
        self.probs = np.array([strategies[n] / total for n in self.names])
        self.seed, self.frac_range, self.on_error = seed, frac_range, on_error
        self.word_groups = dict(word_groups or {})
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def strategy_for(self, index: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[int(_rng(self.seed, index, _STREAM_MIX).choice(len(self.names), p=self.probs))]

    def _count(self, *keys: str) -> None:
        with self._lock:
            self.counters.update(keys)

    def __call__(self, prompt: str, index: int) -> Perturbation:
        strategy = self.strategy_for(index)
        self._count(f"drawn/{strategy}")
        reason = None
        if strategy == "word_swap":
            neg = word_swap(prompt, self.word_groups, seed=self.seed, index=index, frac_range=self.frac_range)
            if neg is not None:
                self._count("used/word_swap")
                return Perturbation(prompt, neg, strategy, strategy)
            reason = "no_group_word"
            self._count("fallback", f"fallback/{strategy}/{reason}")
        elif strategy != "random_removal":
            try:
                negs, reason, hit = self.rewriters[strategy].rewrite(prompt)
            except LLMBackendError:
                if self.on_error == "raise":
                    raise
                negs, reason, hit = [], "backend_error", False
            self._count("llm/cache_hit" if hit else "llm/call")
            if negs:
                pick = negs[int(_rng(self.seed, index, _STREAM_PICK).integers(len(negs)))]
                self._count(f"used/{strategy}")
                return Perturbation(prompt, pick, strategy, strategy)
            self._count("fallback", f"fallback/{strategy}/{reason}")
        neg = random_removal(prompt, seed=self.seed, index=index, frac_range=self.frac_range)
        self._count("used/random_removal")
        return Perturbation(prompt, neg, strategy, "random_removal", reason)

    def perturb_all(self, prompts: Sequence[str], *, start_index: int = 0, num_threads: int = 1
                    ) -> list[Perturbation]:
        """Perturbs prompts[i] with index start_index + i; threads overlap HTTP round trips (same results)."""
        if num_threads <= 1:
            return [self(p, start_index + i) for i, p in enumerate(prompts)]
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda ip: self(ip[1], start_index + ip[0]), enumerate(prompts)))

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()))
