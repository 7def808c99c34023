"""safetensors I/O and the key-table machinery every model family shares.

A family's `KeyTable` maps each Flax parameter path to one PyTorch state-dict key plus a layout
transform. Loading and export both walk the *Flax* parameter tree (its structure comes from
`jax.eval_shape` of the module), so one table drives both directions and the round trip is the
identity by construction (and tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ddspo_jax.errors import ModelError


SHOWN = 5  # entries of each kind a mismatch message names (and their count)


class ConversionError(ModelError):
    """A weight file does not match the model: names the first offending keys of each kind and their counts."""


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """Declarative Flax <-> PyTorch naming for one model family.

    list_modules: names of module lists; Flax calls their items `name_<i>`, PyTorch `name.<i>`.
    renames: ordered (flax_regex, torch_replacement) pairs applied to the dotted module path after
      the list rule, for modules whose Flax name differs from the PyTorch one.
    prefix: prepended to every PyTorch key (e.g. transformers 4's "text_model.").
    ignore: regexes of PyTorch keys that may be present but carry no parameter (buffers).
    """

    list_modules: frozenset[str] = frozenset()
    renames: tuple[tuple[str, str], ...] = ()
    prefix: str = ""
    ignore: tuple[str, ...] = ()

    def torch_key(self, flax_path: tuple[str, ...], ndim: int) -> str:
        *modules, leaf = flax_path
        parts = []
        for m in modules:
            base, _, idx = m.rpartition("_")
            if idx.isdigit() and base in self.list_modules:
                parts += [base, idx]
            else:
                parts.append(m)
        path = ".".join(parts)
        for pattern, repl in self.renames:
            path = re.sub(pattern, repl, path)
        name = _LEAF_NAMES.get(leaf, leaf)  # a raw `self.param` (CLIP's class_embedding, logit_scale) keeps its name
        return f"{self.prefix}{path}.{name}" if path else f"{self.prefix}{name}"


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def params_from_state_dict(
    table: KeyTable,
    shapes: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    dtype=np.float32,
    source: str = "state dict",
) -> dict:
    """Builds the Flax params for the tree `shapes` (from `jax.eval_shape`) out of `state_dict`.

    Raises ConversionError naming the first SHOWN missing keys, unexpected keys and shape mismatches of each
    kind, with their counts.
    """
    flat = _flatten(shapes)
    out, missing, mismatched, used = {}, [], [], set()
    for path, spec in flat.items():
        key = table.torch_key(path, len(spec.shape))
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        arr = to_flax_layout(path[-1], np.asarray(state_dict[key]))
        if tuple(arr.shape) != tuple(spec.shape):
            torch_shape = tuple(np.shape(state_dict[key]))
            want = tuple(to_torch_layout(path[-1], np.empty(spec.shape, np.int8)).shape)
            mismatched.append(f"{key}: file has {torch_shape}, model expects {want}")
            continue
        out[path] = arr.astype(dtype)
    unexpected = sorted(
        k for k in state_dict if k not in used and not any(re.fullmatch(p, k) for p in table.ignore)
    )
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = sorted(items)[:SHOWN]  # the first few and the count: a wrong config gives hundreds
                lines.append(f"  {len(items)} {title}" + (f" (first {SHOWN}):" if len(items) > SHOWN else ":"))
                lines += [f"    {x}" for x in shown]
        raise ConversionError("\n".join(lines))
    return _unflatten(out)


def state_dict_from_params(table: KeyTable, params: Mapping[str, Any], *, dtype=np.float32) -> dict:
    """The inverse of `params_from_state_dict`: Flax params -> PyTorch-layout numpy state dict."""
    out = {}
    for path, v in _flatten(params).items():
        arr = np.asarray(v, dtype=np.float32)  # via float32 so bf16 params convert exactly
        out[table.torch_key(path, arr.ndim)] = np.ascontiguousarray(to_torch_layout(path[-1], arr)).astype(dtype)
    return out


# ----------------------------------------------------------------------------------------- files

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One `.safetensors` file -> numpy arrays (bf16 through ml_dtypes). Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weight file {path} does not exist")
    try:
        out = {}
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
            for k in keys:
                if k not in bf16:
                    out[k] = f.get_tensor(k)
        if bf16:  # numpy has no bfloat16; the flax framework returns ml_dtypes-backed arrays
            with safe_open(str(path), framework="flax") as f:
                for k in bf16:
                    out[k] = np.asarray(f.get_tensor(k))
        return out
    except ConversionError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None


def find_weights(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of a diffusers/transformers component folder.

    Handles single files, sharded `*.safetensors.index.json` and variants such as fp16
    (`diffusion_pytorch_model.fp16.safetensors`). Pickled `.bin` files are refused, never read.
    """
    folder = Path(folder)
    suffix = f".{variant}" if variant else ""
    for name in WEIGHT_NAMES:
        single = folder / f"{name}{suffix}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{name}.safetensors.index{suffix}.json"
        if not index.is_file():
            index = folder / f"{name}{suffix}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index ({e})") from None
            return [folder / f for f in sorted(set(weight_map.values()))]
    if variant is None:
        # Only a variant is present (e.g. only the fp16 file was downloaded): use it.
        found = sorted(folder.glob("*.safetensors"))
        if len(found) == 1:
            return found
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    hint = (f" (found pickled {', '.join(pickled)}: convert it to safetensors; pickles are never loaded)"
            if pickled else "")
    raise ConversionError(f"no safetensors weights{' for variant ' + variant if variant else ''} in {folder}{hint}")


def read_state_dict(folder_or_file: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    path = Path(folder_or_file)
    files = [path] if path.is_file() else find_weights(path, variant)
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(read_safetensors(f))
    return out


def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Writes atomically (temp name, then rename) so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    bf16 = {k for k, v in arrays.items() if v.dtype.name == "bfloat16"}
    if bf16:  # safetensors.numpy cannot write bfloat16; the flax writer can
        import jax.numpy as jnp
        from safetensors.flax import save_file as save_flax
        save_flax({k: jnp.asarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    else:
        save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise ConversionError(f"{path} is missing: a model folder needs its {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


# ------------------------------------------------------------------------------ component lookup

def resolve_component(path: str | os.PathLike, component: str, *, config: Any = None,
                      variant: str | None = None) -> tuple[dict, dict[str, np.ndarray], str]:
    """(config dict, state dict, source description) for one model component.

    `path` is the component folder itself (has config.json), a pipeline folder (its `component/` is
    used), or a single `.safetensors` file whose config is `config` (a dict, a JSON file or a folder)
    or the `config.json` next to it. Anything that is not safetensors is refused, never unpickled.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConversionError(f"{path} is not a .safetensors file (pickled checkpoints are never loaded; "
                                  "convert it to safetensors first)")
        if isinstance(config, Mapping):
            cfg = dict(config)
        elif config is not None:
            cfg_path = Path(config)
            cfg = read_config(cfg_path) if cfg_path.is_dir() else read_config(cfg_path.parent, cfg_path.name)
        else:
            cfg = read_config(path.parent)
        return cfg, read_safetensors(path), str(path)
    if not path.is_dir():
        raise ConversionError(f"{path} does not exist")
    folder = path
    if not (path / "config.json").is_file() and (path / component).is_dir():
        folder = path / component
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{path} is neither a {component} folder (with config.json) nor a pipeline folder "
                              f"with a {component}/ subfolder")
    cfg = dict(config) if isinstance(config, Mapping) else read_config(folder)
    return cfg, read_state_dict(folder, variant), str(folder)


_EXPORT_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}


def export_dtype(dtype: Any) -> np.dtype:
    """'fp16' / 'bf16' / 'float32' / a numpy or jax dtype -> the numpy dtype written to safetensors."""
    if isinstance(dtype, str):
        if dtype not in _EXPORT_DTYPES:
            raise ValueError(f"export dtype {dtype!r} is not one of {sorted(_EXPORT_DTYPES)}")
        dtype = _EXPORT_DTYPES[dtype]
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(dtype)
    if dt.name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"export dtype {dt.name} is not float32, float16 or bfloat16")
    return dt
