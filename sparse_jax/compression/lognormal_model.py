"""The lognormal pruning threshold of Chmiel et al. (pure math, no optax).

Model: the non-zero magnitudes are lognormal, ``ln|g| ~ N(mu, sigma^2)``.
Write the threshold as ``tau = exp(mu) * a``. Then

* deterministic pruning (zero every ``|g| < tau``) leaves a fraction
  ``Phi(ln a / sigma)`` of the non-zero entries at zero, so the target is hit
  by the closed form ``ln a = sigma * Phi^-1(S)``;
* stochastic pruning (``|g| < tau`` becomes ``tau * sign(g)`` with
  probability ``|g| / tau``, else 0; unbiased) leaves a fraction
  ``F(a) = Phi(ln a / sigma) - exp(sigma^2 / 2) / a * Phi((ln a - sigma^2) / sigma)``
  at zero (``F(a) = E[(1 - |g| / tau)^+]``, increasing in ``a``), solved for
  ``a`` by bisection on ``ln a`` in ``[-9, 20]`` with a fixed number of steps.

Entries that are already zero (fraction ``s0``) are taken into account by
aiming at ``S' = (S - s0) / (1 - s0)`` among the non-zero ones.

References:
  Chmiel et al., "Neural gradients are near-lognormal: improved quantized and
  sparse training", ICLR 2021, https://arxiv.org/abs/2006.08173
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special

# Bracket of ln(a) from the paper, and the bisection steps that shrink it
# (29 units) to below float32 resolution.
LOG_A_BRACKET = (-9.0, 20.0)
BISECTION_STEPS = 40


class LognormalFit(NamedTuple):
  """Statistics of a gradient under the lognormal model."""
  mu: jax.Array          # mean of ln|g| over the non-zero entries
  sigma: jax.Array       # std of ln|g| over the non-zero entries
  zero_fraction: jax.Array  # fraction of entries that are exactly zero


def fit_lognormal(x: jax.typing.ArrayLike) -> LognormalFit:
  """Fits ``mu, sigma`` of ``ln|x|`` over the non-zero entries of ``x``.

  Args:
    x: any array (flattened); NaN and inf are not expected.

  Returns:
    A :class:`LognormalFit` of float32 scalars; ``mu = sigma = 0`` when every
    entry is zero.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.exp(0.5 + 2.0 * jax.random.normal(jax.random.key(0), (10**5,)))
    >>> fit = fit_lognormal(g)
    >>> round(float(fit.mu), 1), round(float(fit.sigma), 1)
    (0.5, 2.0)
  """
  a = jnp.abs(jnp.ravel(jnp.asarray(x))).astype(jnp.float32)
  nonzero = a > 0
  count = jnp.sum(nonzero)
  safe = jnp.maximum(count, 1).astype(jnp.float32)
  log_a = jnp.where(nonzero, jnp.log(jnp.where(nonzero, a, 1.0)), 0.0)
  mu = jnp.sum(log_a) / safe
  var = jnp.sum(jnp.where(nonzero, (log_a - mu) ** 2, 0.0)) / safe
  zero_fraction = 1.0 - count.astype(jnp.float32) / max(a.size, 1)
  return LognormalFit(mu, jnp.sqrt(var), zero_fraction)


def stochastic_zero_fraction(log_a: jax.typing.ArrayLike,
                             sigma: jax.typing.ArrayLike) -> jax.Array:
  """``F(a)``: the expected fraction of zeros after stochastic pruning.

  Computed in log space so that ``exp(sigma^2 / 2) / a`` cannot overflow.

  Args:
    log_a: ``ln(tau / exp(mu))``.
    sigma: std of ``ln|g|`` (> 0).

  Returns:
    ``Phi(ln a / sigma) - exp(sigma^2/2 - ln a + log Phi((ln a - sigma^2)/sigma))``.
  """
  log_a = jnp.asarray(log_a, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  kept_mass = jnp.exp(sigma ** 2 / 2 - log_a
                      + special.log_ndtr((log_a - sigma ** 2) / sigma))
  return special.ndtr(log_a / sigma) - kept_mass


def lognormal_threshold(fit: LognormalFit, sparsity: jax.typing.ArrayLike, *,
                        stochastic: bool = False) -> jax.Array:
  """The threshold ``tau`` that prunes a lognormal gradient to ``sparsity``.

  Args:
    fit: the result of :func:`fit_lognormal`.
    sparsity: target fraction of zeros in ``[0, 1)`` (after pruning).
    stochastic: solve for stochastic (unbiased) pruning instead of plain
      thresholding.

  Returns:
    A float32 scalar ``tau``: 0 when the target is already met by the zeros,
    ``inf`` when every entry is zero.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.exp(2.0 * jax.random.normal(jax.random.key(0), (10**6,)))
    >>> tau = lognormal_threshold(fit_lognormal(g), 0.99)
    >>> round(float(jnp.mean(g < tau)), 2)
    0.99
  """
  sparsity = jnp.asarray(sparsity, jnp.float32)
  s0 = fit.zero_fraction
  target = jnp.clip((sparsity - s0) / jnp.maximum(1.0 - s0, 1e-12), 0.0, 1.0)
  sigma = jnp.maximum(fit.sigma, 1e-6)
  if stochastic:
    def body(_, bracket):
      lo, hi = bracket
      mid = 0.5 * (lo + hi)
      below = stochastic_zero_fraction(mid, sigma) < target
      return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0, BISECTION_STEPS, body,
        (jnp.float32(LOG_A_BRACKET[0]), jnp.float32(LOG_A_BRACKET[1])))
    log_a = 0.5 * (lo + hi)
  else:
    log_a = jnp.clip(sigma * special.ndtri(jnp.clip(target, 1e-7, 1 - 1e-7)),
                     *LOG_A_BRACKET)
  tau = jnp.exp(fit.mu + log_a)
  tau = jnp.where(target <= 0.0, 0.0, tau)
  return jnp.where(s0 >= 1.0, jnp.inf, tau)
