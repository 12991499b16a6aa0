"""Pure math of the matrix-variate (Kronecker) FOO-VB posterior, Flax layout.

A weight matrix ``W`` of shape ``(n, p)`` -- a Flax Dense kernel ``(in, out)``,
or a Conv kernel ``(H, W, in, out)`` read as ``(H*W*in, out)``, with the
layer's bias appended as an extra last row -- has the posterior

    W = M + A Phi B^T,     Phi ~ N(0, 1) of shape (n, p),

so ``A`` (``n x n``) correlates the inputs (rows) and ``B`` (``p x p``) the
outputs (columns), and with the row-major ``vec`` that numpy's
``reshape(-1)`` uses, ``cov(vec W) = (A A^T) kron (B B^T)``.

Derivation of the updates for this layout. The paper (and its reference
code) stores ``W_ref`` as ``(out, in + 1)`` with ``W_ref = M_ref + B_ref Phi_ref
A_ref^T``, ``A_ref`` over the ``in + 1`` inputs and ``B_ref`` over the outputs.
Our ``W`` is ``W_ref^T`` so ``W = M + A_ref Phi_ref^T B_ref^T``: with ``Phi =
Phi_ref^T`` (again standard normal) the factors keep their roles, ``A =
A_ref`` and ``B = B_ref``. The gradient ``Psi = dL/dW = Psi_ref^T``. Writing
the paper's three updates with ``Psi_ref = Psi^T``, ``Phi_ref = Phi^T``:

    M_ref - eta B B^T Psi_ref A A^T        ->  M - eta A A^T mean[Psi] B B^T
    E_A = mean[Psi_ref^T B Phi_ref] / P   ->  E_A = mean[Psi B Phi^T] / p   (n x n)
    E_B = mean[Psi_ref A Phi_ref^T] / N   ->  E_B = mean[Psi^T A Phi] / n   (p x p)

and ``A' = X(V = A A^T, E_A)``, ``B' = X(V = B B^T, E_B)`` with the matrix
equation of :func:`sparse_jax.bayes.fixed_point.solve_fixed_point_factor`
(the transform keeps the canonical factor of that covariance,
:func:`~sparse_jax.bayes.fixed_point.fixed_point_factor`); ``A`` and ``B``
are both updated from the old values. Check (Stein's lemma): for
``L = tr(H_A W H_B W^T) / 2``, ``E[E_A] = H_A A tr(B^T H_B B) / p``, the row
curvature scaled by the mean column curvature seen through ``B``.

References:
  Zeno, Golan, Hoffer, Soudry, "Task Agnostic Continual Learning Using Online
  Variational Bayes with Fixed-Point Updates", Neural Computation 2021,
  https://arxiv.org/abs/2010.00373 (section 4, matrix-variate Gaussian)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def kron_sample(mean: ArrayLike, a: ArrayLike, b: ArrayLike,
                phi: ArrayLike) -> jax.Array:
  """``M + A Phi B^T`` (batched over the leading axes of ``phi``).

  Args:
    mean: ``(n, p)`` mean ``M``.
    a: ``(n, n)`` input-side factor.
    b: ``(p, p)`` output-side factor.
    phi: ``(..., n, p)`` standard-normal noise.

  Returns:
    Samples of shape ``phi.shape``.

  Example:
    >>> kron_sample(jnp.zeros((2, 3)), jnp.eye(2), jnp.eye(3), jnp.ones((2, 3)))
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  return jnp.asarray(mean) + jnp.asarray(a) @ jnp.asarray(phi) @ jnp.asarray(b).T


def kron_statistics(psi: ArrayLike, phi: ArrayLike, a: ArrayLike,
                    b: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Monte-Carlo statistics ``(mean[Psi], E_A, E_B)`` of K gradient samples.

  Args:
    psi: ``(K, n, p)`` gradients at the samples ``M + A Phi_k B^T``.
    phi: ``(K, n, p)`` the noise those samples were drawn with.
    a: ``(n, n)`` input-side factor used for sampling.
    b: ``(p, p)`` output-side factor used for sampling.

  Returns:
    ``psi_bar`` ``(n, p)``, ``e_a = mean_k Psi_k B Phi_k^T / p`` ``(n, n)`` and
    ``e_b = mean_k Psi_k^T A Phi_k / n`` ``(p, p)``.

  Example:
    >>> k, n, p = 4, 3, 2
    >>> psi = jnp.ones((k, n, p)); phi = jnp.ones((k, n, p))
    >>> [x.shape for x in kron_statistics(psi, phi, jnp.eye(n), jnp.eye(p))]
    [(3, 2), (3, 3), (2, 2)]
  """
  psi, phi = jnp.asarray(psi), jnp.asarray(phi)
  a, b = jnp.asarray(a), jnp.asarray(b)
  k, n, p = psi.shape
  phi_bt = phi @ b.T          # (K, n, p): Phi_k B^T
  a_phi = a @ phi             # (K, n, p): A Phi_k
  e_a = jnp.einsum("kip,kjp->ij", psi, phi_bt) / (k * p)
  e_b = jnp.einsum("kni,knj->ij", psi, a_phi) / (k * n)
  # A weighted sum (gemv) instead of psi.mean(0): XLA's CPU reduction over a
  # leading axis is much slower.
  psi_bar = jnp.tensordot(jnp.full((k,), 1.0 / k, psi.dtype), psi, axes=1)
  return psi_bar, e_a, e_b


def kron_mean_step(mean: ArrayLike, a: ArrayLike, b: ArrayLike,
                   psi_bar: ArrayLike, eta: ArrayLike) -> jax.Array:
  """``M - eta A A^T psi_bar B B^T`` (the covariance-preconditioned mean step).

  Args:
    mean: ``(n, p)`` mean ``M`` (of the prior of this step).
    a: ``(n, n)`` input-side factor of the prior.
    b: ``(p, p)`` output-side factor of the prior.
    psi_bar: ``(n, p)`` mean gradient.
    eta: step size on the mean.

  Returns:
    The new ``(n, p)`` mean.

  Example:
    >>> kron_mean_step(jnp.ones((2, 2)), jnp.eye(2), 2 * jnp.eye(2), jnp.ones((2, 2)), 1.0)
    Array([[-3., -3.],
           [-3., -3.]], dtype=float32)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  # A (A^T psi_bar B) B^T: the covariances are never formed.
  return jnp.asarray(mean) - eta * (a @ ((a.T @ jnp.asarray(psi_bar)) @ b) @ b.T)


def kron_covariance(a: ArrayLike, b: ArrayLike) -> jax.Array:
  """``(A A^T) kron (B B^T)``: the covariance of ``W.reshape(-1)`` (row-major).

  Args:
    a: ``(n, n)`` input-side factor.
    b: ``(p, p)`` output-side factor.

  Returns:
    The ``(n p, n p)`` covariance matrix.

  Example:
    >>> kron_covariance(jnp.eye(2), 3 * jnp.eye(1))
    Array([[9., 0.],
           [0., 9.]], dtype=float32)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  return jnp.kron(a @ a.T, b @ b.T)


def alpha_split_scale(fan_in: int, alpha: float) -> float:
  """Diagonal value ``c`` of ``A = B = c I`` in the paper's alpha-split init.

  The prior variance ``2 / (fan_in + 2)`` of an entry is split: a fraction
  ``alpha`` goes to the spread of the mean (``M ~ N(0, 2 alpha / (fan_in +
  2))``) and ``1 - alpha`` to the posterior variance ``c^4``.

  Args:
    fan_in: number of inputs of the layer (without the bias row).
    alpha: split in ``(0, 1)``.

  Returns:
    ``c = (2 (1 - alpha) / (fan_in + 2)) ** (1/4)``.

  Example:
    >>> round(alpha_split_scale(98, 0.5) ** 4, 6)
    0.01
  """
  return (2.0 * (1.0 - alpha) / (fan_in + 2.0)) ** 0.25
