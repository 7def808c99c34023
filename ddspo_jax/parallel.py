"""Mesh, shardings and the multi-process runtime: one place for how arrays lie on devices.

The mesh has axes ("data", "fsdp"). The pair batch is split over both axes (every device gets its own
slice); parameters and optimizer state are sharded over "fsdp" (largest divisible axis of each array)
and replicated over "data".
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddspo_jax.errors import MeshError

AXES = ("data", "fsdp")
BATCH = P(AXES)  # leading (pair) axis split over all devices

# XLA:CPU in jax 0.10 hands convolutions, dots and reductions to YNNPACK by default; for the UNet's 3x3
# convolutions at training sizes XLA's own (Eigen) convolutions are faster: benchmarks/train_step.py's grad
# call 322 -> 304 ms (one process, both compiled, alternated 20 times, 2 cores; 2026-12-05), isolated 3x3
# conv fwd+bwd at [12, 16, 16, 128] -> 64 about 2x. Dots and reductions stay on YNNPACK (measured slower off).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_supported() -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=CPU_COMPILER_OPTIONS)
        return True
    except Exception:  # noqa: BLE001 - an XLA without the option: leave its defaults
        return False


def compiler_options(mesh: Mesh) -> dict | None:
    """Per-executable XLA options for the train step on this mesh's platform (CPU_COMPILER_OPTIONS on CPU,
    none elsewhere). A jax whose XLA lacks the option compiles without it rather than failing."""
    if mesh.devices.flat[0].platform != "cpu" or not _cpu_options_supported():
        return None
    return dict(CPU_COMPILER_OPTIONS)


# glibc's malloc hands any block over 32 MiB back to the OS when it is freed, and XLA:CPU allocates a call's
# whole temporary buffer (188 MiB for benchmarks/train_step.py's grad call) as one block per call: every
# call page-faulted it in again, 48k faults per call, ~3 us each on the 2-core VM (a third of the step's CPU
# time; 2 micro-batches + update: 109k faults, 655 ms -> 505 ms per step once kept). mallopt's M_MMAP_MAX=0
# serves large blocks from the heap and M_TRIM_THRESHOLD keeps freed heap memory for the next call; that
# covers the calling thread's (main) arena only, hence synchronous CPU dispatch (`cpu_host_setup`): with
# JAX's default asynchronous dispatch, calls run on a client thread whose arena still maps and unmaps.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def cpu_host_setup() -> None:
    """For a command about to compute (the CLIs call it first): run CPU computations on the calling thread, and
    once the platform turns out to be the CPU, keep freed memory (`cpu_compute_memory`). Must run before JAX starts
    its backends (later the dispatch setting changes nothing); on GPU/TPU runs it only concerns the idle CPU
    client. Library use (tests, notebooks) is left alone unless it calls this."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)


@functools.cache
def keep_freed_memory() -> bool:
    """On glibc: keep freed memory in the process (above), once per process; `cpu_compute_memory` calls it
    when CPU dispatch is synchronous (`cpu_host_setup`; with asynchronous dispatch it could not help).
    Returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    logging.info("CPU host memory: freed blocks kept in the heap (mallopt: %s)", ok)
    return ok


def cpu_compute_memory(platform: str) -> bool:
    """Once the computing platform is known: `keep_freed_memory` when it is the CPU and CPU dispatch is
    synchronous (`cpu_host_setup`). make_mesh calls it; so does a command that builds no mesh (world
    pretrain). Returns whether freed memory is kept."""
    if platform == "cpu" and not jax.config.read("jax_cpu_enable_async_dispatch"):
        return keep_freed_memory()
    return False


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Starts JAX's multi-process runtime when the environment says there are several processes.

    Explicit arguments (the config's runtime.* keys) win: any of them set starts the runtime with those
    values, JAX detecting the rest; num_processes=1 means single-process whatever the environment says.
    Otherwise JAX's own cluster detection (TPU pods, SLURM, Kubernetes with JAX_COORDINATOR_ADDRESS)
    decides. CPU collectives go through gloo (JAX's default; set here for older defaults). Returns True when
    running multi-process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if num_processes == 1:
        return False
    explicit = bool(coordinator) or num_processes > 1 or process_id >= 0
    env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                        "MEGASCALE_COORDINATOR_ADDRESS"))
    if explicit or env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator or None, num_processes if num_processes > 1 else None,
                                   process_id if process_id >= 0 else None)
    elif env and ("SLURM_NTASKS" not in os.environ or
                  (int(os.environ["SLURM_NTASKS"]) > 1 and "SLURM_PROCID" in os.environ)):
        # Under SLURM only when started by srun (SLURM_PROCID set): inside a bare salloc JAX's detection fails.
        jax.distributed.initialize()
    else:
        return False
    logging.info("distributed runtime: process %d of %d", jax.process_index(), jax.process_count())
    return jax.process_count() > 1


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches `name` (a coordination-service barrier, not a collective); no-op with
    one process. Needed before the first collective after uneven host work: gloo gives a process only 30 s
    to join a new communicator, and one process may load the step from the compilation cache while another
    compiles it (only process 0 writes cache entries) or is slowed by a shared host."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    ocp.multihost.get_barrier_sync_fn()(key=f"ddspo_jax/{name}", timeout_ms=timeout_s * 1000)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Mesh over all devices of all hosts; -1 on one axis takes what the other leaves."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise MeshError("mesh: at most one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise MeshError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, but {n} are present")
    arr = np.asarray(devices).reshape(data, fsdp)
    cpu_compute_memory(arr.flat[0].platform)
    return Mesh(arr, AXES)


def fsdp_axis(shape, fsdp_size: int) -> int | None:
    """The array axis sharded over fsdp: the largest one divisible by the fsdp size (None: replicate)."""
    if fsdp_size == 1:
        return None
    best = None
    for i, d in enumerate(shape):
        if d % fsdp_size == 0 and d >= fsdp_size and (best is None or d > shape[best]):
            best = i
    return best


def fsdp_spec(shape, fsdp_size: int) -> P:
    a = fsdp_axis(shape, fsdp_size)
    if a is None:
        return P()
    return P(*([None] * a + ["fsdp"]))


def tree_specs(tree, mesh: Mesh):
    """PartitionSpecs for a parameter-like tree (arrays or ShapeDtypeStructs)."""
    n = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: fsdp_spec(x.shape, n), tree)


def tree_shardings(tree, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh))


def shard_tree(tree, mesh: Mesh):
    """Places host/device arrays on their fsdp shardings.

    Multi-process: every process passes the same values; process-local jax Arrays (e.g. LoRA factors made
    by jax.random) go through host memory, as device_put refuses them for a mesh spanning processes."""
    if jax.process_count() > 1:
        tree = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable
                            else x, tree)
    return jax.device_put(tree, tree_shardings(tree, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def process_batch_block(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(block, blocks): this process holds rows [block * n, (block + 1) * n) of every global batch, n =
    global_batch / blocks; the loader reads exactly that block (put_batch assembles the global array).

    The rows a process's devices hold along the pair axis must be contiguous (true of meshes made by
    make_mesh from jax.devices(), which lists each process's devices together)."""
    nproc = jax.process_count()
    if nproc == 1:
        return 0, 1
    if global_batch % mesh.size:
        raise MeshError(f"global batch {global_batch} must be divisible by the {mesh.size} devices of the mesh")
    rows = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
                   for idx in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    n = global_batch // nproc
    if any(a != b for (_, a), (b, _) in zip(rows, rows[1:])) or stop - start != n or start % n:
        raise MeshError(f"process {jax.process_index()} holds batch rows {rows} of {global_batch}: not one "
                         f"contiguous block of {n}; build the mesh with each process's devices together")
    return start // n, nproc


def put_batch(batch, mesh: Mesh):
    """Global batch -> arrays split over all devices along the pair axis.

    Single-process: `batch` is the global batch. Multi-process: each process passes its own block of
    the global batch (its loader shard, see process_batch_block) and the global array is assembled from
    the process blocks."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def key_path(path) -> tuple[str, ...]:
    """A jax tree key path as a tuple of names (dict keys, sequence indices as strings)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fsdp_axes(tree, fsdp_size: int) -> dict[tuple[str, ...], int | None]:
    """{leaf path: the axis sharded over fsdp (None: replicated)} for a parameter-like tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {key_path(p): fsdp_axis(x.shape, fsdp_size) for p, x in flat}


class Gather:
    """Turns fsdp shards into whole weights in the compute dtype, inside the step's shard_map.

    A model calls it per block (a checkpointed unit, see models/layers.unit and tied_remat), so a
    block's weights exist whole only while that block runs, and the backward pass gathers them again
    instead of keeping them; JAX transposes the all-gather into a reduce-scatter, so gradients come back
    fsdp-sharded. Floating leaves are cast to `dtype` *before* the gather (half the traffic in bf16).
    `axes` covers the whole tree the step passes; `at(*names)` views a subtree (e.g. the UNet inside a
    {"unet", "text"} reference tree). Hashed by identity (it is a static field of flax modules)."""

    def __init__(self, axes: dict, dtype, prefix: tuple[str, ...] = (), axis_name: str = "fsdp"):
        self.axes, self.dtype, self.prefix, self.axis_name = axes, dtype, tuple(prefix), axis_name

    @property
    def noop(self) -> bool:
        """Nothing sharded and nothing to cast (float32 compute on one fsdp shard): blocks need no wrapper."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype) == jnp.float32 and all(a is None for a in self.axes.values())

    def at(self, *names: str) -> "Gather":
        return Gather(self.axes, self.dtype, self.prefix + tuple(names), self.axis_name)

    def leaf(self, path: tuple[str, ...], x):
        import jax.numpy as jnp

        full = self.prefix + tuple(path)
        if full not in self.axes:
            raise KeyError(f"no fsdp layout for parameter {'/'.join(full)}")
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.dtype)
        a = self.axes[full]
        if a is None:
            return x
        return checkpoint_name(jax.lax.all_gather(x, self.axis_name, axis=a, tiled=True), "fsdp_gathered")

    def layout(self, tree, path: tuple[str, ...] = ()) -> list:
        """The fsdp axis of each leaf of `tree` found at `path` (None: replicated), in leaf order: identical
        blocks can share one gather only where their layouts agree (layers.sequential's scan)."""
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return [self.axes.get(self.prefix + tuple(path) + key_path(p), "missing") for p, _ in flat]

    def __call__(self, tree, path: tuple[str, ...] = (), skip=None):
        """Gathers every leaf of `tree` (found at `path` below the prefix); `skip(names)` True leaves a
        leaf as it is (a block gathers it itself)."""
        def one(p, x):
            names = key_path(p)
            return x if skip is not None and skip(names) else self.leaf(tuple(path) + names, x)
        return jax.tree_util.tree_map_with_path(one, tree)
