"""The base experiment config every ``configs/*.py`` file starts from."""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All sections and defaults a config may set (dense MLP on digits).

  Sections: ``data`` (see ``sparse_jax.data.load_dataset``), ``model`` (``name`` + the
  model's keyword arguments), ``optimizer`` (see
  ``sparse_jax.training.optim.build_optimizer``), ``train`` (loop knobs).
  """
  c = ml_collections.ConfigDict()
  c.name = "mlp_digits"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(name="digits", num_train=1400, split_seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(200, 200)))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=0,
      decay_steps=0, decay_factor=0.1, kwargs={}, pre=(), post=()))
  c.train = ml_collections.ConfigDict(dict(
      step="standard", loss_reduction="mean", forward=(), num_steps=3000, batch_size=64,
      log_every=100, eval_every=500, checkpoint_every=1000, eval_batch_size=1000,
      train_eval_examples=10_000, progress_every_secs=10.0))
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config so it runs end-to-end in seconds (what the tests launch)."""
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  c.train.progress_every_secs = 0.0
  c.train.batch_size = min(c.train.batch_size, 32)


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]]
                   ) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants named in ``arg`` (``configs/x.py:arg``).

  ``smoke`` is always available. Unknown names raise a ValueError listing the known.
  """
  table = {"smoke": smoke, **variants}
  for name in filter(None, (arg or "").split(",")):
    if name not in table:
      raise ValueError(f"unknown config variant {name!r}; known: {sorted(table)}")
    table[name](c)
  return c
