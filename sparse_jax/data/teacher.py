"""A synthetic teacher-student classification task with tunable size and difficulty."""

from __future__ import annotations

import numpy as np

from sparse_jax.data.dataset import Dataset, make_dataset


def make_teacher_task(*, input_dim: int = 64, num_classes: int = 10,
                      teacher_hidden: tuple[int, ...] = (128,),
                      num_train: int = 10_000, num_test: int = 2_000,
                      temperature: float = 0.0, label_noise: float = 0.0,
                      seed: int = 0) -> Dataset:
  """Labels Gaussian inputs with a random ReLU teacher network.

  ``x ~ N(0, I_d)``; the teacher is an MLP with He-normal weights; the label is the
  argmax of its logits (plus Gumbel noise of scale ``temperature``: a softmax sample);
  a fraction ``label_noise`` of labels is then replaced by uniform ones. Deeper /
  wider teachers, fewer examples, higher temperature or noise make it harder.

  Args:
    input_dim: input features d (inputs have shape ``(d,)``).
    num_classes: classes (teacher outputs).
    teacher_hidden: hidden widths of the teacher.
    num_train: training examples.
    num_test: test examples.
    temperature: Gumbel-noise scale on the teacher logits (0: deterministic).
    label_noise: fraction of uniformly relabelled examples, in [0, 1).
    seed: seed of the teacher and of the samples.

  Returns:
    A :class:`Dataset`. Each teacher logit is centred (so classes are roughly
    balanced) and all are scaled to unit std, so ``temperature`` is comparable across
    sizes.
  """
  if not 0.0 <= label_noise < 1.0:
    raise ValueError(f"config.data.label_noise={label_noise} must be in [0, 1)")
  if temperature < 0:
    raise ValueError(f"config.data.temperature={temperature} must be >= 0")
  rng = np.random.default_rng(seed)
  sizes = [input_dim, *teacher_hidden, num_classes]
  weights = [rng.normal(0.0, np.sqrt(2.0 / a), size=(a, b))
             for a, b in zip(sizes[:-1], sizes[1:])]
  biases = [rng.normal(0.0, 0.1, size=b) for b in sizes[1:]]

  def teacher(x):
    for w, b in zip(weights[:-1], biases[:-1]):
      x = np.maximum(x @ w + b, 0.0)
    return x @ weights[-1] + biases[-1]

  n = num_train + num_test
  x = rng.normal(size=(n, input_dim))
  logits = teacher(x)
  logits = logits - logits.mean(axis=0)  # centre each class: balanced labels
  logits = logits / (logits.std() + 1e-12)
  if temperature > 0:
    logits = logits + temperature * rng.gumbel(size=logits.shape)
  y = logits.argmax(axis=1)
  flip = rng.random(n) < label_noise
  y[flip] = rng.integers(0, num_classes, size=int(flip.sum()))
  return make_dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                      num_classes, f"teacher(d={input_dim},h={teacher_hidden})")
