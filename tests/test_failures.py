"""Honest failures: NaN / inf policies, input validation, config validation,
and one-line bad launches (issue: durable runs and honest failures)."""

import gzip
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparse_jax as sj
from sparse_jax.bayes import accuracy, expected_calibration_error, foovb
from sparse_jax.bayes import negative_log_likelihood
from sparse_jax.compression import error_feedback, powersgd, top_k
from sparse_jax.data import load_cifar10, load_mnist
from sparse_jax.sparsity import nm_projection, sparsity_diagnostics
from sparse_jax.training.config import base_config, smoke, validate

from _launch import launch
from test_data import _write_cifar, _write_idx
from test_durability import _corrupt
from test_training import _config

NAN = float("nan")


# ------------------------------------------------------- NaN / inf policies


def _ef_run(variant, grads, **kwargs):
  tx = error_feedback(top_k(0.25), variant=variant, learning_rate=0.1, **kwargs)
  params = {"w": jnp.zeros(8)}
  state = tx.init(params)
  outs = []
  for g in grads:
    u, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    outs.append(np.asarray(u["w"]))
  return outs, state


@pytest.mark.parametrize("variant", ["ef", "ef21", "dgc", "none"])
@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_error_feedback_skips_a_nonfinite_gradient(variant, bad):
  rng = np.random.default_rng(0)
  g1, g2 = rng.normal(size=8), rng.normal(size=8)
  g_bad = g1.copy()
  g_bad[3] = bad
  clean, s_clean = _ef_run(variant, [g1, g2])
  skipped, s_skip = _ef_run(variant, [g1, g_bad, g2])
  if variant == "ef21":   # the step is the server estimate h: unchanged
    np.testing.assert_array_equal(skipped[1], skipped[0])
  else:                   # nothing sent
    np.testing.assert_array_equal(skipped[1], 0.0)
  np.testing.assert_allclose(skipped[2], clean[1], rtol=1e-6)  # as if absent
  for a, b in zip(jax.tree.leaves(s_skip.local.memory),
                  jax.tree.leaves(s_clean.local.memory)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(s_skip.local.skipped) == 1 and int(s_clean.local.skipped) == 0
  _, s_mid = _ef_run(variant, [g1, g_bad])
  assert np.isnan(float(s_mid.local.error_ratio))  # not a misleading 0.0


@pytest.mark.parametrize("variant", ["ef", "none"])
def test_error_ratio_is_scale_safe(variant):
  g = np.random.default_rng(1).normal(size=8)
  ratios = [float(_ef_run(variant, [g * s])[1].local.error_ratio)
            for s in (1.0, 1e30, 1e-30)]
  assert 0 < ratios[0] < 1
  np.testing.assert_allclose(ratios[1:], ratios[0], rtol=1e-5)


def test_powersgd_skips_a_nonfinite_gradient():
  tx = powersgd(rank=1, learning_rate=0.1)
  params = {"w": jnp.zeros((4, 4))}
  state = tx.init(params)
  g = jnp.asarray(np.random.default_rng(2).normal(size=(4, 4)), jnp.float32)
  _, state = tx.update({"w": g}, state, params)
  memory = np.asarray(state.local.memory["w"])
  u, state = tx.update({"w": g.at[0, 0].set(NAN)}, state, params)
  np.testing.assert_array_equal(u["w"], 0.0)
  np.testing.assert_array_equal(state.local.memory["w"], memory)
  assert int(state.local.skipped) == 1 and np.isnan(float(state.local.error_ratio))


@pytest.mark.parametrize("covariance", ["diagonal", "kron", "full"])
def test_foovb_skips_nonfinite_steps(covariance):
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  tx = foovb(covariance=covariance, num_samples=2, init_std=0.1)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones((2,) + p.shape), params)
  bad = jax.tree.map(lambda g: g.at[0].set(NAN), grads)
  u, new = tx.update(bad, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  same = lambda s: [s.count, s.key, s.mean, s.std, s.kron, s.scale]
  for a, b in zip(jax.tree.leaves(same(new)), jax.tree.leaves(same(state))):
    np.testing.assert_array_equal(a, b)
  assert int(new.skipped) == 1
  _, after = tx.update(grads, new, params)   # a finite step goes on
  assert int(after.count) == 1 and all(
      np.all(np.isfinite(x)) for x in jax.tree.leaves(after.std))


def test_nm_projection_ranks_nan_smallest_and_reports_it():
  w = jnp.array([[NAN], [3.0], [2.0], [1.0]])
  tx = nm_projection(2, 4)
  params = {"kernel": w}
  state = tx.init(params)
  u, state = tx.update({"kernel": jnp.zeros_like(w)}, state, params)
  np.testing.assert_array_equal(state.masks["kernel"].ravel(),
                                [False, True, True, False])
  np.testing.assert_array_equal(sj.masks.nm_mask(w, 2, 4).ravel(),
                                [False, True, True, False])
  assert float(state.kept_mass["kernel"]) == pytest.approx(5 / 6)
  d = sparsity_diagnostics(optax.apply_updates(params, u), state)
  assert float(d["['kernel']"]["nonfinite"]) == 0.25


# ---------------------------------------------------------- input checks


def test_filter_selecting_nothing_raises_for_haiku_names():
  params = {"linear": {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"nm_convert: no leaf is selected.*"
                     r"\['linear'\]\['w'\] \(8, 4\).*kernel_names"):
    sj.nm_convert(params, 2, 4)


def test_update_names_the_first_differing_path():
  tx = nm_projection(2, 4)
  params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
  state = tx.init(params)
  missing = {"a": {"kernel": jnp.ones((8, 4))}}
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update(missing, state, missing)


def test_metric_helpers_check_label_shapes():
  scores = jnp.eye(4)
  labels = jnp.arange(4)
  assert float(accuracy(scores, labels)) == 1.0
  for fn in (accuracy, negative_log_likelihood, expected_calibration_error):
    with pytest.raises(ValueError, match=r"shape \(4,\).*\(4, 1\).*squeeze"):
      fn(scores, labels[:, None])
  with pytest.raises(ValueError, match="integer class indices"):
    accuracy(scores, labels.astype(jnp.float32))


def test_kron_refuses_huge_factors_naming_the_leaf():
  params = {"big": {"kernel": jax.ShapeDtypeStruct((40_000, 4), jnp.float32)}}
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  with pytest.raises(ValueError, match=r"\['big'\]\['kernel'\].*40000 x 40000.*"
                     "MAX_KRON_SIZE=8192"):
    foovb(covariance="kron", num_samples=2).init(params)


def _mnist_files(root, labels_train=None):
  rng = np.random.default_rng(0)
  for split, n in (("train", 8), ("t10k", 4)):
    _write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)),
               False)
    y = rng.integers(0, 10, n) if split == "t10k" or labels_train is None else labels_train
    _write_idx(root / f"{split}-labels-idx1-ubyte", y, False)


def test_readers_check_labels_and_name_corrupt_files(tmp_path):
  _mnist_files(tmp_path, labels_train=[0, 1, 2, 12, 3, 4, 5, 6])
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: label 12 at "
                     r"index 3 is outside \[0, 10\)"):
    load_mnist(str(tmp_path))
  _mnist_files(tmp_path)
  gz = tmp_path / "gz"
  gz.mkdir()
  for f in os.listdir(tmp_path):
    if f.endswith("ubyte"):
      data = open(tmp_path / f, "rb").read()
      with gzip.open(gz / (f + ".gz"), "wb") as out:
        out.write(data)
  broken = gz / "t10k-images-idx3-ubyte.gz"
  broken.write_bytes(broken.read_bytes()[:30])
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: cannot be read"):
    load_mnist(str(gz))
  root = tmp_path / "cifar"
  _write_cifar(root)
  batch = root / "data_batch_2"
  batch.write_bytes(batch.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"data_batch_2: not a readable CIFAR-10"):
    load_cifar10(str(root))
  _write_cifar(root)
  with open(root / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, -1]}, f)
  with pytest.raises(ValueError, match=r"test_batch: label -1 at index 1"):
    load_cifar10(str(root))


# ------------------------------------------------------------ config checks


def test_validate_rejects_combinations_naming_both_keys():
  c = base_config()
  c.optimizer.pre = (dict(name="sr_ste", n=2, m=4),)
  with pytest.raises(ValueError, match=r"config.optimizer.pre has sr_ste but "
                     r"config.train.forward has no nm_ste"):
    validate(c)
  c.train.forward = (dict(name="nm_ste", n=2, m=4),)
  validate(c)
  c.train.step = "foovb"
  with pytest.raises(ValueError, match=r"config.train.forward=.*not applied.*"
                     r"config.train.step='foovb'"):
    validate(c)
  c = base_config()
  c.train.step, c.train.num_devices, c.train.batch_size = "data_parallel", 3, 64
  with pytest.raises(ValueError, match="batch_size=64 is not divisible by "
                     "config.train.num_devices=3"):
    validate(c)
  c = base_config()
  c.train.eval_every = 0
  with pytest.raises(ValueError, match="config.train.eval_every must be an int >= 1"):
    validate(c)


def test_data_parallel_step_applies_train_forward():
  """An STE config run data-parallel trains through the masked forward pass."""
  from sparse_jax.training.loop import build_run, _data_parallel_builder
  from sparse_jax.training.optim import build_forward
  from sparse_jax.training.steps import make_standard_step
  c = _config()
  c.train.forward = (dict(name="nm_ste", n=2, m=4),)
  c.train.step, c.train.num_devices = "data_parallel", 2
  c.train.batch_size = 8
  data, graphdef, tx, state = build_run(c)
  x, y = data.x_train[:8], data.y_train[:8]
  plan = _data_parallel_builder(graphdef, tx, c)
  dp_state, dp_metrics = plan.step(plan.prepare(state), x, y)
  standard = jax.jit(make_standard_step(graphdef, tx,
                                        forward=build_forward(c.train.forward)))
  st_state, st_metrics = standard(state, x, y)
  np.testing.assert_allclose(dp_metrics["loss"], st_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(plan.eval_params(dp_state.params)),
                  jax.tree.leaves(st_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------- bad launches


def _bad_launches(tmp_path):
  """(name, config, overrides, culprit expected in the one line)."""
  mnist = tmp_path / "mnist"
  mnist.mkdir()
  _mnist_files(mnist)
  (mnist / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
  blocker = tmp_path / "a_file"    # a workdir below a file cannot be made
  blocker.write_text("")            # (chmod would not stop root)
  ckpt_dir = tmp_path / "ckpt"
  return [
      ("missing config file", "configs/nope.py", [], "configs/nope.py"),
      ("unknown variant", "configs/mlp_digits.py:smokey", [], "smokey"),
      ("mistyped key", "configs/mlp_digits.py:smoke",
       ["--config.train.num_stepz=3"], "num_stepz"),
      ("bad value", "configs/mlp_digits.py:smoke",
       ["--config.train.batch_size=0"], "config.train.batch_size"),
      ("missing data", "configs/mnist_cnn.py:smoke",
       [f"--config.data.data_dir={tmp_path / 'nowhere'}"], "nowhere"),
      ("corrupt data", "configs/mnist_cnn.py:smoke",
       [f"--config.data.data_dir={mnist}"], "train-images-idx3-ubyte"),
      ("unwritable workdir", "configs/mlp_digits.py:smoke",
       [f"--workdir={blocker / 'run'}"], "a_file"),
      ("corrupt checkpoint", "configs/mlp_digits.py:smoke",
       [f"--workdir={ckpt_dir}"], "no intact checkpoint"),
  ]


def test_every_bad_launch_is_one_line(tmp_path):
  ckpt_dir = tmp_path / "ckpt"
  from sparse_jax.training.config import load_config_module
  c = load_config_module(os.path.join(os.path.dirname(__file__), "..", "configs",
                                      "mlp_digits.py")).get_config("smoke")
  sj.training.train_and_evaluate(c, str(ckpt_dir), stop_after_step=10)
  for step in os.listdir(ckpt_dir / "checkpoints"):
    _corrupt(str(ckpt_dir), int(step), "truncate")
  for name, config, overrides, culprit in _bad_launches(tmp_path):
    workdir = next((o.split("=", 1)[1] for o in overrides
                    if o.startswith("--workdir=")),
                   str(tmp_path / name.replace(" ", "_")))
    overrides = [o for o in overrides if not o.startswith("--workdir=")]
    proc = launch(config, workdir, *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (name, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
    assert culprit in lines[0], (name, lines[0])
  proc = launch("configs/mlp_digits.py:smoke", str(tmp_path / "wd"),
                "--config.train.batch_size=0", "--verbosity=1")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_shard_map_with_replicated_params_is_refused_with_the_fix():
  """Grads of replicated params are already all-reduced: EF must not run."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4,), ("data",))
  tx = error_feedback(top_k(0.5), axis_name="data", learning_rate=0.1)
  params = {"w": jnp.ones(8)}
  loss = lambda p, xb: jnp.mean((xb @ p["w"]) ** 2)

  def step(p, s, xb, pcast):
    if pcast:
      p = jax.tree.map(lambda a: jax.lax.pcast(a, "data", to="varying"), p)
    return tx.update(jax.grad(loss)(p, xb), s, p)[0]

  with jax.set_mesh(mesh):
    x = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data")))
    state = tx.init(params)
    run = lambda pcast: jax.jit(jax.shard_map(
        lambda p, s, xb: step(p, s, xb, pcast), in_specs=(P(), P(), P("data")),
        out_specs=P()))(params, state, x)
    with pytest.raises(ValueError, match=r"(?s)\['w'\] is the same on every device.*"
                       r"jax.lax.pcast\(p, 'data', to='varying'\)"):
      run(False)
    assert run(True)["w"].shape == (8,)   # per-device grads: accepted
