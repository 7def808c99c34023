"""What is alive at the peak of an XLA program's temporaries, from its buffer assignment and live ranges.

  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*local.*" python benchmarks/memory.py ...
  python benchmarks/peak_buffers.py /tmp/dump/module_0004.jit_local.cpu_after_optimizations [--shape f32[2,4096]]

`compiled.memory_analysis()` gives one number; this says which values make it up. XLA writes, per module,
`<base>-buffer-assignment.txt` (each temporary allocation and the values placed in it) and
`<base>-live-range.txt` (each value's first and last instruction in the schedule). The peak is the
instruction where the live temporary bytes are largest; printed: that total, the bytes per shape there, the
largest values with their live ranges and, with --shape, each value of that shape with its JAX op_name (the
source of the SDXL finding in README: weight gradients deferred to the end of the backward pass).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_ALLOC = re.compile(r"allocation (\d+): size (\d+)(.*)")
_VALUE = re.compile(r"\s*value: <\d+ (\S+) @(\d+)> \(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"\s*(\S+?)\{(.*?)\}:(\d+)-(\d+)")


def analyse(base: str | Path) -> dict:
    """{'peak_bytes', 'peak_at', 'length', 'alive': [(size, name, shape, start, end)], 'by_shape': Counter}."""
    base = str(base)
    values, temp = {}, set()
    alloc = None
    for line in Path(base + "-buffer-assignment.txt").read_text().splitlines():
        m = _ALLOC.match(line)
        if m:
            alloc = int(m.group(1))
            if not any(k in m.group(3) for k in ("parameter", "constant", "output", "thread-local")):
                temp.add(alloc)
            continue
        m = _VALUE.match(line)
        if m and alloc in temp:
            values[f"{m.group(1)}@{m.group(2)}"] = (int(m.group(3)), m.group(5), (alloc, int(m.group(4))))
    ranges, on = {}, False
    for line in Path(base + "-live-range.txt").read_text().splitlines():
        if "BufferLiveRange" in line:
            on = True
            continue
        m = _RANGE.match(line) if on else None
        if m:
            ranges[f"{m.group(1)}@{m.group(2).replace(',', '') or '0'}"] = (int(m.group(3)), int(m.group(4)))
        elif on and line.strip() and not line.startswith(" "):
            on = False
    spans = [(size, name, shape, *ranges[name]) for name, (size, shape, _) in values.items() if name in ranges]
    if not spans:
        raise SystemExit(f"{base}: no temporary values with live ranges found (is it a *cpu_after_optimizations base?)")
    length = max(e for *_, e in spans) + 1
    # Values placed at one (allocation, offset) share that memory (in-place fusions, bitcasts): where their live
    # ranges overlap, the slot counts once.
    slots = collections.defaultdict(list)
    for name, (size, _, slot) in values.items():
        if name in ranges:
            slots[slot].append((*ranges[name], size))
    delta = [0] * (length + 1)
    for intervals in slots.values():
        covered = -1
        for s, e, size in sorted(intervals):
            s = max(s, covered + 1)
            if s <= e:
                delta[s] += size
                delta[e + 1] -= size
            covered = max(covered, e)
    live, best, at = 0, -1, 0
    for t in range(length):
        live += delta[t]
        if live > best:
            best, at = live, t
    alive = sorted((x for x in spans if x[3] <= at <= x[4]), reverse=True)
    by_shape = collections.Counter()
    for size, _, shape, _, _ in alive:
        by_shape[shape.split("{")[0]] += size
    return {"peak_bytes": best, "peak_at": at, "length": length, "alive": alive, "by_shape": by_shape}


def op_names(base: str | Path, names) -> dict:
    """The JAX op_name metadata of HLO instructions (by name) in `<base>.txt`."""
    hlo = Path(str(base) + ".txt").read_text()
    out = {}
    for n in names:
        m = re.search(r"\s%?" + re.escape(n) + r" = [^\n]*", hlo)
        op = re.search(r'op_name="([^"]*)"', m.group(0)) if m else None
        out[n] = op.group(1) if op else "?"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="dump path without the suffix, e.g. <dir>/module_0004.jit_local.cpu_after_optimizations")
    ap.add_argument("--top", type=int, default=25, help="rows of each list")
    ap.add_argument("--shape", default="", help="list every value alive at the peak whose shape contains this")
    a = ap.parse_args(argv)
    r = analyse(a.base)
    mib = 2 ** 20
    print(f"peak live temporaries {r['peak_bytes'] / 2 ** 30:.2f} GiB at instruction {r['peak_at']} of {r['length']}")
    for shape, b in r["by_shape"].most_common(a.top):
        print(f"  {b / mib:9.1f} MiB  {shape}")
    print("largest values alive there (MiB, name, shape, live range):")
    for size, name, shape, s, e in r["alive"][:a.top]:
        print(f"  {size / mib:9.1f}  {name:40s} {shape:30s} {s}-{e}")
    if a.shape:
        hits = [x for x in r["alive"] if a.shape in x[2]]
        ops = op_names(a.base, [x[1].split("@")[0] for x in hits])
        for size, name, shape, s, e in hits:
            print(f"  {size / mib:9.1f}  {name:30s} {s}-{e}  {ops[name.split('@')[0]][-160:]}")


if __name__ == "__main__":
    main()
