"""The python_text dataset and sequence labels through evaluation."""

import os
import sys

import jax
import numpy as np
import pytest

from sparse_jax.data import load_dataset, make_dataset
from sparse_jax.data import pytext


def _write(root, files):
  for name, text in files.items():
    with open(os.path.join(root, f"{name}.py"), "wb") as f:
      f.write(text)


def test_windows_shift_by_one_and_splits_are_whole_files(tmp_path):
  _write(tmp_path, {"b": b"def f():\n    return 1\n", "a": b"x = 'caf\xc3\xa9'\n",
                    "t": b"import os\nprint(os.sep)\n"})
  d = pytext.load_python_text(seq_len=5, root=str(tmp_path), train_modules=("b", "a"),
                              test_modules=("t",))
  text = b"x = 'caf\xc3\xa9'\n" + b"\n" + b"def f():\n    return 1\n"  # sorted: a, b
  codes = pytext.encode(text)
  assert codes.max() < 128 and (codes == 0).sum() == 2   # the two UTF-8 bytes
  n = (len(codes) - 1) // 5
  assert d.x_train.shape == d.y_train.shape == (n, 5)
  np.testing.assert_array_equal(d.x_train.ravel(), codes[:n * 5])
  np.testing.assert_array_equal(d.y_train.ravel(), codes[1:n * 5 + 1])
  assert pytext.decode(d.x_test[0]) == "impor"
  assert d.num_classes == 128 and d.name.startswith("python_text-")
  with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
    pytext.load_python_text(root=str(tmp_path), train_modules=("nope",),
                            test_modules=("t",))
  with pytest.raises(ValueError, match=r"\['t'\] are in both splits"):
    pytext.load_python_text(root=str(tmp_path), train_modules=("t",),
                            test_modules=("t",))
  with pytest.raises(ValueError, match="seq_len must be an int"):
    pytext.load_python_text(seq_len=True, root=str(tmp_path))
  with pytest.raises(ValueError, match="too few"):
    pytext.load_python_text(seq_len=500, root=str(tmp_path), train_modules=("a",),
                            test_modules=("t",))


def test_the_standard_library_corpus():
  d = load_dataset({"name": "python_text", "seq_len": 64})
  assert d.x_train.shape[1:] == (64,) and len(d.x_train) > 20_000
  assert 0.05 < len(d.x_test) / len(d.x_train) < 0.15
  if sys.version_info[:3] == (3, 11, 7):   # the corpus the results used
    assert d.name == "python_text-" + pytext.REFERENCE_SHA256[:12]


def test_sequence_labels_are_checked():
  x = np.zeros((3, 4), np.float32)
  y = np.zeros((3, 4), np.int32)
  with pytest.raises(ValueError, match="must be 1-D class indices"):
    make_dataset(x, y, x, y, 5, "seq")
  bad = y.copy()
  bad[2, 1] = 9
  with pytest.raises(ValueError, match=r"label 9 at index \(2, 1\)"):
    make_dataset(x, bad, x, y, 5, "seq", sequence=True)
  with pytest.raises(ValueError, match="differ in length"):
    make_dataset(x, y[:, :3], x, y, 5, "seq", sequence=True)


def test_evaluate_averages_over_every_position_with_padding():
  from sparse_jax.models import build_model
  from sparse_jax.training.steps import (cross_entropy, evaluate, make_apply,
                                         make_eval_step, split_model)
  model = build_model("char_transformer", (6,), 16, dim=16, heads=2, depth=1,
                      mlp_dim=32)
  graphdef, params, state = split_model(model)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 16, (7, 6)).astype(np.float32)
  y = rng.integers(0, 16, (7, 6)).astype(np.int32)
  out = evaluate(jax.jit(make_eval_step(graphdef)), params, state, x, y, batch_size=4)
  logits, _ = make_apply(graphdef)(params, state, x, False)
  assert out["loss"] == pytest.approx(float(cross_entropy(logits, y).mean()), rel=1e-5)
  assert out["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).mean()))
