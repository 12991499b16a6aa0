"""Forward + backward of an NMDense layer, as a ratio to a dense nnx.Linear.

    python -m benchmarks.nm_dense [--quick]

Same shapes, same batch: the gradient of ``sum(layer(x) ** 2)`` with respect
to the input and the kernel, for 2:4 transposable, 2:4 plain and 4:8
transposable masks (mask fixed, as between two ``update_mask`` calls). On
every platform today the product is the masked dense fallback (JAX has no N:M
sparse matmul), so the ratio measures the fallback's overhead (one select per
product), not a sparse-kernel speed-up; on a GPU with a 2:4 kernel plugged in
as ``backend`` the same script measures the kernel.
Writes benchmarks/results/nm_dense.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import Report, time_fn
from sparse_jax.models import NMDense

SHAPES = {"4096 x 2048 -> 2048": (4096, 2048, 2048),
          "1024 x 4096 -> 4096": (1024, 4096, 4096)}
PATTERNS = {"T-2:4": (2, 4, True), "2:4": (2, 4, False), "T-4:8": (4, 8, True)}


def _fwd_bwd(layer: nnx.Module):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def grads(params, rest, x):
    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)
    return jax.grad(loss, (0, 1))(params, x)
  return lambda x: grads(params, rest, x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  repeats = 3 if args.quick else 15
  report = Report("nm_dense")
  rng = np.random.default_rng(0)
  for label, (batch, d_in, d_out) in SHAPES.items():
    if args.quick and d_in > 2048:
      continue
    x = jnp.asarray(rng.normal(size=(batch, d_in)).astype(np.float32))
    dense = _fwd_bwd(nnx.Linear(d_in, d_out, rngs=nnx.Rngs(0)))
    t_dense = time_fn(lambda: dense(x), repeats=repeats)
    report.add(f"{label}: dense fwd+bwd", t_dense, reference=t_dense)
    for pattern, (n, m, transposable) in PATTERNS.items():
      fn = _fwd_bwd(NMDense(d_in, d_out, n=n, m=m, transposable=transposable,
                            rngs=nnx.Rngs(0)))
      t = time_fn(lambda: fn(x), repeats=repeats)
      report.add(f"{label}: {pattern} NMDense fwd+bwd ({jax.default_backend()}"
                 " masked dense)", t, reference=t_dense)
  report.write()


if __name__ == "__main__":
  main()
