"""Slow reproductions of published numbers (run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch

from batchnorm.lab.train import RunConfig, train


@pytest.mark.slow
@pytest.mark.parametrize("model,published", [("mlp", 0.68), ("cnn", 0.94)])
def test_mnist1d_reference_accuracy(model, published):
    """Greydanus (2020): MLP 68%, CNN 94% with Adam lr 1e-2, batch 100, 8000 steps (our recipe)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the lab's setting: one thread per run
    try:
        accs = [train(RunConfig(model=model, seed=s))["result"]["test_accuracy"] for s in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert abs(sum(accs) / len(accs) - published) < 0.05, accs
