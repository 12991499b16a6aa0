"""Sparsity schedules: how many of every m entries are kept at a given step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sparse_jax._core import checks


def nm_schedule(n: int, m: int, *, start_step: int, end_step: int,
                power: float = 3.0) -> Callable[[jax.typing.ArrayLike],
                                                jax.Array]:
  """Gradual N:M pruning: ``n_t`` goes from ``m`` (dense) down to ``n``.

  ``n_t = ceil(n + (m - n) * (1 - frac) ** power)`` with ``frac`` the clipped
  progress from ``start_step`` to ``end_step``: dense before ``start_step``,
  ``n`` from ``end_step`` on (``power=3`` is the cubic schedule of Zhu & Gupta;
  ``power=1`` is linear). Pass it as the ``n`` of :func:`nm_projection`.

  Args:
    n: final number KEPT per group.
    m: group size.
    start_step: last dense step.
    end_step: first step at the final ``n`` (``> start_step``).
    power: shape of the decay.

  Returns:
    A schedule ``count -> int32 n_t``.

  Example:
    >>> from sparse_jax.sparsity import nm_schedule
    >>> sched = nm_schedule(2, 8, start_step=0, end_step=10, power=1.0)
    >>> [int(sched(t)) for t in (0, 5, 10, 20)]
    [8, 5, 2, 2]

  References:
    Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878;
    Zhou et al., ICLR 2021, https://arxiv.org/abs/2102.04010.
  """
  n, m = checks.check_nm(n, m, who="nm_schedule")
  if not (isinstance(start_step, int) and isinstance(end_step, int)
          and 0 <= start_step < end_step):
    raise ValueError("need integer steps with 0 <= start_step < end_step, got "
                     f"start_step={start_step!r}, end_step={end_step!r}.")
  if not power > 0:
    raise ValueError(f"power must be > 0, got {power!r}.")

  def schedule(count):
    frac = (jnp.asarray(count, jnp.float32) - start_step) / (end_step -
                                                             start_step)
    frac = jnp.clip(frac, 0.0, 1.0)
    value = n + (m - n) * (1.0 - frac) ** power
    # a small slack so exact integers are not pushed up by rounding error.
    return jnp.clip(jnp.ceil(value - 1e-4), n, m).astype(jnp.int32)

  return schedule
