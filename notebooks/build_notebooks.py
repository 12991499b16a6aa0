"""Writes notebooks/quickstart.ipynb and notebooks/continual.ipynb (without outputs).

    python notebooks/build_notebooks.py

The notebooks are generated from the cells below (edit here, not the JSON), so
their diffs stay readable. ``tests/test_notebooks.py`` executes them with
``SPARSE_JAX_NOTEBOOK_SMOKE=1`` (small settings); opened in Jupyter they run
the full settings.
"""

from __future__ import annotations

import os
import textwrap

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
  return v4.new_code_cell(textwrap.dedent(text).strip())


# ----------------------------------------------------------------------------
# quickstart.ipynb

QUICKSTART = [
    md("""
    # sparse_jax quickstart: sparse and Bayesian training of a Flax NNX model

    This notebook trains a small MLP on scikit-learn's handwritten digits
    (bundled with scikit-learn, nothing is downloaded) with two recipes, each
    a single optax transformation:

    * **A. compressed gradients -> optimizer -> 2:4 sparsity**:
      `optax.chain(sj.error_feedback(top_k(1%)), optax.sgd(...), sj.nm_projection(2, 4))`;
    * **B. sparse Bayesian training**: FOO-VB (online variational Bayes) whose
      posterior mean is kept on a *transposable* 2:4 mask chosen by the
      signal-to-noise ratio `|mean| / std` of every weight.

    Then it looks inside: the masks (density, N:M checks, a picture of the
    tiles), the error-feedback residuals, the posterior std.

    Install: `pip install -e ".[notebook]"` from the repository root. The
    full settings below take about a minute on a laptop CPU; the test suite
    runs this notebook with `SPARSE_JAX_NOTEBOOK_SMOKE=1` (fewer steps, a
    smaller model).
    """),
    code("""
    import os

    # Small settings when the test suite executes the notebook.
    SMOKE = os.environ.get("SPARSE_JAX_NOTEBOOK_SMOKE", "0") == "1"
    STEPS = 60 if SMOKE else 400              # training steps of each recipe
    HIDDEN = (64, 64) if SMOKE else (256, 256)
    BATCH = 64
    K = 4 if SMOKE else 8                     # FOO-VB Monte-Carlo samples per step
    # LAPACK's threads compete with XLA's on a small CPU: set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    """),
    code("""
    import json

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    from flax import nnx

    import sparse_jax as sj

    print("jax", jax.__version__, "on", jax.devices()[0].platform)
    """),
    md("""
    ## 1. Data

    `sj.data.load_digits()` returns 1,400 training and 397 test images (8x8,
    values in [0, 1]) with a fixed, seeded split. We draw the minibatch
    indices once, so both recipes see the same batches.
    """),
    code("""
    data = sj.data.load_digits()
    print("train", data.x_train.shape, "test", data.x_test.shape, "classes", data.num_classes)

    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data.x_train), BATCH, replace=False) for _ in range(STEPS)]
    """),
    md("""
    ## 2. A Flax NNX model as a plain pytree

    `sj.models.build_model` builds an `nnx.Module`. The optax transforms work
    on a pytree of arrays, so we split the module into its static structure
    (`graphdef`) and a nested dict of parameters; `nnx.merge` puts them back
    together inside the (pure, jitted) loss. Dense kernels are `(in, out)`:
    N:M groups run along the input axis (-2), the GEMM reduction axis that
    sparse tensor cores need.
    """),
    code("""
    model = sj.models.build_model("mlp", data.input_shape, data.num_classes, hidden=HIDDEN)
    graphdef, params0 = nnx.split(model, nnx.Param)
    params0 = nnx.to_pure_dict(params0)
    print(jax.tree.map(jnp.shape, params0))


    def logits_fn(params, x):
      return nnx.merge(graphdef, params)(x)


    def accuracy(params, x, y):
      return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


    def kernels(params):
      return {"hidden0": params["hidden"][0]["kernel"],
              "hidden1": params["hidden"][1]["kernel"],
              "head": params["head"]["kernel"]}
    """),
    md("""
    ## 3. Recipe A: error-feedback compression -> SGD -> 2:4 projection

    One `optax.chain`, read left to right:

    1. `sj.error_feedback(sj.compression.top_k(0.01))`: of every leaf only the
       1% largest entries of *residual + gradient* are kept (in a data-parallel
       run: sent over the network); the rest stays in the residual `e` and is
       sent later (EF14). With the default `learning_rate=None` the residual
       holds gradients and the output is a compressed *gradient*, so an
       optimizer follows.
    2. `optax.sgd(0.1, momentum=0.9)`: any optax optimizer.
    3. `sj.nm_projection(2, 4)`: placed last, it turns the update into
       `P(params + update) - params`, so after `optax.apply_updates` every
       kernel keeps exactly 2 of every 4 consecutive inputs (the mask is
       recomputed from the magnitudes each step; biases stay dense).
    """),
    code("""
    tx_a = optax.chain(
        sj.error_feedback(sj.compression.top_k(0.01)),  # compressed gradient + residual
        optax.sgd(0.1, momentum=0.9),
        sj.nm_projection(2, 4),                         # params exactly 2:4 after each step
    )


    def mean_loss(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


    @jax.jit
    def step_a(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(mean_loss)(params, x, y)
      updates, opt_state = tx_a.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    """),
    md("""
    Train, and log the size of the error-feedback residual: its norm
    `||e||`, and `error_ratio`, the norm of what was not sent this step over
    the norm of this step's gradient (above 1 once the residual has piled
    up). The state of the first transform of the chain is `state_a[0]`.
    """),
    code("""
    params_a, state_a = params0, tx_a.init(params0)
    hist_a = {"loss": [], "residual_norm": [], "error_ratio": []}
    for idx in batches:
      params_a, state_a, loss = step_a(params_a, state_a, data.x_train[idx], data.y_train[idx])
      ef = state_a[0]
      hist_a["loss"].append(float(loss))
      hist_a["residual_norm"].append(float(optax.tree.norm(ef.local.memory)))
      hist_a["error_ratio"].append(float(ef.local.error_ratio))

    acc_a = accuracy(params_a, data.x_test, data.y_test)
    print(f"recipe A: test accuracy {acc_a:.3f} after {STEPS} steps")
    """),
    md("""
    ### Inspect recipe A: masks and residuals

    `sj.sparsity.sparsity_diagnostics` reads the projection's state: the
    achieved sparsity, the fraction of `sum |w|` the mask kept, and the
    fraction of mask entries that flipped at the last update.
    """),
    code("""
    for path, d in sj.sparsity.sparsity_diagnostics(params_a, state_a).items():
      print(f"{path:26s} sparsity {float(d['sparsity']):.3f}  kept |w| {float(d['kept_mass']):.3f}"
            f"  flips {float(d['flip_rate']):.4f}")

    is_nm_a = {k: bool(sj.masks.is_nm_sparse(w, 2, 4, axis=-2)) for k, w in kernels(params_a).items()}
    print("2:4 along the input axis:", is_nm_a)
    """),
    code("""
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
    ax[0].plot(hist_a["loss"]); ax[0].set_title("training loss (mean)")
    ax[1].plot(hist_a["residual_norm"]); ax[1].set_title("EF residual norm ||e||")
    ax[2].plot(hist_a["error_ratio"]); ax[2].set_title("error_ratio: ||not sent|| / ||gradient||")
    for a in ax:
      a.set_xlabel("step")
    fig.tight_layout()
    plt.show()
    """),
    md("""
    The residual grows while 99% of every gradient is held back, then
    shrinks with the gradients as training converges: what is not sent now
    is sent a few steps later, nothing is lost. Below, the
    top-left 16x16 corner of the first hidden kernel's mask (rows: inputs,
    columns: outputs; lines every 4): each column keeps 2 of every 4
    consecutive rows, the rows are not constrained.
    """),
    code("""
    def show_tiles(ax, mask, title):
      ax.imshow(np.asarray(mask)[:16, :16], cmap="Greys", vmin=0, vmax=1)
      for t in range(4, 16, 4):
        ax.axhline(t - 0.5, color="tab:red", lw=1)
        ax.axvline(t - 0.5, color="tab:red", lw=1)
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("output")
      ax.set_ylabel("input")


    mask_a = state_a[2].masks["hidden"][0]["kernel"]
    fig, ax = plt.subplots(figsize=(3.4, 3.4))
    show_tiles(ax, mask_a, "recipe A: 2:4 mask (black = kept)")
    plt.show()
    """),
    md("""
    ## 4. Recipe B: FOO-VB with a transposable 2:4 posterior mean

    FOO-VB keeps a Gaussian posterior over the weights (here diagonal, i.e.
    Bayesian Gradient Descent): each step draws `K` weight samples, takes the
    gradients of the *summed* batch loss at them, and moves the mean and the
    std with closed-form fixed-point updates.

    `sj.bayes.foovb_nm_projection(tx, n, m)` wraps the FOO-VB transform
    (a transform in an `optax.chain` only sees its own state, so a projection
    after FOO-VB could neither read the std nor write the projected mean back
    into the posterior). After each update it

    * scores every weight by its signal-to-noise ratio `|mean| / std`,
    * picks per 4x4 tile of each kernel the mask with 2 kept per row **and**
      per column that maximises the summed score (exactly: all 90 patterns),
      so `W` and `W^T` are both 2:4 (the backward GEMM can be sparse too),
    * zeroes the pruned entries of the mean and writes it back into the
      posterior: the params you hold are the (sparse) posterior mean.

    Only the mean is projected: pruned weights keep their std, so the K
    training samples are dense around the sparse mean, gradients still reach
    the pruned weights, and a weight can come back when its `|mean| / std`
    beats a kept one. For sparse *samples* (predictions) multiply them by
    the masks in the state (`sj.bayes.apply_masks`). The head (10 outputs)
    cannot be tiled by 4 and stays dense.

    At initialisation every std is the same (`init_std`), so a mask chosen
    at step 1 would just be the magnitude mask of the random init.
    `start_step=WARMUP` trains densely first and scores the first mask on a
    posterior that has learnt something.
    """),
    code("""
    WARMUP = STEPS // 4  # dense FOO-VB steps before the first mask
    foovb_tx = sj.foovb(covariance="diagonal", num_samples=K, init_std=0.05, eta=1.0)
    tx_b = sj.bayes.foovb_nm_projection(foovb_tx, 2, 4, transposable=True, start_step=WARMUP)


    def summed_loss(params, x, y):  # FOO-VB uses the gradient of the SUMMED batch loss
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).sum()


    @jax.jit
    def step_b(params, opt_state, x, y):
      # K posterior samples -> K gradients (vmap) -> fixed-point update -> projection
      params, opt_state, _, loss = sj.bayes.foovb_step(
          tx_b, summed_loss, params, opt_state, x, y, num_samples=K)
      return params, opt_state, loss / x.shape[0]
    """),
    md("""
    Train; keep the dense posterior of the last warm-up step (one step before
    the first projection) to look at it later, and count how many mask
    entries change at each re-scoring.
    """),
    code("""
    params_b, state_b = params0, tx_b.init(params0)
    hist_b = {"loss": [], "mask_flips": []}  # flips: entries of hidden1's mask changed
    prev = np.asarray(state_b.masks["hidden"][1]["kernel"])
    for t, idx in enumerate(batches):
      if t == WARMUP:
        dense_params, dense_state = params_b, state_b
      params_b, state_b, loss = step_b(params_b, state_b, data.x_train[idx], data.y_train[idx])
      cur = np.asarray(state_b.masks["hidden"][1]["kernel"])
      hist_b["loss"].append(float(loss))
      hist_b["mask_flips"].append(int(np.sum(cur != prev)))
      prev = cur

    acc_b = accuracy(params_b, data.x_test, data.y_test)
    print(f"recipe B: test accuracy of the mean network {acc_b:.3f} after {STEPS} steps")
    """),
    md("""
    ### Inspect recipe B: predictions, masks, posterior

    `sj.bayes.evaluate` compares predictors: the mean weights, the average
    accuracy of single samples, a committee vote and Bayesian model averaging
    (BMA) of the softmax, with calibration (ECE) and uncertainty metrics.
    """),
    code("""
    @jax.jit
    def evaluate_posterior(params, opt_state, x, y, num_samples=16):
      samples = sj.foovb_sample(opt_state, num_samples)             # dense around the sparse mean
      masked = sj.bayes.apply_masks(samples, opt_state.masks)       # the same samples, masked
      return {"dense samples": sj.bayes.evaluate(logits_fn, params, samples, x, y),
              "masked samples": sj.bayes.evaluate(logits_fn, params, masked, x, y)}


    for name, ev in evaluate_posterior(params_b, state_b, data.x_test, data.y_test).items():
      print(f"{name:15s} mean {float(ev['accuracy_mean']):.3f}  MC {float(ev['accuracy_mc']):.3f}"
            f"  BMA {float(ev['accuracy_bma']):.3f}  ECE(BMA) {float(ev['ece_bma']):.3f}")
    acc_b_bma = float(ev["accuracy_bma"])  # BMA over the masked (sparse) samples
    """),
    code("""
    is_tnm_b = {k: bool(sj.masks.is_transposable_nm_sparse(params_b["hidden"][i]["kernel"], 2, 4))
                for i, k in enumerate(["hidden0", "hidden1"])}
    density_b = {k: float(jnp.mean(w != 0)) for k, w in kernels(params_b).items()}
    print("transposable 2:4:", is_tnm_b)
    print("density (fraction nonzero):", density_b)
    """),
    md("""
    **Signal-to-noise vs. magnitude.** On the dense posterior of the last
    warm-up step: which weights would each rule keep, and what does pruning
    that posterior's mean once with each mask do to the test accuracy?
    (Once training has a mask, the pruned means are 0 and any rule keeps the
    current support, so the comparison is only meaningful on a dense
    posterior.)
    """),
    code("""
    snr_masks = sj.bayes.foovb_nm_masks(dense_state, 2, 4)
    for i in (0, 1):
      w = dense_params["hidden"][i]["kernel"]
      differ = float(jnp.mean(snr_masks["hidden"][i]["kernel"]
                              != sj.masks.transposable_nm_mask(w, 2, 4)))
      print(f"hidden{i}: the SNR and magnitude masks differ on {100 * differ:.2f}% of the entries")


    def magnitude_masks(params):  # the same tree layout as snr_masks
      masks = jax.tree.map(lambda _: optax.MaskedNode(), params)
      for i in (0, 1):
        masks["hidden"][i]["kernel"] = sj.masks.transposable_nm_mask(params["hidden"][i]["kernel"], 2, 4)
      return masks


    prune_once = sj.bayes.apply_masks
    mag_masks = magnitude_masks(dense_params)
    print(f"dense mean at the end of the warm-up: accuracy {accuracy(dense_params, data.x_test, data.y_test):.3f}")
    print(f"  pruned once by |mean| / std: {accuracy(prune_once(dense_params, snr_masks), data.x_test, data.y_test):.3f}")
    print(f"  pruned once by |mean|:       {accuracy(prune_once(dense_params, mag_masks), data.x_test, data.y_test):.3f}")
    """),
    md("""
    The posterior std at the end, for the weights the mask keeps and for the
    pruned ones, the signal-to-noise ratio of the kept weights (the pruned
    ones have mean 0, hence SNR 0), and the number of mask entries changed
    at each step (the first mask, at step `WARMUP`, drops half of the
    all-True initial one; afterwards a pruned weight rarely overtakes a kept
    one).
    """),
    code("""
    std1 = np.asarray(sj.bayes.foovb_std(state_b)["hidden"][1]["kernel"])
    snr1 = np.asarray(sj.bayes.foovb_snr(state_b)["hidden"][1]["kernel"])
    keep = np.asarray(state_b.masks["hidden"][1]["kernel"])

    fig, ax = plt.subplots(1, 4, figsize=(15, 3.3))
    ax[0].plot(hist_b["loss"]); ax[0].set_title("training loss (per example)"); ax[0].set_xlabel("step")
    ax[0].axvline(WARMUP, color="gray", ls=":")
    ax[1].hist([std1[keep], std1[~keep]], bins=40, label=["kept", "pruned"])
    ax[1].set_title("posterior std, hidden1"); ax[1].legend()
    ax[2].hist(np.log10(snr1[keep]), bins=40)
    ax[2].set_title("log10 |mean| / std of the kept weights")
    ax[3].plot(hist_b["mask_flips"]); ax[3].set_yscale("symlog", linthresh=1)
    ax[3].set_title(f"mask entries changed (of {keep.size})"); ax[3].set_xlabel("step")
    fig.tight_layout()
    plt.show()
    """),
    code("""
    fig, ax = plt.subplots(1, 2, figsize=(7, 3.4))
    show_tiles(ax[0], mask_a, "A: 2:4 (columns only)")
    show_tiles(ax[1], state_b.masks["hidden"][0]["kernel"], "B: transposable 2:4 (rows and columns)")
    fig.tight_layout()
    plt.show()
    """),
    md("""
    ## 5. Summary

    The last cell prints the numbers as JSON (the test suite checks them).
    """),
    code("""
    summary = {
        "smoke": SMOKE, "steps": STEPS,
        "accuracy_ef_sgd_nm": acc_a,
        "accuracy_foovb_tnm_mean": acc_b,
        "accuracy_foovb_tnm_bma": acc_b_bma,
        "ef_kernels_2_4": all(is_nm_a.values()),
        "foovb_kernels_transposable_2_4": all(is_tnm_b.values()),
        "foovb_hidden_density": [density_b["hidden0"], density_b["hidden1"]],
        "final_residual_norm": hist_a["residual_norm"][-1],
    }
    print("SUMMARY", json.dumps(summary))
    """),
]


# ----------------------------------------------------------------------------
# continual.ipynb

CONTINUAL = [
    md("""
    # Continual learning on permuted digits: SGD vs. FOO-VB

    One learner sees a stream of tasks, one after the other, and is never
    told where a task ends. Task 0 is scikit-learn's digits; task `t`
    permutes the 64 pixels with a fixed random permutation; all tasks share
    one 10-way head (domain-incremental). After each task's segment the model
    is tested on *every* task, which fills the accuracy matrix `acc[i, j]` =
    accuracy on task `j` after training on tasks `0..i`.

    We run the experiment config `configs/cl_permuted_digits.py` (the same
    one `experiments/main.py` launches) through
    `sj.training.run_continual`, for plain SGD and for FOO-VB diagonal
    (Bayesian Gradient Descent), whose per-weight uncertainty slows down
    learning on the weights earlier tasks pinned down.

    Needs a source checkout (`pip install -e ".[notebook]"`), for the
    config file. Full settings: the protocol of the reference figure (10 tasks,
    10 epochs each, K = 10): about a minute on a laptop CPU. The test suite runs it
    with `SPARSE_JAX_NOTEBOOK_SMOKE=1`: 3 tasks, 1 epoch, K = 2, a smaller MLP.
    """),
    code("""
    import os

    SMOKE = os.environ.get("SPARSE_JAX_NOTEBOOK_SMOKE", "0") == "1"
    METHODS = {"SGD (lr 0.01)": "sgd", "FOO-VB diagonal (BGD)": "bgd"}  # config variants
    """),
    code("""
    import json
    import pathlib
    import tempfile

    import matplotlib.pyplot as plt
    import numpy as np

    import sparse_jax as sj
    from sparse_jax.training.config import load_config_module

    repo = pathlib.Path(sj.__file__).resolve().parents[1]
    config_module = load_config_module(str(repo / "configs" / "cl_permuted_digits.py"))
    """),
    md("""
    ## 1. The configs

    `get_config("bgd")` applies the variant `bgd` to the base config; adding
    `smoke` shrinks the stream. Every key is checked (a mistyped one fails).
    """),
    code("""
    def make_config(variant):
      c = config_module.get_config(variant + (",smoke" if SMOKE else ""))
      if SMOKE:
        c.model.hidden = (64, 64)
      return c


    c = make_config("bgd")
    print("stream:", dict(c.stream))
    print("model:", dict(c.model))
    print("optimizer:", c.optimizer.name, dict(c.optimizer.kwargs))
    """),
    md("""
    ## 2. Run the stream

    Each run writes metrics, checkpoints (one per task: a killed run resumes)
    and `results.json` into its work directory, and returns the results.
    """),
    code("""
    workroot = pathlib.Path(tempfile.mkdtemp(prefix="cl_digits_"))
    results = {}
    for label, variant in METHODS.items():
      results[label] = sj.training.run_continual(make_config(variant), str(workroot / variant))
    """),
    md("""
    ## 3. The accuracy matrices

    Row `i`: after training on task `i`; column `j`: tested on task `j`. The
    diagonal is how well each task is learnt; what happens below it is
    forgetting.
    """),
    code("""
    %matplotlib inline
    # (run_continual saved each matrix as a PNG with matplotlib's Agg backend;
    # the line above switches this notebook back to inline figures.)
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2))
    for ax, (label, r) in zip(np.atleast_1d(axes), results.items()):
      acc = np.array(r["accuracy_matrix"])
      im = ax.imshow(100 * acc, vmin=0, vmax=100, cmap="viridis")
      for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
          ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if acc[i, j] < 0.6 else "black")
      ax.set_title(f"{label}\\naverage final accuracy {100 * r['average_accuracy']:.1f}%", fontsize=9)
      ax.set_xlabel("tested on task j")
      ax.set_ylabel("after training on task i")
      ax.set_xticks(range(acc.shape[1]))
      ax.set_yticks(range(acc.shape[0]))
    fig.colorbar(im, ax=axes, fraction=0.03)
    plt.show()
    """),
    md("""
    ## 4. Average accuracy and forgetting

    * average accuracy: mean of the last row (all tasks, at the end);
    * forgetting: mean over the earlier tasks of (best accuracy ever - final);
    * backward transfer: mean of (final - just after learning it); negative
      means forgetting.

    For the full settings, the reference to compare with (ALGORITHMS.md D,
    PyTorch BGD on this exact protocol, 3 seeds): BGD 48.95 +- 0.83 %,
    SGD (lr 0.01) 39.01 +- 0.95 %.
    """),
    code("""
    print(f"{'method':24s} {'avg acc':>8s} {'forgetting':>11s} {'BWT':>7s} {'wall s':>7s}")
    for label, r in results.items():
      print(f"{label:24s} {100 * r['average_accuracy']:7.1f}% {100 * r['forgetting']:10.1f}%"
            f" {100 * r['backward_transfer']:6.1f}% {r['wall_s']:7.1f}")

    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    for label, r in results.items():
      acc = np.array(r["accuracy_matrix"])
      ax.plot(100 * acc[:, 0], marker="o", label=label)
    ax.set_xlabel("after training on task i")
    ax.set_ylabel("accuracy on task 0 (%)")
    ax.set_title("how fast the first task is forgotten", fontsize=9)
    ax.legend()
    plt.show()
    """),
    md("""
    ## 5. The same posterior in your own NNX training loop

    The runner above is one way in; the transforms are plain optax, so they
    also drop into your own Flax NNX loop through `nnx.Optimizer(model, tx,
    wrt=nnx.Param)`. Three lines differ from an Adam loop:

    * `sj.foovb_sample(optimizer, K, like=model)` draws K posterior samples
      from the optimizer's state, typed as `nnx.Param` (so their gradients
      pass the optimizer's `wrt` filter);
    * the gradients are taken at each sample (`jax.vmap(jax.grad(...))`);
    * `optimizer.update(model, grads)` moves the model to the new posterior
      mean.

    The same loop trains FOO-VB (gradients of the SUMMED batch loss) and IVON
    (`sj.bayes.ivon`, Shen et al. 2024: the batch-MEAN loss, one sample is
    enough), here on two tasks: digits and a pixel permutation of them.
    Prediction with the posterior: `sj.bayes.evaluate` (mean weights,
    Bayesian model average, calibration).
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    split = np.random.default_rng(0).permutation(len(y_all))
    train, test = split[:1400], split[1400:]
    perm = np.random.default_rng(1001).permutation(64)
    tasks = [x_all, x_all[:, perm]]              # task 0, then permuted pixels
    EPOCHS = 1 if SMOKE else 5


    def own_loop(tx, num_samples, reduction, seed=0):
      model = nnx.Sequential(nnx.Linear(64, 100, rngs=nnx.Rngs(seed)), jax.nn.relu,
                             nnx.Linear(100, 10, rngs=nnx.Rngs(seed + 1)))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

      @nnx.jit
      def step(model, optimizer, x, y):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
          logits = nnx.merge(graphdef, params, rest)(x)
          ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
          return ce.sum() if reduction == "sum" else ce.mean()

        samples = sj.foovb_sample(optimizer, num_samples, like=model)
        optimizer.update(model, jax.vmap(jax.grad(loss))(samples))

      order_rng = np.random.default_rng(100 + seed)
      after = []
      for x_task in tasks:
        for _ in range(EPOCHS):
          order = train[order_rng.permutation(len(train))]
          for i in range(0, len(order) - 31, 32):
            idx = order[i:i + 32]
            step(model, optimizer, jnp.asarray(x_task[idx]), jnp.asarray(y_all[idx]))
        after.append([float(np.mean(np.argmax(model(jnp.asarray(xt[test])), -1)
                                    == y_all[test])) for xt in tasks])
      # The posterior predictive on the last task: mean weights vs. the BMA.
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
      post = sj.bayes.evaluate(apply, params, sj.foovb_sample(optimizer, 16, like=model),
                               jnp.asarray(tasks[1][test]), jnp.asarray(y_all[test]))
      return {"after_task": after, "bma_accuracy": float(post["accuracy_bma"]),
              "nll_bma": float(post["nll_bma"]), "ece_bma": float(post["ece_bma"])}


    K = 2 if SMOKE else 10
    own = {
        "FOO-VB diagonal (BGD)": own_loop(sj.foovb(num_samples=K, init_std=0.05), K, "sum"),
        "IVON": own_loop(sj.bayes.ivon(0.03, ess=1400.0, hess_init=1.0), 1, "mean"),
    }
    print(f"{'nnx loop':24s} {'task 0 after 0':>15s} {'task 0 after 1':>15s} {'task 1':>7s}"
          f" {'BMA acc':>8s} {'NLL':>6s} {'ECE':>6s}")
    for label, r in own.items():
      a = r["after_task"]
      print(f"{label:24s} {100 * a[0][0]:14.1f}% {100 * a[1][0]:14.1f}% {100 * a[1][1]:6.1f}%"
            f" {100 * r['bma_accuracy']:7.1f}% {r['nll_bma']:6.3f} {r['ece_bma']:6.3f}")
    """),
    md("""
    ## 6. Summary

    Printed as JSON for the test suite.
    """),
    code("""
    summary = {"smoke": SMOKE, "methods": {
        label: {"average_accuracy": r["average_accuracy"], "forgetting": r["forgetting"],
                "accuracy_matrix": r["accuracy_matrix"]}
        for label, r in results.items()}, "nnx_loop": own}
    print("SUMMARY", json.dumps(summary))
    """),
]


def write(cells, name: str) -> str:
  nb = v4.new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  # Deterministic cell ids keep regenerated notebooks diff-free.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{os.path.splitext(name)[0]}-{i:02d}"
  nbformat.validate(nb)
  path = os.path.join(HERE, name)
  nbformat.write(nb, path)
  return path


def main():
  for cells, name in [(QUICKSTART, "quickstart.ipynb"),
                      (CONTINUAL, "continual.ipynb")]:
    print("wrote", write(cells, name))


if __name__ == "__main__":
  main()
