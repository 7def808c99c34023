"""Rooms that know only what they should: import rules read from the source with `ast`, and the package works
from a wheel installed outside the checkout."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ddspo_jax"
COMMANDS = ("train", "prepare", "sample", "export", "evaluate", "toy", "tiny")


def imports(path: Path) -> set[str]:
    """Every ddspo_jax module a file imports (at any depth: lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module
            if node.level:  # relative import: resolve against the file's package
                base = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                mod = ".".join(base + ((node.module,) if node.module else ()))
            if mod.startswith("ddspo_jax"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ddspo_jax"))
    return out


def under(mods, *prefixes):
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("path", sorted((PKG / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_no_loaders_data_or_commands(path):
    bad = under(imports(path), "ddspo_jax.convert", "ddspo_jax.data", "ddspo_jax.backbones",
                *(f"ddspo_jax.{c}" for c in COMMANDS))
    assert not bad, f"{path.name} imports {bad}"


def test_step_imports_nothing_from_data():
    assert not under(imports(PKG / "step.py"), "ddspo_jax.data")


@pytest.mark.parametrize("name", ["sampling.py", "schedules.py"])
def test_sampler_and_schedules_import_no_backbones(name):
    assert not under(imports(PKG / name), "ddspo_jax.backbones", *(f"ddspo_jax.{c}" for c in COMMANDS))


@pytest.mark.parametrize("name", ["train.py", "prepare.py", "sample.py", "export.py", "evaluate.py"])
def test_commands_reach_the_tiny_model_only_through_backbones(name):
    assert not under(imports(PKG / name), "ddspo_jax.tiny"), f"{name} imports ddspo_jax.tiny directly"


@pytest.mark.parametrize("path", sorted((PKG / "scoring").glob("*.py")), ids=lambda p: p.name)
def test_scorers_import_no_commands_data_or_step(path):
    """Scorers measure images: `evaluate` (and later `train`) call them, never the other way."""
    bad = under(imports(path), "ddspo_jax.data", "ddspo_jax.step", *(f"ddspo_jax.{c}" for c in COMMANDS))
    assert not bad, f"{path.name} imports {bad}"


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth; a submodule import is not an edge to its
    package, which Python runs first anyway)."""
    mods = {".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PKG.rglob("*.py")}
    return {m: {d for d in imports(f) if d in mods and d != m} for m, f in mods.items()}


def test_the_import_graph_has_no_cycle():
    graph, state, cycle = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle


def test_no_arrow_up_to_a_command_or_the_world():
    """The library (models, ports, data, step, backbones, scoring, ...) imports no command and nothing of the
    scene world; the world plugs its judge into scoring by name (scoring.PLUGINS)."""
    top = {f"ddspo_jax.{c}" for c in COMMANDS}
    upper = lambda m: m in top or m == "ddspo_jax.world" or m.startswith("ddspo_jax.world.")  # noqa: E731
    bad = {m: sorted(d for d in deps if upper(d)) for m, deps in _graph().items() if not upper(m)}
    assert not {m: d for m, d in bad.items() if d}


ALL_COMMANDS = COMMANDS + ("world",)


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_every_command_explains_itself_and_refuses_a_mistake_in_one_line(cmd, tmp_path):
    """`--help` prints the command's purpose; an unknown argument is one line on stderr, exit 2, no traceback."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("DDSPO_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", f"ddspo_jax.{cmd}", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    doc = ast.get_docstring(ast.parse((PKG / (f"{cmd}.py" if cmd != "world" else "world/__main__.py")).read_text()))
    first = doc.split("\n")[0].split(":")[0].strip()[:30]
    assert res.returncode in (0, 1) and first in res.stdout + res.stderr, (first, res.stdout[-800:], res.stderr[-800:])
    res = subprocess.run([sys.executable, "-m", f"ddspo_jax.{cmd}", "--no-such-flag"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr and err, res.stderr[-1500:]
    assert "error" in err[-1].lower() or "error" in err[0].lower(), res.stderr[-800:]  # argparse: usage, then the line


def test_no_family_strings_in_the_step():
    src = (PKG / "step.py").read_text()
    assert "sdxl" not in src and '"sd"' not in src


def test_wheel_installed_elsewhere_runs(tmp_path):
    """`pip wheel`, installed (no deps) into a fresh venv that sees this environment's dependencies but not
    the checkout; `train --help` and the toy's --quick run from an unrelated working directory."""
    import site
    import sysconfig

    root = PKG.parent
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(root)], check=True, timeout=600)
    wheel = next(wheels.glob("ddspo_jax-*.whl"))
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())  # the shipped world model travels with the package
    assert {"ddspo_jax/world/model/model_index.json", "ddspo_jax/world/model/unet/diffusion_pytorch_model.safetensors",
            "ddspo_jax/world/model/tokenizer/vocab.json", "ddspo_jax/world/model/ddspo_generation.json"} <= names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages as a plain path (its .pth files, the editable checkout's among them, are
    # not processed), after the venv's own site-packages
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib, str(wheel)],
                   check=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"))
    where = subprocess.run([py, "-c", "import ddspo_jax; print(ddspo_jax.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(root) not in where and purelib in where, where
    res = subprocess.run([py, "-m", "ddspo_jax.train", "--help"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    # absl prints the help and exits 1; the help itself (the module docstring and the config flag) must be there
    assert "Fine-tune a diffusion model" in res.stdout and "--config" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = subprocess.run([py, "-m", "ddspo_jax.toy", "--quick", f"--config.output_dir={work / 'toy'}"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "toy" / "toy_results.csv").is_file()


def test_family_names_only_behind_the_backbone_interface():
    """Adding a family is one backbones/ module plus its ports: no other code tests a family's name."""
    allowed = {"backbones", "models", "convert", "configs"}
    hits = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"sdxl|sana", line)]
    assert not hits, hits


HEAVY_LIBS = ("jax", "flax", "optax", "orbax", "torch", "tensorflow", "transformers", "diffusers", "grain", "clu",
              "scipy", "PIL", "tqdm", "etils", "safetensors", "array_record", "pyarrow")


def _top_level_imports(path: Path) -> tuple[set[str], bool]:
    """(the package modules a file imports at module level, whether it imports a heavy library there)."""
    own, heavy = set(), False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        own.update(n for n in names if n.startswith("ddspo_jax"))
        heavy |= any(n.split(".")[0] in HEAVY_LIBS for n in names)
    return own, heavy


def test_function_local_imports_are_only_of_jax_importing_modules():
    """The package's own modules are imported at module top; a function-local import is allowed only of a
    module whose import starts JAX (or torch, TensorFlow, ...), in a module that says why in a comment."""
    files = {".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in PKG.rglob("*.py")}
    tops = {m: _top_level_imports(f) for m, f in files.items()}
    memo = {}

    def heavy(m, seen=()):
        if m not in memo:
            own, h = tops[m]
            parents = [".".join(m.split(".")[:i]) for i in range(2, m.count(".") + 1)]
            memo[m] = h or any(heavy(d, seen + (m,)) for d in sorted(own) + parents if d in tops and d not in seen)
        return memo[m]

    bad = []
    for m, f in files.items():
        src = f.read_text()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [t for t in [f"{node.module}.{a.name}" for a in node.names] + [node.module] if t in files]
                targets = targets[:-1] or targets  # `from pkg import sub`: the submodule is what is imported
            else:
                targets = [a.name for a in getattr(node, "names", []) if a.name in files]
            for t in targets:
                if not heavy(t) or "imported inside the functions that use them" not in src:
                    bad.append(f"{f.relative_to(PKG.parent)}:{node.lineno} imports {t}")
    assert not bad, bad
