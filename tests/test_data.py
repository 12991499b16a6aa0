"""Data: digits split, MNIST/CIFAR readers on files written here, teacher task, batching."""

import gzip
import os
import pickle

import numpy as np
import pytest

from sparse_jax.data import (BatchSchedule, load_cifar10, load_dataset, load_digits,
                             load_mnist, make_teacher_task, read_idx)


def test_digits_split_is_fixed_and_disjoint():
  a, b = load_digits(), load_digits()
  assert a.x_train.shape == (1400, 8, 8, 1) and a.x_test.shape == (397, 8, 8, 1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.x_train.dtype == np.float32 and a.x_train.max() <= 1.0
  from sklearn.datasets import load_digits as sk
  order = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(a.y_test, sk().target[order[1400:]])


def _write_idx(path, array, gz):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
  opener = gzip.open if gz else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_roundtrip(tmp_path, gz):
  rng = np.random.default_rng(0)
  images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
  labels = {"train": rng.integers(0, 10, 6), "t10k": rng.integers(0, 10, 3)}
  suffix = ".gz" if gz else ""
  for split in ("train", "t10k"):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images[split], gz)
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels[split], gz)
  data = load_mnist(str(tmp_path))
  assert data.x_train.shape == (6, 28, 28, 1) and data.x_test.shape == (3, 28, 28, 1)
  np.testing.assert_allclose(data.x_train[..., 0], images["train"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(data.y_test, labels["t10k"])


def test_mnist_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "train-images-idx3-ubyte")):
    load_mnist(str(tmp_path))
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    read_idx(str(bad))
  short = tmp_path / "short"
  short.write_bytes(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + b"\x00\x01")
  with pytest.raises(ValueError, match="header says"):
    read_idx(str(short))


def _write_cifar(root, n_per_batch=4):
  rng = np.random.default_rng(1)
  os.makedirs(root, exist_ok=True)
  written = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    data = rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8)
    labels = rng.integers(0, 10, n_per_batch).tolist()
    with open(os.path.join(root, name), "wb") as f:
      pickle.dump({b"data": data, b"labels": labels}, f)
    written[name] = (data, labels)
  return written


def test_cifar_reader(tmp_path):
  written = _write_cifar(tmp_path / "cifar-10-batches-py")
  data = load_cifar10(str(tmp_path))  # finds the standard sub-directory
  assert data.x_train.shape == (20, 32, 32, 3) and data.x_test.shape == (4, 32, 32, 3)
  raw, labels = written["test_batch"]
  # Channel-major rows (R plane, G plane, B plane) become HWC pixels.
  np.testing.assert_allclose(data.x_test[0, 0, 0], raw[0, [0, 1024, 2048]] / 255.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(data.y_test, labels)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "data_batch_1")):
    load_cifar10(str(tmp_path / "empty"))


def test_teacher_task_knobs_and_determinism():
  a = make_teacher_task(input_dim=16, num_train=500, num_test=100, seed=3)
  b = make_teacher_task(input_dim=16, num_train=500, num_test=100, seed=3)
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert a.x_train.shape == (500, 16) and a.num_classes == 10
  assert np.bincount(a.y_train, minlength=10).min() > 10  # roughly balanced
  noisy = make_teacher_task(input_dim=16, num_train=500, num_test=100, seed=3,
                            label_noise=0.5)
  flipped = (noisy.y_train != a.y_train).mean()
  assert 0.3 < flipped < 0.6  # half relabelled, a tenth of those to the same class
  with pytest.raises(ValueError, match="label_noise"):
    make_teacher_task(label_noise=1.5)


def test_load_dataset_errors():
  with pytest.raises(ValueError, match="config.data.name='imagenet'"):
    load_dataset({"name": "imagenet"})
  with pytest.raises(ValueError, match=r"\['nm_train'\]"):
    load_dataset({"name": "digits", "nm_train": 3})


def test_batch_schedule_is_a_function_of_step():
  sched = BatchSchedule(10, 3, seed=0)
  assert sched.steps_per_epoch == 3  # remainder dropped
  epoch0 = np.concatenate([sched.indices(s) for s in range(3)])
  assert len(set(epoch0.tolist())) == 9
  fresh = BatchSchedule(10, 3, seed=0)
  for step in (7, 2, 5):  # any order, no iterator state
    np.testing.assert_array_equal(fresh.indices(step), sched.indices(step))
  assert not np.array_equal(sched.indices(0), sched.indices(3))  # reshuffled per epoch
  keep = BatchSchedule(10, 3, seed=0, drop_remainder=False)
  assert keep.steps_per_epoch == 4 and len(keep.indices(3)) == 1
  with pytest.raises(ValueError, match="batch_size"):
    BatchSchedule(10, 0, seed=0)


def test_worker_skewed_schedule_follows_each_workers_labels():
  from sparse_jax.data import BatchSchedule, WorkerSkewedSchedule
  labels = np.repeat(np.arange(10), 100)
  sched = WorkerSkewedSchedule(labels, 64, num_workers=8, alpha=0.1, seed=3)
  q = sched.label_distribution
  assert q.shape == (8, 10) and np.allclose(q.sum(1), 1.0)
  np.testing.assert_array_equal(sched.indices(5), sched.indices(5))  # pure
  assert not np.array_equal(sched.indices(5), sched.indices(6))
  counts = np.zeros((8, 10))
  for step in range(400):
    y = labels[sched.indices(step)].reshape(8, 8)     # worker-major blocks
    for w in range(8):
      counts[w] += np.bincount(y[w], minlength=10)
  freq = counts / counts.sum(1, keepdims=True)
  np.testing.assert_allclose(freq, q, atol=0.03)
  assert np.mean(q.max(1)) > 0.5          # alpha 0.1: one or two classes each
  again = WorkerSkewedSchedule(labels, 64, num_workers=8, alpha=0.1, seed=3)
  np.testing.assert_array_equal(again.label_distribution, q)
  other = WorkerSkewedSchedule(labels, 64, num_workers=8, alpha=100.0, seed=3)
  assert np.abs(other.label_distribution - 0.1).max() < 0.1   # ~ i.i.d.
  with pytest.raises(ValueError, match="multiple of the 8 workers"):
    WorkerSkewedSchedule(labels, 60, num_workers=8, alpha=0.1, seed=0)
  with pytest.raises(ValueError, match="dirichlet_alpha=0.0 must be > 0"):
    WorkerSkewedSchedule(labels, 64, num_workers=8, alpha=0.0, seed=0)
  assert BatchSchedule(1000, 64, seed=0).indices(0).shape == (64,)
