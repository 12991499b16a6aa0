"""Transposable N:M masks for every kernel of a ResNet-50, and their quality.

All conv (HWIO) and dense (in, out) kernels of ResNet-50 (v1.5), random normal
values, 25.5M weights; the 7x7 stem (3 input channels) cannot be tiled and is
skipped (9,408 weights). All kernels are solved as one batch of tiles with
``transposable_nm_mask_tree``. Targets (seconds, this 2-core CPU): exact 2:4
<= 1.5, exact 4:8 <= 10, greedy <= 3; for large M (8:16, 16:32) the
``"entropic"`` solver <= 10, next to the exact one, with the per-tile ratio
of its kept |w| to the optimum (mean and worst tile). Each time is also given as a ratio to
one elementwise pass over the same weights (measured in the same run).

Quality: the fraction of the |w| mass kept -- unstructured (top half of each
m x m tile), N:M, the transposable optimum, greedy and greedy_repair -- and the
greedy / optimum ratio per tile (mean, worst), to compare with ALGORITHMS.md
A2, and how often the L1 and L2 objectives pick different masks (A2: ~23% of
Gaussian 4x4 tiles). For context, an LP solve per tile (scipy HiGHS) on a few tiles,
extrapolated to all tiles.

Run from the repository root::

    python -m benchmarks.transposable           # full ResNet-50
    python -m benchmarks.transposable --quick   # 1/8 of the channels, seconds

Writes ``benchmarks/results/transposable.json``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Report, time_fn
from sparse_jax.masks import (nm_mask, transposable_nm_mask,
                               transposable_nm_mask_tree)
from sparse_jax.masks.transposable import from_tiles, to_tiles

TARGETS = {("exact", 2, 4): 1.5, ("exact", 4, 8): 10.0, ("greedy", 2, 4): 3.0,
           ("greedy", 4, 8): 3.0, ("entropic", 8, 16): 10.0,
           ("entropic", 16, 32): 10.0}
LARGE_M = ((8, 16), (16, 32))   # exact vs entropic only


def resnet50_kernel_shapes(num_classes: int = 1000,
                           scale: int = 1) -> list[tuple[str, tuple]]:
  """Every conv (HWIO) and dense (in, out) kernel shape of ResNet-50 v1.5.

  ``scale`` divides every channel count (for a quick run).
  """
  shapes = [("stem", (7, 7, 3, 64 // scale))]
  cin = 64 // scale
  for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6),
                                           (512, 3)]):
    width //= scale
    out = 4 * width
    for b in range(blocks):
      name = f"stage{stage + 1}_block{b}"
      shapes.append((name + "_conv1", (1, 1, cin, width)))
      shapes.append((name + "_conv2", (3, 3, width, width)))
      shapes.append((name + "_conv3", (1, 1, width, out)))
      if b == 0:
        shapes.append((name + "_proj", (1, 1, cin, out)))
      cin = out
  out = num_classes // scale
  shapes.append(("fc", (cin, out + (-out) % 8)))  # 1000 itself is divisible
  return shapes


def lp_tile_time(tiles: np.ndarray, n: int) -> float:
  """Seconds per tile of scipy's HiGHS LP on the transportation problem."""
  from scipy.optimize import linprog  # context only
  m = tiles.shape[-1]
  a = np.zeros((2 * m, m * m))
  for i in range(m):
    a[i, i * m:(i + 1) * m] = 1
    a[m + i, i::m] = 1
  start = time.perf_counter()
  for s in tiles:
    linprog(-s.ravel(), A_eq=a, b_eq=np.full(2 * m, n), bounds=(0, 1),
            method="highs")
  return (time.perf_counter() - start) / len(tiles)


def quality(used, masks, n, m):
  """Kept |w| fractions and per-tile ratios to the optimum (all jittable)."""
  def tiles_of(tree):
    return jnp.concatenate([to_tiles(x, m) for x in jax.tree.leaves(tree)])

  a = jnp.abs(tiles_of(used))
  flat = a.reshape(a.shape[0], -1)
  # unstructured within each tile: the top half of its m*m entries.
  top = jnp.sort(flat, axis=-1)[:, (m * m) // 2:]
  mass = a.sum()
  kept = {"unstructured (top half of each tile)": top.sum() / mass,
          f"N:M {n}:{m}": sum(jnp.where(nm_mask(w, n, m), jnp.abs(w), 0).sum()
                              for w in used.values()) / mass}
  per_tile, exact_counts = {}, {}
  for method, mk in masks.items():
    sel = tiles_of(mk)
    per_tile[method] = (a * sel).sum(axis=(1, 2))
    kept[f"T-{n}:{m} {method}"] = per_tile[method].sum() / mass
    exact_counts[method] = (jnp.all(sel.sum(1) == n)
                            & jnp.all(sel.sum(2) == n)).astype(jnp.float32)
  ratios = {k: per_tile[k] / per_tile["exact"] for k in ("greedy",
                                                          "greedy_repair")}
  return {"kept": kept, "exact_counts": exact_counts,
          "ratio_mean": {k: r.mean() for k, r in ratios.items()},
          "ratio_min": {k: r.min() for k, r in ratios.items()}}


def large_m(report, used, n, m, repeats, exact_tiles):
  """8:16 / 16:32: the entropic solver on every kernel; the exact one on a
  sample of tiles (extrapolated: on all of ResNet-50 it takes minutes), and
  the entropic / optimum ratio of the kept |w| per tile on that sample."""
  tiles = jnp.concatenate([to_tiles(w, m) for w in used.values()])
  total = tiles.shape[0]
  fn = jax.jit(lambda ws: transposable_nm_mask_tree(ws, n, m,
                                                    method="entropic"))
  t = time_fn(lambda: fn(used), warmup=1, repeats=repeats)
  report.add(f"entropic T-{n}:{m}", t, target=TARGETS.get(("entropic", n, m)),
             value=t["min"], tiles=total)
  counts = jnp.concatenate([to_tiles(x, m) for x in jax.tree.leaves(fn(used))])
  report.add(f"T-{n}:{m} entropic: exactly n per row and column",
             value=float(jnp.all(counts.sum(1) == n) & jnp.all(counts.sum(2) == n)))
  sample = tiles[:min(exact_tiles, total)]
  mat = from_tiles(sample, (sample.shape[0] * m, m), m)
  solve = {meth: jax.jit(lambda x, meth=meth: transposable_nm_mask(
      x, n, m, method=meth)) for meth in ("exact", "entropic")}
  te = time_fn(lambda: solve["exact"](mat), warmup=1, repeats=1)
  report.add(f"exact T-{n}:{m}, {sample.shape[0]} tiles, extrapolated to all "
             "tiles", value=te["min"] * total / sample.shape[0],
             seconds_sample=te["min"], tiles_timed=sample.shape[0])
  a = jnp.abs(sample)
  kept = {meth: (a * to_tiles(f(mat), m)).sum(axis=(1, 2))
          for meth, f in solve.items()}
  ratio = np.asarray(kept["entropic"] / kept["exact"])
  report.add(f"entropic/optimum T-{n}:{m} per tile", value=float(ratio.mean()),
             worst=float(ratio.min()), p01=float(np.quantile(ratio, 0.01)),
             tiles=int(ratio.size))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="divide every channel count by 8")
  parser.add_argument("--lp-tiles", type=int, default=None,
                      help="tiles timed with the LP for context (0: skip; "
                      "default 20, 3 with --quick)")
  parser.add_argument("--exact-tiles", type=int, default=2048,
                      help="tiles the exact solver is timed on for 8:16 and "
                      "16:32 (extrapolated)")
  args = parser.parse_args(argv)
  scale = 8 if args.quick else 1
  lp_tiles = (3 if args.quick else 20) if args.lp_tiles is None else \
      args.lp_tiles
  repeats = 1 if args.quick else 3
  shapes = resnet50_kernel_shapes(scale=scale)
  key = jax.random.key(0)
  kernels = {name: jax.random.normal(jax.random.fold_in(key, i), shape)
             for i, (name, shape) in enumerate(shapes)}
  total = sum(int(np.prod(s)) for _, s in shapes)
  report = Report("transposable", quick=args.quick, weights=total,
                  kernels=len(shapes))

  all_weights = list(kernels.values())
  elementwise = jax.jit(lambda ws: [jnp.abs(w) * 2.0 for w in ws])
  ref = time_fn(lambda: elementwise(all_weights), repeats=5)
  report.add("elementwise pass over all weights (reference)", ref,
             reference=ref)

  for n, m in ((2, 4), (4, 8)) + LARGE_M:
    large = (n, m) in LARGE_M
    used = {k: w for k, w in kernels.items()
            if w.shape[-2] % m == 0 and w.shape[-1] % m == 0}
    report.meta[f"skipped_kernels_{n}:{m}"] = sorted(set(kernels) - set(used))
    weights = sum(w.size for w in used.values())
    tiles = weights // (m * m)
    masks = {}
    if large:
      large_m(report, used, n, m, repeats, args.exact_tiles)
      continue
    for method in ("exact", "greedy", "greedy_repair"):
      fn = jax.jit(lambda ws, method=method, n=n, m=m:
                   transposable_nm_mask_tree(ws, n, m, method=method))
      t = time_fn(lambda fn=fn: fn(used), warmup=1, repeats=repeats)
      masks[method] = fn(used)
      report.add(f"{method} T-{n}:{m}", t, target=TARGETS.get((method, n, m)),
                 value=t["min"], vs_elementwise=t["min"] / ref["min"],
                 tiles=tiles)

    q = jax.jit(lambda used, masks, n=n, m=m: quality(used, masks, n, m))(
        used, masks)
    q = jax.tree.map(float, q)
    for method in masks:
      report.add(f"T-{n}:{m} {method}: exactly n per row and column",
                 value=q["exact_counts"][method])
    for label, v in q["kept"].items():
      report.add(f"kept |w| fraction {label}", value=v)
    for method in q["ratio_mean"]:
      report.add(f"{method}/optimum T-{n}:{m} per tile",
                 value=q["ratio_mean"][method], worst=q["ratio_min"][method])
    l2 = jax.jit(lambda ws, n=n, m=m: transposable_nm_mask_tree(
        ws, n, m, objective="l2"))(used)
    differ = jax.jit(lambda a, b, m=m: jnp.mean(jnp.concatenate([
        jnp.any(to_tiles(x, m) != to_tiles(y, m), axis=(1, 2))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])))(
            masks["exact"], l2)
    report.add(f"tiles whose exact T-{n}:{m} mask differs, l1 vs l2",
               value=float(differ))

    if lp_tiles:
      first = max(used.values(), key=lambda w: w.size)
      sample = np.abs(np.asarray(to_tiles(first, m)[:lp_tiles], np.float64))
      per = lp_tile_time(sample, n)
      report.add(f"LP (HiGHS) per tile T-{n}:{m}, extrapolated to all tiles",
                 value=per * tiles, seconds_per_tile=per,
                 tiles_timed=len(sample))
  report.write()


if __name__ == "__main__":
  main()
