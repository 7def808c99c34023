"""Preference-pair generation: `python -m ddspo_jax.prepare --config configs/<model>.py`.

prompts (data.prompts) -> c- (data.perturb mix, deterministic per (seed, index)) -> encode c and c- ->
the reference model samples x0_w with c and x0_l with c- (CFG, the family's paper settings unless overridden)
from the SAME initial noise, a function of (seed, prompt index) only -> records (data/records.py) in fixed
ArrayRecord shards under data.records, plus manifest.json.

Why it is shaped like this:
  * Fixed shards by prompt index (records.plan_shards): a re-run skips complete shards, redoes a partial one
    (the writer renames a shard only when it is complete), so killing the run loses at most the shard in
    progress, and the result does not depend on when it was interrupted.
  * Multi-host: every sample is independent, so each process takes the shards s with
    s % process_count == process_index and samples them on its *local* devices (a mesh over
    jax.local_devices()): no host ever waits for another inside the loop, and resuming is per process.
  * One sampler call per batch holds both members of every pair (interleaved w, l), so the batch shards over
    devices pair by pair; guidance doubles it again inside sampling.py, without communication.
  * The settings are stored in prepare_settings.json at the start; a re-run with different settings into the
    same folder is refused instead of silently mixing two datasets.

`python -m ddspo_jax.prepare import-ddspo <folder> --config ...` converts the authors' PyTorch release instead;
`python -m ddspo_jax.prepare import-preferences <source> --config ...` turns a human preference dataset
(Pick-a-Pic v2's Parquet layout, or a folder with preferences.jsonl) into pair records for DD-CPP.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import app

from ddspo_jax.config import define_config_flag, load_config_flag
from ddspo_jax.data import perturb, preferences
from ddspo_jax.data.prompts import load_prompts
from ddspo_jax.errors import DataError, user_exits
from ddspo_jax.files import write_text_atomic

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

_CONFIG = define_config_flag(None)
SETTINGS_FILE = "prepare_settings.json"


def _fail(msg: str):
    raise SystemExit(f"error: {msg}")


def _parse_mix(spec) -> dict[str, float]:
    mix = {}
    for item in spec:
        name, sep, w = str(item).partition(":")
        try:
            mix[name.strip()] = float(w) if sep else 1.0
        except ValueError:
            _fail(f"data.perturb entry {item!r} is not 'name:weight'")
    return mix


def make_perturber(cfg, out: Path):
    """The Perturber the config describes (LLM rewriters only when a strategy needs one)."""

    mix = _parse_mix(cfg.data.perturb)
    rewriters, groups = {}, None
    for name in mix:
        if name == "random_removal":
            continue
        if name == "word_swap":
            if not cfg.data.word_groups:
                _fail("data.perturb uses 'word_swap', which needs data.word_groups (a JSON file {group: [words]})")
            try:
                groups = perturb.load_word_groups(cfg.data.word_groups)
            except ValueError as e:
                _fail(f"data.word_groups: {e}")
            continue
        if name not in perturb.TEMPLATES:
            _fail(f"data.perturb names unknown strategy {name!r}; known: random_removal, word_swap, "
                  f"{', '.join(perturb.TEMPLATES)}")
        if cfg.data.llm_url:
            backend = perturb.OpenAIChatBackend(cfg.data.llm_url, cfg.data.llm_model)
        elif cfg.data.llm_path:
            backend = perturb.TransformersBackend(cfg.data.llm_path)
        else:
            _fail(f"data.perturb uses {name!r}, which needs an LLM: set data.llm_url (+ data.llm_model) or "
                  "data.llm_path")
        rewriters[name] = perturb.LLMRewriter(name, backend, cfg.data.llm_cache or str(out / "llm_cache"))
    try:
        return perturb.Perturber(mix, seed=cfg.seed, rewriters=rewriters, word_groups=groups, frac_range=tuple(cfg.data.removal_range),
                                 on_error=cfg.data.llm_on_error)
    except ValueError as e:
        _fail(f"data.perturb={tuple(cfg.data.perturb)}: {e}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_backbone(cfg):
    import ml_collections

    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.backbones import resolve_path as resolve_model_path

    if not cfg.model.path:
        _fail("config.model.path is empty: set it to a diffusers model folder (or 'tiny' for the embedded model)")
    mcfg = ml_collections.ConfigDict(cfg.model.to_dict())
    mcfg.path = str(resolve_model_path(cfg.model.path, cfg.model.family))
    try:
        return load_backbone(mcfg, cfg.schedule, text=True, vae=False)
    except FileNotFoundError as e:
        _fail(str(e))


def resolve_settings(cfg, bb) -> dict[str, Any]:
    """The generation settings (backbones.generation_settings: config overrides, else the family's paper
    defaults) plus the data settings that decide what the records hold."""
    from ddspo_jax.backbones import generation_settings

    try:
        gen = generation_settings(bb, sampler=cfg.prepare.sampler, steps=cfg.prepare.steps,
                                           guidance=cfg.prepare.guidance, resolution=cfg.prepare.resolution,
                                           seed=cfg.seed)
    except ValueError as e:
        _fail(f"prepare.resolution: {e}")
    return {
        "model": str(bb.path), "dtype": cfg.model.dtype, **gen,
        "prompts": str(cfg.data.prompts), "prompt_field": cfg.data.prompt_field,
        "prompt_limit": int(cfg.data.prompt_limit), "perturb": list(cfg.data.perturb),
        "removal_range": list(cfg.data.removal_range), "efficient": bool(cfg.data.efficient),
        "shard_size": int(cfg.data.shard_size), "record_dtype": cfg.data.record_dtype,
        "cond_mode": cfg.data.cond_mode,
        # the groups' content, only where word_swap is used (records made without it keep their settings)
        **({"word_groups": _word_groups_digest(cfg)} if "word_swap" in _parse_mix(cfg.data.perturb) else {}),
    }


def _word_groups_digest(cfg) -> str:
    try:
        return hashlib.sha256(Path(cfg.data.word_groups).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""  # make_perturber names the unreadable file


def prompts_digest(prompts) -> str:
    """A short hash of the prompts' content (what a resumed prepare must find unchanged)."""
    return hashlib.sha256(json.dumps(list(prompts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_settings(out: Path, settings: dict, write: bool) -> None:
    path = out / SETTINGS_FILE
    old = _read_json(path) if path.is_file() else None
    if old is not None and "prompts_sha256" not in old:  # records made before the prompts' hash was recorded
        settings = {k: v for k, v in settings.items() if k != "prompts_sha256"}
    if old is not None and old != settings and not any(out.glob("*.array_record")):
        old = None  # no shard was finished with the old settings (a run refused or killed early): nothing to protect
    if old is not None and old != settings:
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        _fail(f"{out} holds records made with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in diff)}); "
              "use another data.records folder or delete this one")
    if old is None and write:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _cond_shapes(bb, cond_mode: str) -> dict[str, tuple]:
    """{name: shape} of one prompt's full conditioning (records may hold a shorter prefix: record_cond), from
    the encoder itself, for when every shard already existed and nothing was encoded in this run."""
    enc = bb.encode_ids([""]) if cond_mode == "token_ids" else bb.encode([""])
    return {k: tuple(np.shape(v)[1:]) for k, v in enc.items()}


class PairGenerator:
    """Encodes, samples and builds the records of one batch of prompt indices (the heart of prepare)."""

    def __init__(self, bb, settings: dict, mesh):
        from ddspo_jax import sampling

        self.bb, self.s = bb, settings
        self.generate = sampling.Generator(bb, settings, mesh)
        self.params = sampling.replicate(bb.params, mesh)
        self.cond_shapes: dict[str, tuple] = {}

    def __call__(self, indices, perts) -> list:
        from ddspo_jax.data.records import PairRecord

        b, eff = len(indices), self.s["efficient"]
        texts = [p.prompt for p in perts] + [p.neg_prompt for p in perts]
        enc = self.bb.encode(texts)  # c and c- in one encoder call
        self.cond_shapes = {k: tuple(v.shape[1:]) for k, v in enc.items()}
        noise = self.generate.noise(indices)
        if eff:
            cond = {k: v[:b] for k, v in enc.items()}
        else:  # interleave w, l so both members of a pair (same noise) sit on the same device
            cond = {k: np.stack([v[:b], v[b:]], 1).reshape((2 * b,) + v.shape[1:]) for k, v in enc.items()}
            noise = np.repeat(noise, 2, axis=0)
        lat = self.generate(self.params, cond, noise)
        x0_w, x0_l = (lat, None) if eff else (lat[0::2], lat[1::2])
        if self.s.get("cond_mode", "embeddings") == "token_ids":  # records keep ids; train encodes them
            enc = self.bb.encode_ids(texts)
            self.cond_shapes = {k: tuple(v.shape[1:]) for k, v in enc.items()}
        row = lambda j: self.bb.record_cond({k: v[j] for k, v in enc.items()})  # noqa: E731
        return [PairRecord(index=int(i), prompt=p.prompt, neg_prompt=p.neg_prompt, strategy=p.used,
                           seed=self.s["seed"], x0_w=x0_w[j], x0_l=None if eff else x0_l[j],
                           cond=row(j), neg_cond=row(b + j))
                for j, (i, p) in enumerate(zip(indices, perts))]


def run_prepare(cfg, *, progress: bool = True) -> dict[str, Any]:
    """Makes (or completes) the dataset in `data.records`; returns {pairs_written, seconds, ...}."""
    import jax
    from tqdm import tqdm

    from ddspo_jax import parallel
    from ddspo_jax.data import records

    t0 = time.perf_counter()
    if not cfg.data.records:
        _fail("data.records is empty: set it to the output folder of the records")
    if not cfg.data.prompts:
        _fail("data.prompts is empty: set it to a prompt file (e.g. ddspo_jax/configs/prompts/tiny_prompts.txt)")
    out = Path(cfg.data.records)
    try:
        prompts, stats = load_prompts(cfg.data.prompts, field=cfg.data.prompt_field or None,
                                      limit=cfg.data.prompt_limit or None)
    except FileNotFoundError:
        _fail(f"data.prompts={cfg.data.prompts!r}: prompt file not found")
    except (KeyError, ValueError) as e:
        _fail(f"data.prompts={cfg.data.prompts!r}: {e}")
    if not prompts:
        _fail(f"data.prompts={cfg.data.prompts!r}: no prompts ({stats.summary()})")
    if cfg.data.shard_size <= 0 or cfg.prepare.batch_size <= 0:
        _fail(f"data.shard_size={cfg.data.shard_size} and prepare.batch_size={cfg.prepare.batch_size} must be > 0")
    bb = _load_backbone(cfg)
    settings = resolve_settings(cfg, bb)
    bb.set_resolution(settings["resolution"])  # e.g. SDXL's time ids follow the sampled size
    settings["num_prompts"] = len(prompts)
    # The prompts' content, not just their file's path: editing the file between a killed run and its re-run
    # would otherwise mix shards of old and new prompts.
    settings["prompts_sha256"] = prompts_digest(prompts)
    pid, nproc = jax.process_index(), jax.process_count()
    perturber = make_perturber(cfg, out)  # a bad strategy is refused before anything is written
    _check_settings(out, settings, write=pid == 0)
    out.mkdir(parents=True, exist_ok=True)

    plan = records.plan_shards(len(prompts), cfg.data.shard_size)
    mine = [s for s in plan if s[0] % nproc == pid]
    paths = {s: out / records.shard_name(s, len(plan)) for s, _, _ in plan}
    for s, _, _ in mine:  # partial files of *my* shards only (other hosts may be writing theirs)
        for tmp in out.glob(paths[s].name + ".tmp-*"):
            tmp.unlink()
    todo = [(s, a, b) for s, a, b in mine if not records.complete_shard(paths[s], b - a)]
    reused = sum(b - a for s, a, b in mine) - sum(b - a for _, a, b in todo)
    print(f"prepare: {len(prompts)} prompts ({stats.summary()}); {len(plan)} shards of {cfg.data.shard_size}, "
          f"process {pid}/{nproc} has {len(mine)}, {len(mine) - len(todo)} already complete; "
          f"{settings['sampler']} {settings['steps']} steps, guidance {settings['guidance']}, "
          f"{settings['resolution']}px{', efficient (positives only)' if settings['efficient'] else ''}", flush=True)

    mesh = parallel.make_mesh(devices=jax.local_devices())
    gen = PairGenerator(bb, settings, mesh) if todo else None
    written, t_start = 0, time.perf_counter()
    bar = tqdm(total=reused + sum(b - a for _, a, b in todo), initial=reused, unit="pair", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    bs = cfg.prepare.batch_size
    for s, a, b in todo:
        perts = perturber.perturb_all(prompts[a:b], start_index=a, num_threads=cfg.data.llm_threads)
        with records.ShardWriter(paths[s], dtype=cfg.data.record_dtype) as w:
            for c0 in range(a, b, bs):
                c1 = min(c0 + bs, b)
                for rec in gen(list(range(c0, c1)), perts[c0 - a:c1 - a]):
                    w.write(rec)
                written += c1 - c0
                bar.update(c1 - c0)
                bar.set_postfix(shard=f"{s + 1}/{len(plan)}")
    bar.close()
    gen_seconds = time.perf_counter() - t_start

    if nproc > 1:
        from ddspo_jax import parallel

        parallel.barrier("prepare: all shards written")  # not a collective: shards may finish minutes apart
    manifest = None
    if pid == 0:
        missing = [str(paths[s]) for s, a, b in plan if not records.complete_shard(paths[s], b - a)]
        if missing:
            _fail(f"shards incomplete after the run: {missing}")
        shards = [{"file": paths[s].name, "num_records": b - a, "bytes": paths[s].stat().st_size} for s, a, b in plan]
        cond_shapes = gen.cond_shapes if gen is not None else _cond_shapes(bb, cfg.data.cond_mode)
        counts = {"prompts_read": stats.read, "prompts_empty": stats.empty, "prompts_duplicate": stats.duplicates,
                  "records": len(prompts), "written_this_run": written, "reused_this_run": reused,
                  "prompts_truncated": int(getattr(bb.encoder, "truncated_total", 0)),
                  **{f"perturb/{k}": v for k, v in perturber.counters.items()}}
        manifest = records.write_manifest(out, shards=shards, kind="positives" if settings["efficient"] else "pairs",
                                          model=settings["model"], settings=settings, counts=counts,
                                          dtype=cfg.data.record_dtype, conditioning=cond_shapes)
    seconds = time.perf_counter() - t0
    rate = written / gen_seconds if written and gen_seconds > 0 else 0.0
    ndev = len(jax.local_devices())
    summary = {"pairs_written": written, "pairs_reused": reused, "seconds": seconds, "pairs_per_s": rate,
               "pairs_per_s_per_device": rate / ndev, "devices": ndev, "out": str(out), "manifest": manifest}
    print(f"prepare: wrote {written} {'positives' if settings['efficient'] else 'pairs'} ({reused} already there) "
          f"to {out} in {seconds:.1f}s: {rate:.2f} pairs/s, {rate / ndev:.3f} pairs/s per device "
          f"({ndev} {jax.default_backend()} device(s), compile included)"
          + (f"; {manifest['bytes_per_record']:.0f} bytes/record" if manifest else ""), flush=True)
    fell_back = int(perturber.counters.get("fallback", 0))
    if fell_back:  # llm_on_error=fallback: say how many degraded prompts are random removal instead
        print(f"prepare: warning: {fell_back} LLM rewrite(s) failed and fell back to random_removal "
              f"(data.llm_on_error=fallback); see perturb/* in {out / 'manifest.json'}", file=sys.stderr, flush=True)
    return summary


def run_import(cfg, src: str) -> dict[str, Any]:
    """`import-ddspo <folder>`: the authors' PyTorch release -> our records (embeddings from model.path)."""
    from ddspo_jax.data import records

    if not cfg.data.records:
        _fail("data.records is empty: set it to the output folder of the records")
    bb = _load_backbone(cfg)
    try:
        m = records.import_authors_release(src, cfg.data.records, bb.encode, record_cond=bb.record_cond,
                                           model=str(bb.path),
                                           dtype=cfg.data.record_dtype, records_per_shard=cfg.data.shard_size,
                                           batch_size=cfg.prepare.batch_size)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    print(f"prepare import-ddspo: {m['num_records']} {m['kind']} records from {src} in {cfg.data.records}")
    return m


def run_import_preferences(cfg, src: str, *, progress: bool = True) -> dict[str, Any]:
    """`import-preferences <source>`: a human preference dataset -> pair records for DD-CPP.

    x0_w = the preferred image, x0_l = the other, both VAE-encoded (posterior mean, scaled) at the model's
    resolution; c- = c = the caption. Shards cover fixed ranges of source rows (data.shard_size rows each)
    and a shard with its `.drops.json` sidecar is finished, so an interrupted import resumes. Ties and
    images that do not decode are dropped, each named in the summary and in dropped.jsonl."""
    from tqdm import tqdm

    from ddspo_jax.data import records

    if not cfg.data.records:
        _fail("data.records is empty: set it to the output folder of the records")
    bb = _load_backbone(cfg).load_extras(text=True, vae=True)
    resolution = resolve_settings(cfg, bb)["resolution"]
    out = Path(cfg.data.records)
    settings = {"source": str(src), "kind": "preferences", "model": str(bb.path), "resolution": resolution,
                "shard_size": int(cfg.data.shard_size), "record_dtype": cfg.data.record_dtype}
    _check_settings(out, settings, write=True)
    records.remove_partial_shards(out)
    rows = preferences.iter_preferences(src)
    size, batch = int(cfg.data.shard_size), int(cfg.prepare.batch_size)
    shards, drops, cond_shapes, shard, done, written = [], [], {}, 0, False, 0
    bar = tqdm(desc="import preferences", unit="row", disable=not progress)
    while not done:
        chunk = []
        for entry in rows:
            chunk.append(entry)
            if len(chunk) == size:
                break
        else:
            done = True
        if not chunk:
            break
        path = out / f"prefs-{shard:05d}.array_record"
        side = path.with_name(path.name + ".drops.json")
        shard += 1
        if side.is_file() and path.is_file():  # finished by an earlier run
            info = _read_json(side)
            shards.append(info["entry"])
            drops += info["dropped"]
            written += int(info["entry"]["num_records"])
            cond_shapes.update({k: tuple(v) for k, v in info.get("conditioning", {}).items()})
            bar.update(len(chunk))
            continue
        dropped = [{"id": e.id, "reason": e.reason} for e in chunk if isinstance(e, preferences.Dropped)]
        kept = [e for e in chunk if isinstance(e, preferences.Preference)]
        with records.ShardWriter(path, dtype=cfg.data.record_dtype) as w:
            for b0 in range(0, len(kept), batch):
                good, imgs = [], []
                for e in kept[b0:b0 + batch]:
                    try:
                        pair = [preferences.load_image(e.preferred, resolution),
                                preferences.load_image(e.dispreferred, resolution)]
                    except DataError as err:
                        kind = "missing image" if "not found" in str(err) else "undecodable image"
                        dropped.append({"id": e.id, "reason": f"{kind}: {err}"})
                        continue
                    good.append(e)
                    imgs += pair
                if good:
                    lat = bb.encode_images(np.stack(imgs))
                    emb = bb.encode([e.prompt for e in good])
                    cond_shapes.update({k: v.shape[1:] for k, v in emb.items()})
                    for j, e in enumerate(good):
                        cond = bb.record_cond({k: v[j] for k, v in emb.items()})
                        w.write(records.PairRecord(index=written + j, id=e.id, prompt=e.prompt,
                                                   neg_prompt=e.prompt, cond=cond, neg_cond=cond,
                                                   x0_w=lat[2 * j], x0_l=lat[2 * j + 1], strategy="preference"))
                    written += len(good)
                bar.update(len(kept[b0:b0 + batch]))
            bar.update(len(chunk) - len(kept))
        side.write_text(json.dumps({"entry": w.entry, "dropped": dropped,
                                    "conditioning": {k: list(v) for k, v in cond_shapes.items()}}) + "\n")
        shards.append(w.entry)
        drops += dropped
    bar.close()
    if not shards or sum(int(s_["num_records"]) for s_ in shards) == 0:
        raise DataError(f"{src}: no usable preference pairs ({len(drops)} rows dropped)")
    with (out / "dropped.jsonl").open("w") as f:
        for d in drops:
            f.write(json.dumps(d) + "\n")
    reasons: dict[str, int] = {}
    for d in drops:
        key = d["reason"].split(":")[0] if d["reason"].startswith(("undecodable", "missing")) else d["reason"]
        key = "invalid labels" if key.startswith("labels") else key
        reasons[key] = reasons.get(key, 0) + 1
    m = records.write_manifest(out, shards=shards, kind="pairs", model=str(bb.path), dtype=cfg.data.record_dtype,
                               settings=settings, counts={"dropped": reasons}, conditioning=cond_shapes)
    print(f"prepare import-preferences: {m['num_records']} pairs from {src} in {out}; dropped "
          + (", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) or "nothing")
          + "".join(f"\n  dropped {d['id']}: {d['reason']}" for d in drops if d["reason"] != "tie"))
    return m


def main(argv):
    from ddspo_jax.parallel import cpu_host_setup

    cpu_host_setup()  # before JAX starts its backends

    with user_exits():  # a user mistake: one line (exit 2); anything else is a bug and keeps its traceback
        cfg = load_config_flag(_CONFIG.value) if _CONFIG.value is not None else _fail("--config is required")
        args = argv[1:]
        if args and args[0] in ("import-ddspo", "import-preferences"):
            if len(args) != 2:
                _fail(f"usage: python -m ddspo_jax.prepare {args[0]} <source> --config configs/<model>.py")
            (run_import if args[0] == "import-ddspo" else run_import_preferences)(cfg, args[1])
        elif args:
            _fail(f"unknown arguments {args}; usage: python -m ddspo_jax.prepare --config configs/<model>.py "
                  "[import-ddspo <folder> | import-preferences <parquet file/folder or folder with "
                  "preferences.jsonl>]")
        else:
            run_prepare(cfg)


if __name__ == "__main__":
    app.run(main)
