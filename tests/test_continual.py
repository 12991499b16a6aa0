"""Continual learning: metrics, task streams, EWC math, runner resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.data import load_digits, make_dataset
from sparse_jax.data.streams import make_stream, permutations, split_tasks
from sparse_jax.training.cl_metrics import (average_accuracy, backward_transfer,
                                            forgetting, plot_accuracy_matrix)
from sparse_jax.training.continual import (EWCState, ewc_penalty, make_fisher_fn,
                                           run_continual)
from sparse_jax.models import build_model
from sparse_jax.training.steps import split_model, cross_entropy, make_apply

ACC = np.array([[0.9, 0.1, 0.1],
                [0.6, 0.8, 0.2],
                [0.5, 0.7, 0.9]])


def test_metrics_by_hand(tmp_path):
  assert average_accuracy(ACC) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
  assert backward_transfer(ACC) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
  assert forgetting(ACC) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
  assert forgetting(ACC[:1, :1]) == 0.0
  assert plot_accuracy_matrix(ACC, str(tmp_path / "m.png"))
  assert (tmp_path / "m.png").stat().st_size > 1000


def test_permuted_stream():
  perms = permutations(3, 64)
  np.testing.assert_array_equal(perms[0], np.arange(64))
  np.testing.assert_array_equal(perms[2], np.random.default_rng(1002).permutation(64))
  base = load_digits()
  stream = make_stream(base, kind="permuted", num_tasks=3, epochs=2, seed=0)
  x1 = stream.tasks[1].x_test.reshape(-1, 64)
  np.testing.assert_array_equal(x1, base.x_test.reshape(-1, 64)[:, perms[1]])
  batches = list(stream.batches())
  assert len(batches) == sum(stream.steps_per_task()) == 3 * 2 * 44
  assert [len(b.y) for b in batches[:44]][-1] == 1400 - 43 * 32  # last batch 24
  tail = list(stream.batches(start_task=2))
  assert len(tail) == 88
  for a, b in zip(tail, batches[-88:]):  # resuming replays the same order
    np.testing.assert_array_equal(a.x, b.x)


def test_split_scenarios():
  base = load_digits()
  tasks, groups, k = split_tasks(base, scenario="domain")
  assert len(tasks) == 5 and k == 2 and groups[1] == [2, 3]
  assert set(np.unique(tasks[1].y_train)) == {0, 1}
  tasks, _, k = split_tasks(base, scenario="class")
  assert k == 10 and set(np.unique(tasks[1].y_train)) == {2, 3}
  stream = make_stream(base, kind="split", scenario="task", epochs=1)
  assert stream.task_classes[4] == [8, 9]
  with pytest.raises(ValueError, match="scenario"):
    split_tasks(base, scenario="instance")


def test_continuous_stream_blends_gradually():
  # Three tasks whose labels tell them apart: label == task id.
  tasks = [make_dataset(np.full((320, 2), t, np.float32), np.full(320, t),
                        np.zeros((4, 2)), np.zeros(4), 3, f"t{t}") for t in range(3)]
  from sparse_jax.data.streams import TaskStream
  stream = TaskStream(tasks, batch_size=32, epochs=2, seed=0, num_classes=3, blend=0.25)
  batches = [b for b in stream.batches() if b.task == 1]
  foreign = np.array([np.mean(b.y != 1) for b in batches])
  prev = np.array([np.mean(b.y == 0) for b in batches])
  nxt = np.array([np.mean(b.y == 2) for b in batches])
  n = len(batches)
  assert foreign[n // 2 - 2:n // 2 + 2].max() == 0.0  # the middle is pure
  assert prev[0] > 0.25 and nxt[-1] > 0.25  # ~1/2 at the boundaries
  assert prev[n // 2:].max() == 0 and nxt[:n // 2].max() == 0
  first_task = [b for b in stream.batches() if b.task == 0]
  assert np.mean(first_task[0].y != 0) == 0.0  # nothing before the first task


def test_ewc_penalty_and_fisher():
  params = {"w": jnp.array([1.0, 2.0])}
  ewc = EWCState(fisher={"w": jnp.array([0.5, 2.0])}, anchor={"w": jnp.array([0.0, 1.0])})
  assert float(ewc_penalty(3.0)(params, ewc)) == pytest.approx(0.5 * 3 * (0.5 + 2.0))
  model = build_model("mlp", (4,), 3, hidden=(5,))
  graphdef, p, ms = split_model(model)
  x = jax.random.normal(jax.random.key(0), (6, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  fisher = make_fisher_fn(graphdef)(p, ms, x, y)
  apply = make_apply(graphdef)
  grads = [jax.grad(lambda q: cross_entropy(apply(q, ms, x[i:i + 1], False)[0],
                                            y[i:i + 1])[0])(p) for i in range(6)]
  manual = jax.tree.map(lambda *g: sum(gi ** 2 for gi in g) / 6, *grads)
  for a, b in zip(jax.tree.leaves(fisher), jax.tree.leaves(manual)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def _cl_config(step="standard"):
  import os
  from sparse_jax.training.config import load_config_module
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "cl_permuted_digits.py")
  c = load_config_module(path).get_config("ewc,smoke" if step == "ewc" else "smoke")
  c.model.hidden = (32,)
  return c


def test_runner_resume_matches_uninterrupted(tmp_path):
  full = run_continual(_cl_config("ewc"), str(tmp_path / "full"))
  part = run_continual(_cl_config("ewc"), str(tmp_path / "part"), stop_after_task=1)
  assert part["status"] == "stopped"
  resumed = run_continual(_cl_config("ewc"), str(tmp_path / "part"))
  assert resumed["status"] == "completed"
  np.testing.assert_array_equal(np.array(full["accuracy_matrix"]),
                                np.array(resumed["accuracy_matrix"]))
  acc = np.array(full["accuracy_matrix"])
  assert acc.shape == (3, 3) and np.isfinite(acc).all()
  assert (tmp_path / "full" / "accuracy_matrix.png").exists()
