"""Pure math of the FOO-VB fixed-point updates (no optax, no pytrees).

Online variational Bayes (Zeno et al. 2021) moves a Gaussian posterior
``N(mu, Sigma)`` to the next one with the fixed-point equations

    mu'    = mu - eta * Sigma grad_bar
    Sigma' = X X^T,  X solving  X X^T + V E X^T - V = 0,   V = Sigma,

with Monte-Carlo estimates from K samples ``theta_k = mu + L eps_k``
(``L L^T = Sigma``): ``grad_bar = mean_k g_k`` and ``E = mean_k g_k eps_k^T``.
Multiplying the matrix equation by ``V^-1`` on the left and ``X^-T X^-1`` on
the right shows it is the precision update ``Sigma'^-1 = V^-1 + E X^-1``, where
``E X^-1`` is Stein's estimate of the expected Hessian.

This module holds the array functions: the stable diagonal (BGD) step, the
closed-form solution of the matrix equation, and the covariance mixing used by
damping and forgetting. Everything is jittable and vmappable.

References:
  Zeno, Golan, Hoffer, Soudry, "Task Agnostic Continual Learning Using Online
  Variational Bayes with Fixed-Point Updates", Neural Computation 2021,
  https://arxiv.org/abs/2010.00373
  Zeno, Golan, Hoffer, Soudry, "Bayesian Gradient Descent: Online Variational
  Bayes Learning with Increased Robustness to Catastrophic Forgetting and Weight
  Pruning", https://arxiv.org/abs/1803.10123
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def diagonal_std_update(std: ArrayLike, grad_eps: ArrayLike) -> jax.Array:
  """The BGD standard-deviation step, computed without cancellation or overflow.

  With ``x = std * grad_eps / 2`` the update is

      std' = std * sqrt(1 + x^2) - std * x = std * (sqrt(1 + x^2) - x),

  the positive root of the 1x1 matrix equation ``s^2 + v e s - v = 0``
  (``v = std^2``, ``e = grad_eps``). For ``x >= 0`` it is evaluated as
  ``std / (sqrt(1 + x^2) + x)`` (the direct form rounds to 0 in float32 once
  ``x`` exceeds ~1e4), for ``x < 0`` as ``std * (sqrt(1 + x^2) + |x|)``;
  ``sqrt(1 + x^2)`` is replaced by ``|x|`` where ``x^2`` would overflow. The
  result is clipped to ``[tiny, max]`` of the dtype, so it stays positive and
  finite for any finite input (also on hardware that flushes subnormals).

  Args:
    std: current standard deviations (positive), any float dtype.
    grad_eps: ``mean_k g_k * eps_k``, broadcastable to ``std``.

  Returns:
    The new standard deviations, dtype of ``std``.

  Example:
    >>> diagonal_std_update(jnp.float32(0.1), jnp.float32(1e9))  # no collapse
    Array(1.e-09, dtype=float32)

  References:
    https://arxiv.org/abs/1803.10123 (the BGD update of sigma)
  """
  std = jnp.asarray(std)
  dtype = std.dtype
  info = jnp.finfo(dtype)
  x = std * jnp.asarray(grad_eps, dtype) * 0.5
  a = jnp.abs(x)
  # sqrt(1 + a^2) == a in this dtype long before a^2 overflows: cap a^2 and
  # take the max with a.
  big = float(np.sqrt(info.max)) * 0.5
  root = jnp.maximum(jnp.sqrt(1.0 + jnp.square(jnp.minimum(a, big))), a)
  factor = root + a  # >= 1
  new = jnp.where(x >= 0, std / factor, std * factor)
  return jnp.clip(new, info.tiny, info.max).astype(dtype)


def solve_fixed_point_factor(a: ArrayLike, e: ArrayLike) -> jax.Array:
  """Closed-form ``X`` with ``X X^T + V E X^T - V = 0`` for ``V = A A^T``, from the factor.

  The paper's solution: with ``B = V + (V E)(V E)^T / 4``, any ``L_B`` with
  ``L_B L_B^T = B`` and the SVD ``L_B^-1 V E = S Lambda W^T``,

      X = L_B S W^T - V E / 2.

  Proof sketch: put ``Y = X + V E / 2``; the equation becomes ``Y Y^T = B``
  plus the condition that ``V E Y^T`` be symmetric. ``Y = L_B Q`` with ``Q``
  orthogonal satisfies the first; ``Q = S W^T`` makes ``L_B^-1 V E Q^T =
  S Lambda S^T`` symmetric (positive semi-definite), which gives the second.
  ``X`` does not depend on which ``L_B`` is used.

  Computed here without forming ``V`` and without cancellation:

  * ``B = A (I + F F^T / 4) A^T`` with ``F = A^T E``, so ``L_B = A R`` with ``R``
    the Cholesky factor of ``I + F F^T / 4`` (eigenvalues >= 1: always well
    conditioned), and ``L_B^-1 V E = R^-1 F``;
  * ``X + V E = L_B S (I + Lambda / 2) W^T`` and ``(X + V E) X^T = V`` give
    ``X = A R^-T S (I + Lambda / 2)^-1 W^T``, a product instead of the
    difference above (which cancels catastrophically when ``V E`` is large,
    like the direct BGD form in 1x1).

  So the new factor is the old one times a well-conditioned matrix, and float32
  stays accurate even when ``V`` is badly conditioned (long streams shrink some
  directions a lot).

  This root gives ``X X^T <= V`` (the covariance never grows): ``V - X X^T =
  L_B S (Lambda - Lambda^2 / 2) S^T L_B^T`` and the singular values of
  ``L_B^-1 V E`` are < 2. In 1x1 it is the diagonal formula when ``e >= 0``;
  for ``e < 0`` it picks the root of the opposite sign, whose magnitude is the
  shrinking one (see :func:`diagonal_std_update` for the growing root).

  Args:
    a: ``(n, n)`` invertible square-root factor of the old covariance.
    e: ``(n, n)`` matrix, ``mean_k g_k eps_k^T``.

  Returns:
    ``X``, ``(n, n)``, used as the square-root factor of the new covariance.

  Example:
    >>> a = jnp.array([[1.0, 0.0], [0.5, 2.0]])
    >>> e = jnp.array([[1.0, 0.2], [0.0, 0.5]])
    >>> x = solve_fixed_point_factor(a, e)
    >>> bool(jnp.allclose(fixed_point_residual(x, a @ a.T, e), 0.0, atol=1e-5))
    True

  References:
    https://arxiv.org/abs/2010.00373 (section 3, the matrix equation and its
    solution)
  """
  a = jnp.asarray(a)
  e = jnp.asarray(e, a.dtype)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or e.shape != a.shape:
    raise ValueError(f"solve_fixed_point_factor needs square a and e of the same "
                     f"shape, got a.shape={a.shape}, e.shape={e.shape}.")
  n = a.shape[0]
  f = a.T @ e
  m = jnp.eye(n, dtype=a.dtype) + 0.25 * (f @ f.T)
  r = jnp.linalg.cholesky(0.5 * (m + m.T))
  c = jax.scipy.linalg.solve_triangular(r, f, lower=True)
  s, lam, wt = jnp.linalg.svd(c)
  t = jax.scipy.linalg.solve_triangular(r, s, lower=True, trans="T")
  return a @ ((t / (1.0 + 0.5 * lam)[None, :]) @ wt)


def fixed_point_factor(a: ArrayLike, e: ArrayLike) -> jax.Array:
  """The new covariance factor ``A h(G)``: one SVD, canonical.

  The covariance of the FOO-VB update, ``X X^T`` for ``X`` from
  :func:`solve_fixed_point_factor`, in closed form: with ``F = A^T E / 2``
  and ``G = F F^T``,

      X X^T = A h(G)^2 A^T,   h(G) = (sqrt(I + G) + sqrt(G))^-1,

  so ``A h(G)`` is a square-root factor of the same covariance. Proof: with
  ``M = I + G = R R^T`` and ``C = R^-1 (2 F) = S Lambda W^T``, ``C C^T = 4 (I
  - (R^T R)^-1)``, so ``S`` diagonalises ``R^T R`` and ``X X^T = A R^-T S (I +
  Lambda / 2)^-2 S^T R^-1 A^T = A phi(M) M^-1 A^T`` (``R^-T (R^T R)^k R^-1 =
  M^(k-1)``) with ``phi(mu) / mu = (sqrt(mu) + sqrt(mu - 1))^-2``.

  Why this factor:

  * it is canonical: with ``F = U diag(s) W^T``, ``h(G) = U diag(1 / (sqrt(1
    + s^2) + s)) U^T`` does not depend on which singular vectors LAPACK
    returns (signs, rotations inside repeated singular values), so the factor
    -- and every sample drawn with it -- is the same batched, unbatched,
    vmapped or sharded, up to rounding. The paper's root
    :func:`solve_fixed_point_factor` is not: its SVD's rotation leaks into
    ``X``;
  * it is cheaper: one SVD and two products instead of a Cholesky
    factorisation, two triangular solves and an SVD;
  * it is accurate: the singular values of ``F`` are computed from ``F``
    (error ``eps ||F||``), never as square roots of the eigenvalues of ``G``
    (error ``sqrt(eps ||G||)``, which would shrink the directions that no
    gradient reaches a little at every step);
  * ``h(G)`` has eigenvalues ``1 / (sqrt(1 + s^2) + s)`` in ``(0, 1]``: the
    covariance never grows, and the new factor is the old one times a
    well-conditioned matrix (float32 stays accurate on long streams).

  Args:
    a: ``(n, n)`` square-root factor of the old covariance.
    e: ``(n, n)`` matrix, ``mean_k g_k eps_k^T``.

  Returns:
    ``(n, n)`` factor ``X`` with ``X X^T`` the FOO-VB covariance update (in
    at least float32).

  Example:
    >>> a = jnp.array([[1.0, 0.0], [0.5, 2.0]])
    >>> e = jnp.array([[1.0, 0.2], [0.0, 0.5]])
    >>> x = fixed_point_factor(a, e)
    >>> y = solve_fixed_point_factor(a, e)
    >>> bool(jnp.allclose(x @ x.T, y @ y.T, atol=1e-5))
    True

  References:
    https://arxiv.org/abs/2010.00373 (section 3, the matrix equation)
  """
  a = jnp.asarray(a)
  a = a.astype(jnp.promote_types(a.dtype, jnp.float32))   # LAPACK: f32/f64
  e = jnp.asarray(e, a.dtype)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or e.shape != a.shape:
    raise ValueError(f"fixed_point_factor needs square a and e of the same "
                     f"shape, got a.shape={a.shape}, e.shape={e.shape}.")
  u, s, _ = jnp.linalg.svd(0.5 * (a.T @ e), full_matrices=False)
  return a @ ((u / (jnp.hypot(1.0, s) + s)) @ u.T)


def solve_fixed_point(v: ArrayLike, e: ArrayLike) -> jax.Array:
  """Closed-form ``X`` with ``X X^T + V E X^T - V = 0`` (V symmetric positive definite).

  :func:`solve_fixed_point_factor` applied to the Cholesky factor of ``V``
  (the solution is unique, whichever factor is used). Prefer the factor form
  when a factor is at hand: the Cholesky factorisation of a badly conditioned
  ``V`` fails in float32 (cond(V) = 1e10 gives NaN) where the factor form does
  not.

  Args:
    v: ``(n, n)`` symmetric positive-definite matrix (the old covariance).
    e: ``(n, n)`` matrix, ``mean_k g_k eps_k^T``.

  Returns:
    ``X``, ``(n, n)``.

  Example:
    >>> v = jnp.eye(2)
    >>> e = jnp.array([[1.0, 0.2], [0.0, 0.5]])
    >>> x = solve_fixed_point(v, e)
    >>> bool(jnp.allclose(x @ x.T + v @ e @ x.T - v, 0.0, atol=1e-5))
    True

  References:
    https://arxiv.org/abs/2010.00373 (section 3)
  """
  v = jnp.asarray(v)
  e = jnp.asarray(e, v.dtype)
  if v.ndim != 2 or v.shape[0] != v.shape[1] or e.shape != v.shape:
    raise ValueError(f"solve_fixed_point needs square v and e of the same shape, "
                     f"got v.shape={v.shape}, e.shape={e.shape}.")
  return solve_fixed_point_factor(jnp.linalg.cholesky(0.5 * (v + v.T)), e)


def fixed_point_residual(x: ArrayLike, v: ArrayLike, e: ArrayLike) -> jax.Array:
  """``X X^T + V E X^T - V`` (zero at a solution of the FOO-VB matrix equation).

  Args:
    x: ``(n, n)`` candidate solution.
    v: ``(n, n)`` old covariance.
    e: ``(n, n)`` ``mean_k g_k eps_k^T``.

  Returns:
    The ``(n, n)`` residual matrix.

  Example:
    >>> fixed_point_residual(jnp.eye(2), jnp.eye(2), jnp.zeros((2, 2)))
    Array([[0., 0.],
           [0., 0.]], dtype=float32)
  """
  x, v, e = jnp.asarray(x), jnp.asarray(v), jnp.asarray(e)
  return x @ x.T + v @ e @ x.T - v


def mix_scale(scale: ArrayLike, target_cov: ArrayLike,
              weight: ArrayLike) -> jax.Array:
  """Cholesky factor of ``(1 - w) scale scale^T + w target_cov``.

  Used for damping (``target_cov`` = the fixed-point map's covariance) and for
  forgetting (``target_cov`` = the initial covariance).

  Args:
    scale: ``(n, n)`` square-root factor of the current covariance.
    target_cov: ``(n, n)`` symmetric positive semi-definite matrix.
    weight: mixing weight ``w`` in ``[0, 1]``.

  Returns:
    A lower-triangular ``(n, n)`` factor of the mixed covariance.

  Example:
    >>> mix_scale(jnp.eye(2), 4.0 * jnp.eye(2), 0.5)[0, 0]
    Array(1.5811388, dtype=float32)
  """
  scale = jnp.asarray(scale)
  cov = (1.0 - weight) * (scale @ scale.T) + weight * jnp.asarray(target_cov)
  return jnp.linalg.cholesky(0.5 * (cov + cov.T))


def mix_std(std: ArrayLike, target_var: ArrayLike, weight: ArrayLike) -> jax.Array:
  """``sqrt((1 - w) std^2 + w target_var)``: :func:`mix_scale` for diagonal covariances.

  Args:
    std: current standard deviations.
    target_var: variances to mix in (broadcastable).
    weight: mixing weight ``w`` in ``[0, 1]``.

  Returns:
    The mixed standard deviations, dtype of ``std``.

  Example:
    >>> mix_std(jnp.float32(1.0), 4.0, 0.5)
    Array(1.5811388, dtype=float32)
  """
  std = jnp.asarray(std)
  return jnp.sqrt((1.0 - weight) * std * std + weight * target_var).astype(std.dtype)
