"""The commands' CPU host setup (parallel.cpu_host_setup): a compiled call's large temporary buffer is reused
by the next call instead of being page-faulted in again. Counted with the kernel's own minor-fault counter in
fresh processes (the setting is process-wide and must precede JAX's backends)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from ddspo_jax import parallel
    if sys.argv[1] != "plain":
        parallel.cpu_host_setup()
    if sys.argv[1] == "platform":  # a command without a mesh (world pretrain) names its platform instead
        parallel.cpu_compute_memory(jax.default_backend())
    else:
        parallel.make_mesh()  # a CPU mesh: after cpu_host_setup this keeps freed memory
    # ~128 MiB of float32 temporaries per call (sin and cos of a 64 MiB array), more than glibc's 32 MiB
    # mmap threshold and its 64 MiB per-thread heaps
    f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x) + x, axis=0))
    x = jnp.ones((4096, 4096), jnp.float32)
    for _ in range(3):
        jax.block_until_ready(f(x))
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(f(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults, "kept": parallel.keep_freed_memory.cache_info().currsize > 0,
                      "temp": f.lower(x).compile().memory_analysis().temp_size_in_bytes}))
""")


def _run(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain():
    return _run("plain")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; other platforms are left alone")
@pytest.mark.parametrize("mode", ["setup", "platform"])
def test_cpu_host_setup_reuses_the_temporary_buffer(plain, mode):
    setup = _run(mode)
    pages = 4096
    # control: without the setup every call maps its temporaries afresh (the counter sees them) ...
    assert plain["temp"] > 64 * 2**20
    assert not plain["kept"]
    assert min(plain["faults"]) > 0.5 * plain["temp"] / pages, plain
    # ... with it, calls reuse them: at most a few calls fault a buffer's worth (the heap grows by one buffer
    # when a small allocation has split the freed block; glibc does not compact), the rest only the few MiB the
    # thread pools' own arenas trim and refault
    assert setup["kept"]
    refaulted = [n > 0.5 * setup["temp"] / pages for n in setup["faults"]]
    assert sum(refaulted) <= 4, setup  # (0-2 of 10 in 12 fresh runs; without the setup 10 of 10)
