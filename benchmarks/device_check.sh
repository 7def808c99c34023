#!/usr/bin/env bash
# The accelerator figures of README's performance table, as one prepared script for a lent GPU machine
# (the device tool; DESIGN.md / issue 12 item 7): speed, peak memory and MFU of the project's step on
# SD-1.5 and SDXL with random weights, then XLA's per-device memory table on the chip.
#
# That machine reaches no package index and already holds jax (CUDA), flax, optax, orbax, safetensors,
# torch; it lacks ml_collections, so its wheel travels with the call. Here, once:
#   pip download --no-deps -d build/device_wheels ml_collections
# then through the device tool: command "bash benchmarks/device_check.sh", carry ["build/device_wheels"],
# timeout_s 540. Each part has its own time limit, so a slow compile costs one table, not the whole call;
# full logs go to $OUT (the folder the tool brings back), the tables to stdout.
set -u
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ls build/device_wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps build/device_wheels/*.whl 2>&1 | tail -2
fi
$py - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import jax, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/versions.txt"

run() {  # run LIMIT NAME ARGS...: one part, its log in $OUT/NAME.txt, its last lines here
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$py" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 25 "$OUT/$name.txt"
}
run 330 train_step benchmarks/train_step.py --gpu --steps 5 --warmup 2
run 150 memory benchmarks/memory.py --gpu --micro 1,8
