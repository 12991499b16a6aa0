"""Per-layer sparsity diagnostics: achieved sparsity, kept mass, flip rate."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_jax._core import states
from sparse_jax._core import trees
from sparse_jax._core.nm_schedule import NMMaskState


def find_mask_states(opt_state) -> list[Any]:
  """Every N:M mask state in an opt state, in tree order.

  The state of :func:`nm_projection`, :func:`sr_ste` and (inside its
  ``FooVBNMState``) :func:`~sparse_jax.bayes.foovb_nm_projection`: one type,
  :class:`~sparse_jax.sparsity.NMProjectionState`. ``opt_state`` may also be
  an ``nnx.Optimizer``.
  """
  return states.find_all(opt_state, NMMaskState)


def sparsity_diagnostics(params, opt_state) -> dict[str, dict[str, jax.Array]]:
  """Per pruned layer: achieved sparsity, kept-magnitude ratio, flip rate.

  Args:
    params: current params.
    opt_state: the optimizer state holding (anywhere inside, e.g. in an
      ``optax.chain``) the state of ``nm_projection``, ``sr_ste`` or
      ``foovb_nm_projection``.
      With several, the first one found is used.

  Returns:
    ``{path: {"sparsity", "mask_sparsity", "kept_mass", "flip_rate",
    "nonfinite"}}`` of
    float32 scalars for each pruned leaf (path as ``jax.tree_util.keystr``
    without a trailing ``.value``)
    and ``"all"``, their size-weighted means. ``sparsity``: fraction of exact
    zeros in the params (the achieved sparsity; ~0 for the dense params STE
    trains). ``mask_sparsity``: fraction of False in the mask. ``kept_mass``:
    fraction of ``sum |w|`` the mask kept when it was last computed.
    ``flip_rate``: fraction of mask entries changed at the last mask update.
    ``nonfinite``: fraction of NaN / inf entries in the params (the masks
    rank NaN as the smallest magnitude and ``kept_mass`` counts non-finite
    entries as 0; an additive optax update cannot turn a NaN weight back into
    a number, so it stays NaN even where it is pruned).

  Raises:
    ValueError: if ``opt_state`` holds no such state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sparse_jax.sparsity import nm_projection, sparsity_diagnostics
    >>> params = {"kernel": jnp.arange(1., 9.).reshape(8, 1)}
    >>> tx = nm_projection(1, 4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"kernel": jnp.zeros((8, 1))}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> d = sparsity_diagnostics(params, state)
    >>> float(d["['kernel']"]["sparsity"])
    0.75
    >>> round(float(d["all"]["kept_mass"]), 3)  # (4 + 8) / 36
    0.333

  References:
    Zhou et al., ICLR 2021, https://arxiv.org/abs/2102.04010 (flip rate as a
    training diagnostic).
  """
  states = find_mask_states(opt_state)
  if not states:
    raise ValueError("sparsity_diagnostics: opt_state holds no "
                     "NMProjectionState (the state of nm_projection, sr_ste "
                     "or foovb_nm_projection).")
  state = states[0]
  flat = trees.flatten(params)[0]
  masks = trees.leaves(state.masks)
  kept = trees.leaves(state.kept_mass)
  flips = trees.leaves(state.flip_rate)
  if len(masks) != len(flat):
    raise ValueError("sparsity_diagnostics: the state's masks do not match "
                     "the structure of params.")
  out = {}
  sizes, totals = [], {k: [] for k in ("sparsity", "mask_sparsity",
                                       "kept_mass", "flip_rate", "nonfinite")}
  for (path, w), mk, km, fr in zip(flat, masks, kept, flips):
    if trees.is_masked(mk) or trees.is_masked(w):
      continue
    row = {
        "sparsity": jnp.mean((w == 0).astype(jnp.float32)),
        "mask_sparsity": 1.0 - jnp.mean(mk.astype(jnp.float32)),
        "kept_mass": jnp.asarray(km, jnp.float32),
        "flip_rate": jnp.asarray(fr, jnp.float32),
        "nonfinite": jnp.mean((~jnp.isfinite(w)).astype(jnp.float32)),
    }
    out[trees.path_str(path)] = row
    sizes.append(w.size)
    for k, v in row.items():
      totals[k].append(v)
  if sizes:
    weights = jnp.asarray(sizes, jnp.float32) / sum(sizes)
    out["all"] = {k: jnp.sum(weights * jnp.stack(v)) for k, v in totals.items()}
  return out
