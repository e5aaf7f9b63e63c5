"""The lab against published numbers (each also a line in docs/lab.md, "Checked against the literature").

Fast ones run in every test run; the training reproductions are marked ``slow`` (``pytest -m slow``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments import growth_per_layer
from batchnorm.lab.models import build_model
from batchnorm.lab.probes import grad_norms, residual_variance
from batchnorm.lab.train import RunConfig, train


def _init_grad_norms(norm: str, depth: int, seed: int, width: int = 256) -> list[float]:
    data = load_dataset("mnist1d")
    torch.manual_seed(seed)
    model = build_model("deep-mlp", data.input_shape, data.num_classes, norm=norm, depth=depth, width=width)
    x = torch.from_numpy(data.x_train[:500]).float()
    y = torch.from_numpy(data.y_train[:500]).long()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return grad_norms(model)


def test_yang_gradient_explosion_rate():
    """Yang et al. (2019), Thm 3.9: in a BN-ReLU net without skips, at initialization, the squared gradient
    norm grows by pi / (pi - 1) = 1.467 per layer towards the input (large width and batch). Ours, width
    256, batch 500, 50 layers, mean of 3 seeds: within 3%."""
    rates = [growth_per_layer({"init": {"grad_norms": _init_grad_norms("batchnorm", 50, s)}}) for s in range(3)]
    assert np.mean(rates) == pytest.approx(math.pi / (math.pi - 1), rel=0.03), rates


def test_he_init_without_bn_keeps_gradients_flat():
    """The control: without BN, He initialization keeps the gradient norm roughly constant across layers
    (He et al. 2015): per-layer growth within 5% of 1."""
    rates = [growth_per_layer({"init": {"grad_norms": _init_grad_norms("none", 50, s)}}) for s in range(3)]
    assert np.mean(rates) == pytest.approx(1.0, abs=0.05), rates


def _residual_variance(norm: str, seed: int, depth: int = 12) -> np.ndarray:
    torch.manual_seed(seed)
    model = build_model("resnet-mlp", (1, 40), 10, norm=norm, depth=depth, width=256)
    x = torch.randn(1000, 1, 40)
    return np.array(residual_variance(model, x))


def test_de_smith_residual_variance_at_init():
    """De & Smith (2020), Sec. 2: at initialization the variance of the residual stream doubles with every
    block without normalization (2^l) and grows linearly in l with BN in the branches."""
    plain = np.mean([_residual_variance("none", s) for s in range(3)], axis=0)
    ratio = plain[1:] / plain[:-1]
    assert np.median(ratio) == pytest.approx(2.0, rel=0.1), ratio
    bn = np.mean([_residual_variance("batchnorm", s) for s in range(3)], axis=0)
    steps = np.diff(bn)
    # linear: equal increments (within 15% of their mean), far from doubling
    assert np.all(np.abs(steps / steps.mean() - 1) < 0.15), steps
    assert bn[-1] / bn[0] < 0.2 * plain[-1] / plain[0]


# Measured 2026-12-04 on the 2-vCPU VM (`pytest -m slow tests/lab/test_published.py`): the MLP's five seeds
# 64.9, 64.6, 66.9, 66.0, 66.6% (mean 65.8%): 2.2 pp below the paper's 68%. The authors' own code does not
# reach 68% either: the notebook mnist1d-classification.ipynb of github.com/greydanus/mnist1d records 65.1%
# for its MLP (frozen data set, 6000 steps, seed 42), and that model and loop restated here on that data
# give 65.7% over 5 seeds (benchmarks/mnist1d_reference_mlp.py). So the MLP is checked against the authors'
# recorded run, and the paper's 68% stays a strict expected failure (the test says so if it starts passing).
_MLP_GAP = pytest.mark.xfail(strict=True, reason="65.8% (5 seeds); the authors' own notebook records 65.1%")


def _mnist1d_paper_split_accuracies(model):
    data = load_dataset("mnist1d", val_fraction=0.0)
    assert len(data.y_train) == 4000 and len(data.y_test) == 1000 and len(data.y_val) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [train(RunConfig(model=model, seed=s), data=data)["result"]["test_accuracy"] for s in range(5)]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("model,published", [("logistic", 0.32), pytest.param("mlp", 0.68, marks=_MLP_GAP),
                                             ("cnn", 0.94)])
def test_mnist1d_reference_table(model, published):
    """Greydanus (2020), Table 1: logistic regression 32%, MLP 68%, CNN 94% (Adam lr 1e-2, batch 100, 8000
    steps); ours over 5 seeds within 2 pp, with the paper's split: all 4000 training examples, no
    validation hold-out (so the reported accuracy is the last step's, as in the paper)."""
    accs = _mnist1d_paper_split_accuracies(model)
    assert abs(float(np.mean(accs)) - published) <= 0.02, accs


@pytest.mark.slow
def test_mnist1d_mlp_against_the_authors_recorded_run():
    """The MNIST-1D authors' notebook (github.com/greydanus/mnist1d, notebooks/mnist1d-classification.ipynb,
    the output stored with it) records 65.1% for its MLP: ours within 2 pp over 5 seeds."""
    accs = _mnist1d_paper_split_accuracies("mlp")
    assert abs(float(np.mean(accs)) - 0.651) <= 0.02, accs


@pytest.mark.slow
def test_figure1_ordering_and_drift_on_fashion_mnist():
    """Ioffe & Szegedy (2015), Fig. 1 on Fashion-MNIST (paper-mlp, SGD, 5000 steps): with BN the test accuracy
    is higher early on, and the median input of a last-layer sigmoid drifts much less than without BN."""
    from batchnorm.lab.data import DataUnavailable

    try:
        load_dataset("fashion-mnist")
    except DataUnavailable as exc:
        pytest.skip(str(exc))
    runs = {n: train(RunConfig(dataset="fashion-mnist", model="paper-mlp", norm=n, steps=5000, eval_every=100,
                               probes=("percentiles",)))["curves"] for n in ("none", "batchnorm")}
    assert runs["batchnorm"]["test_acc"][1] > runs["none"]["test_acc"][1] + 0.1
    drift = {n: abs(c["p50"][-1] - c["p50"][0]) for n, c in runs.items()}
    assert drift["none"] > 2 * drift["batchnorm"], drift
