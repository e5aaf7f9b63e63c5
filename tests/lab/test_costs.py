"""How long a sweep's runs will take (batchnorm.lab.sweep.CostModel): the order a sweep starts them in
and the time left on its progress line. Checked against the stored timings it learns from."""

from __future__ import annotations

import pytest

from batchnorm.lab.store import Store
from batchnorm.lab.sweep import MIN_RUN_SECONDS, CostModel, estimated_cost, run_sweep
from batchnorm.lab.train import RunConfig, with_recipe


def _timing(cfg: RunConfig, seconds: float, steps: int | None = None) -> tuple[dict, float, int]:
    full = with_recipe(cfg)
    return full.to_dict(), seconds, steps if steps is not None else full.steps


def test_stored_runs_like_it_give_the_seconds():
    """A run that differs from stored ones only in seed, learning rate or step count costs their
    median seconds per step times its steps; one sharing only model, data and norm (another width)
    the median of those; a model never stored the heuristic, scaled as the stored runs compare with it."""
    resnet = RunConfig(model="resnet", dataset="fashion-mnist", norm="batchnorm", steps=4000)
    mlp = RunConfig(model="mlp", dataset="mnist1d", norm="batchnorm", steps=4000)
    timings = [_timing(resnet.replace(seed=s, lr=lr), sec) for s, lr, sec in
               ((0, 0.1, 600.0), (1, 0.1, 640.0), (2, 0.03, 560.0))]
    timings += [_timing(mlp.replace(seed=s), sec) for s, sec in ((0, 8.0), (1, 6.0), (2, 7.0))]
    timings.append(_timing(mlp.replace(seed=3, lr=10.0), 0.07, steps=40))  # diverged at step 40, same pace
    cost = CostModel(timings)
    assert cost(resnet.replace(seed=9, lr=0.3)) == pytest.approx(600.0)
    assert cost(resnet.replace(seed=9, steps=2000)) == pytest.approx(300.0)
    assert cost(mlp.replace(seed=7)) == pytest.approx(7.0, rel=0.03)
    assert cost(mlp.replace(model_kw={"width": 512})) == pytest.approx(7.0, rel=0.03)  # model, data, norm
    assert cost(resnet) / cost(mlp) > 50  # the order a sweep starts them in
    lstm = RunConfig(model="lstm", dataset="mnist1d", norm="batchnorm", steps=4000)
    scale = cost(lstm) / estimated_cost(lstm)
    assert 0.5 < scale < 2.0  # the stored runs took about what the heuristic guessed for them
    assert CostModel()(lstm) == estimated_cost(lstm)


def test_a_run_of_no_training_step_costs_what_such_runs_took():
    """Probes at initialization (``steps=0``: build, one gradient, evaluate) cost the seconds stored runs
    like them took, not zero; with none stored, at least MIN_RUN_SECONDS."""
    init = RunConfig(model="deep-mlp", norm="batchnorm", steps=0, probes=("grad_norms",), model_kw={"depth": 100})
    trained = _timing(init.replace(steps=2000), 40.0)
    assert CostModel([trained])(init) == MIN_RUN_SECONDS
    cost = CostModel([trained, _timing(init, 2.5, steps=0), _timing(init.replace(seed=1), 3.5, steps=0)])
    assert cost(init.replace(seed=5)) == pytest.approx(3.0)
    assert cost(init.replace(steps=1000)) == pytest.approx(20.0)  # a trained run still at its pace per step


def test_a_store_lists_its_timings_and_a_sweep_asks_the_cost(tmp_path):
    """Store.timings() returns each run's configuration, seconds and steps; a sweep with workers starts
    its missing runs in the order of the cost it is given."""
    store = Store(tmp_path / "lab.sqlite")
    cfgs = [RunConfig(model="mlp", steps=5, data_limit=200, seed=i) for i in range(3)]
    run_sweep(cfgs[:1], store)
    [(config, seconds, steps)] = store.timings()
    assert (config["model"], config["seed"], config["steps"]) == ("mlp", 0, 5) and seconds > 0 and steps == 5
    asked = []

    def cost(cfg):
        asked.append(cfg.seed)
        return float(cfg.seed)

    run_sweep(cfgs, store, workers=2, cost=cost)
    assert sorted(asked) == [1, 2] and store.count() == 3
    at_init = RunConfig(model="mlp", steps=0, data_limit=200, probes=("grad_norms",))
    run_sweep([at_init], store)
    assert [(s > 0, n) for c, s, n in store.timings() if c["steps"] == 0] == [(True, 0)]  # listed, for its cost
