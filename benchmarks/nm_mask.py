"""N:M mask + projection speed on a 16M-weight array, as ratios.

Rows: ``nm_prune`` (mask + projection) for 2:4, 4:8 and 1:4 against ONE
elementwise pass over the same array (target <= 1.5x for 2:4), and a
double-argsort mask against the fused rank kernel (target >= 50x slower).
``lax.top_k`` over the groups is shown for context.

Run from the repository root::

    python -m benchmarks.nm_mask           # 4096 x 4096 float32 (16.8M)
    python -m benchmarks.nm_mask --quick   # 1024 x 1024, seconds

Writes ``benchmarks/results/nm_mask.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.timing import Report, time_fn
from sparse_jax.masks import nm_mask, nm_prune


def argsort_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  """The common reference: rank by a double argsort inside each group."""
  groups = jnp.moveaxis(w, -2, -1).reshape(-1, m)
  order = jnp.argsort(-jnp.abs(groups), axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  mask = (ranks < n).reshape(w.shape[:-2] + (w.shape[-1], w.shape[-2]))
  return jnp.moveaxis(mask, -1, -2)


def top_k_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  """``lax.top_k`` over each group, scattered back to a mask."""
  groups = jnp.moveaxis(w, -2, -1).reshape(-1, m)
  _, idx = lax.top_k(jnp.abs(groups), n)
  mask = jnp.zeros(groups.shape, bool).at[
      jnp.arange(groups.shape[0])[:, None], idx].set(True)
  mask = mask.reshape(w.shape[:-2] + (w.shape[-1], w.shape[-2]))
  return jnp.moveaxis(mask, -1, -2)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1024 x 1024 instead of 4096 x 4096")
  args = parser.parse_args(argv)
  size = 1024 if args.quick else 4096
  x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  report = Report("nm_mask", shape=[size, size], elements=size * size,
                  quick=args.quick)

  elementwise = jax.jit(lambda w: jnp.abs(w) * 2.0)
  ref = time_fn(lambda: elementwise(x), repeats=20)
  report.add("elementwise |w|*2 (reference)", ref, reference=ref)

  fused = {}
  for n, m in ((2, 4), (4, 8), (1, 4)):
    prune = jax.jit(lambda w, n=n, m=m: nm_prune(w, n, m))
    t = time_fn(lambda prune=prune: prune(x), repeats=20)
    fused[(n, m)] = t
    report.add(f"nm_prune {n}:{m} (mask + projection)", t, reference=ref,
               target=1.5 if (n, m) == (2, 4) else None)
    mask_only = jax.jit(lambda w, n=n, m=m: nm_mask(w, n, m))
    report.add(f"nm_mask {n}:{m} (mask only)",
               time_fn(lambda f=mask_only: f(x), repeats=20), reference=ref)

  xb = x.astype(jnp.bfloat16)
  ref_b = time_fn(lambda: elementwise(xb), repeats=20)
  prune_b = jax.jit(lambda w: nm_prune(w, 2, 4))
  report.add("nm_prune 2:4 bf16 (vs bf16 elementwise)",
             time_fn(lambda: prune_b(xb), repeats=20), reference=ref_b)

  # the slow references: the ratio is reference time / fused time (>= 50x).
  for n, m in ((2, 4), (4, 8)):
    check = jax.jit(lambda w, n=n, m=m: jnp.all(argsort_mask(w, n, m)
                                                 == nm_mask(w, n, m)))
    assert bool(check(x[:256])), "argsort reference disagrees with nm_mask"
    slow = jax.jit(lambda w, n=n, m=m: jnp.where(argsort_mask(w, n, m), w, 0))
    t_slow = time_fn(lambda slow=slow: slow(x), warmup=1, repeats=3)
    report.add(f"double-argsort prune {n}:{m} / nm_prune {n}:{m}", t_slow,
               reference=fused[(n, m)], target=50.0, target_kind="min")
    topk = jax.jit(lambda w, n=n, m=m: jnp.where(top_k_mask(w, n, m), w, 0))
    report.add(f"lax.top_k prune {n}:{m} / nm_prune {n}:{m}",
               time_fn(lambda topk=topk: topk(x), warmup=1, repeats=3),
               reference=fused[(n, m)])
  report.write()


if __name__ == "__main__":
  main()
