"""functorch / ``torch.func`` batch-norm tests of PyTorch, on ``batchnorm``'s layers and functional.

Sources:

* ``test/functorch/test_eager_transforms.py::TestExamplesCorrectness::test_update_batch_norm``
  (parametrized over ``mechanism`` in make_functional/functional_call and
  ``originally_track_running_stats``), read from the fork cyyever/pytorch at commit
  255b4bb40c499e99a33e402006b3f35248a355a0: ``torch.func.replace_all_batch_norm_modules_`` on a
  Conv-BatchNorm-ReLU-Linear net, then per-sample gradients with ``vmap(grad(...))`` must equal a
  loop of ``autograd.grad``. Size: Conv2d(4, 4, 3) on 8x8 inputs and Linear(144, 5) instead of
  Conv2d(64, 64, 3) on 28x28 and Linear(43264, 5) (same structure, far less work).
* ``test/functorch/test_vmap.py::TestVmapOperatorsOpInfo::test_vmap_exhaustive`` for the
  ``nn.functional.batch_norm`` OpInfo, restated from the helpers it uses in
  ``test/functorch/common_utils.py`` (pytorch/pytorch, stored commit
  05fb44576e25e437c248eafc1005860afcee6933): ``is_batch_norm_training``,
  ``get_bdim_choices_batch_norm``, ``generate_vmap_inputs``, ``get_fallback_and_vmap_exhaustive``
  (vmap of the op over every admissible choice of batched arguments equals the unbatched result
  expanded, and vmap-of-vmap equals vmap). The samples are ``sample_inputs_batch_norm`` in
  float32, as in ``test_opinfo_batch_norm.py``. I did not read test_vmap.py itself (its xfail
  lists included); the test name is the one its OpInfo test carries.
* ``test_vmap_batch_norm_without_running_stats``: the functorch documentation's "Patching Batch
  Norm" page (``docs/source/func.batch_norm.rst``), option "track_running_stats=False": vmap over
  a model whose BN layers were built without running statistics works and equals the per-sample
  loop. Not a PyTorch test; it is the brief's "vmap over a batch-norm model whose running stats
  are not tracked", restated for our layers directly (no replacement needed).

Not ported: ``test/functorch/test_ops.py`` (``TestOperators``: vjp/jvp/vmapvjp/... over all
OpInfos): not read here; the autograd formulas it would exercise for this op (gradients, double
backward, forward AD, batched gradients) are checked on the same samples in
``test_opinfo_batch_norm.py``.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

import batchnorm as B
from batchnorm import functional as BF

from .test_opinfo_batch_norm import sample_inputs_batch_norm


def _get_weights_and_functional_call_with_buffers(net, mechanism):
    if mechanism == "make_functional":
        from functorch import make_functional_with_buffers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # functorch.make_functional* is deprecated
            return make_functional_with_buffers(net)

    def net_func(weights, buffers, data):
        return functional_call(net, (weights, buffers), (data,))

    return net_func, dict(net.named_parameters()), dict(net.named_buffers())


@pytest.mark.parametrize("mechanism", ["make_functional", "functional_call"])
@pytest.mark.parametrize("originally_track_running_stats", [True, False])
def test_update_batch_norm(originally_track_running_stats, mechanism):
    """test/functorch/test_eager_transforms.py::TestExamplesCorrectness::test_update_batch_norm, with
    our BatchNorm2d in the net: after ``torch.func.replace_all_batch_norm_modules_`` the layer has no
    running statistics, and ``vmap(grad(loss))`` per-sample gradients equal a loop of
    ``autograd.grad`` (float64)."""
    dtype = torch.double
    classes = 5
    num_batches = 2
    channels, size = 4, 8
    net = nn.Sequential(
        nn.Conv2d(channels, channels, 3),
        B.BatchNorm2d(channels, affine=True, track_running_stats=originally_track_running_stats),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * (size - 2) ** 2, classes),
    ).to(dtype)

    replace_all_batch_norm_modules_(net)
    transformed_net = net
    fnet, params, buffers = _get_weights_and_functional_call_with_buffers(transformed_net, mechanism)
    criterion = nn.CrossEntropyLoss()

    def compute_loss(x, y, params, buffers):
        return criterion(fnet(params, buffers, x), y)

    x = torch.randn(num_batches, 1, channels, size, size, dtype=dtype)
    y = torch.randint(0, classes, (num_batches, 1))

    result_grads = vmap(grad(compute_loss, argnums=2), in_dims=(0, 0, None, None))(x, y, params, buffers)

    fnet, params, buffers = _get_weights_and_functional_call_with_buffers(transformed_net, mechanism)
    flat_params, spec = pytree.tree_flatten(params)
    expected_grads = [torch.autograd.grad(compute_loss(x[i], y[i], params, buffers), flat_params)
                      for i in range(num_batches)]
    expected_grads = [torch.stack(shards) for shards in zip(*expected_grads)]
    expected_grads = pytree.tree_unflatten(expected_grads, spec)
    flat_result, _ = pytree.tree_flatten(result_grads)
    flat_expected, _ = pytree.tree_flatten(expected_grads)
    for r, e in zip(flat_result, flat_expected):
        torch.testing.assert_close(r, e)

    # addition: what replace_all_batch_norm_modules_ documents it does to every BN layer
    bn = net[1]
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert bn.track_running_stats is False


# ------------------------------------------------------------- vmap exhaustive (common_utils)


def _is_batch_norm_training(kwarg_values):
    # common_utils.is_batch_norm_training for "nn.functional.batch_norm" (default: not training)
    flags = [v for v in kwarg_values.values() if isinstance(v, bool)]
    return flags[0] if flags else False


def _get_bdim_choices(num_tensors):
    choices = [(0,) * num_tensors]
    choices.extend(itertools.product((-1, None), repeat=num_tensors))
    assert choices[-1] == (None,) * num_tensors
    return tuple(choices[:-1])


def _get_bdim_choices_batch_norm(num_tensors, _input, running_mean=None, running_var=None, *args):
    choices = []
    options = (-1, None)
    if running_mean is None or running_var is None:
        # without running statistics the input itself cannot be batched
        choices.append((None,) + (0,) * (num_tensors - 1))
        for choice in itertools.product(options, repeat=num_tensors - 1):
            choices.append((None,) + choice)
    else:
        # a batched input needs batched running statistics (they are written per batch element)
        choices.append((0,) * num_tensors)
        for choice in itertools.product(options, repeat=num_tensors):
            if choice[0] and (not choice[1] or not choice[2]):
                continue
            choices.append(choice)
    assert choices[-1] == (None,) * num_tensors
    return tuple(choices[:-1])


def _add_batch_dim(arg, bdim, batch_size):
    if bdim == 0:
        shape = [1] * arg.dim()
        shape.insert(0, batch_size)
        return arg.repeat(shape)
    return arg.unsqueeze(-1).expand(*arg.shape, batch_size).contiguous()


def _generate_vmap_inputs(arg_values, is_batch_norm_and_training, batch_size=2):
    flat_args, arg_spec = pytree.tree_flatten(tuple(arg_values))
    is_tensors = [isinstance(a, torch.Tensor) for a in flat_args]
    num_tensors = sum(is_tensors)
    if num_tensors == 1 and is_batch_norm_and_training:
        return
    bdim_choices = (_get_bdim_choices_batch_norm(num_tensors, *arg_values) if is_batch_norm_and_training
                    else _get_bdim_choices(num_tensors))
    for bdim_choice in bdim_choices:
        it = iter(bdim_choice)
        flat_in_dims = [next(it) if t else None for t in is_tensors]
        flat_batched = [a if d is None else _add_batch_dim(a, d, batch_size) for a, d in zip(flat_args, flat_in_dims)]
        yield (pytree.tree_unflatten(flat_batched, arg_spec), pytree.tree_unflatten(flat_in_dims, arg_spec))


def test_vmap_exhaustive():
    """test/functorch/test_vmap.py::TestVmapOperatorsOpInfo::test_vmap_exhaustive for
    nn.functional.batch_norm (float32), restated from common_utils.get_fallback_and_vmap_exhaustive:
    for each sample and each admissible choice of batched arguments (0, -1 or unbatched; in
    training a batched input needs batched running statistics), ``vmap(op)`` equals the unbatched
    result expanded over the batch, and ``vmap(vmap(op))`` with an outer dummy dimension equals
    ``vmap(op)`` with that dimension inserted."""
    batch_size = 2
    for sample in sample_inputs_batch_norm(torch.float32, requires_grad=False):
        arg_values = (sample.input, *sample.args)
        kwargs = sample.kwargs
        training = _is_batch_norm_training(kwargs)
        expected = BF.batch_norm(*[a.clone() if isinstance(a, torch.Tensor) else a for a in arg_values], **kwargs)
        expected_batched = expected.unsqueeze(0).expand(batch_size, *expected.shape)
        for batched_args, in_dims in _generate_vmap_inputs(arg_values, training, batch_size):
            where = f"{sample!r} in_dims={in_dims}"
            try:
                out = vmap(BF.batch_norm, in_dims=in_dims)(*batched_args, **kwargs)
            except Exception as e:
                e.add_note(f"while running vmap on {where}")
                raise
            torch.testing.assert_close(out, expected_batched, msg=lambda m, w=where: f"vmap: {w}: {m}")

            def f(dummy, *args, kwargs=kwargs):
                return BF.batch_norm(*args, **kwargs)

            dummy = torch.ones(batch_size, 1)
            inner = (0,) + tuple(None for _ in in_dims)
            outer = (0,) + tuple(in_dims)
            try:
                vv = vmap(vmap(f, inner), outer)(dummy, *batched_args)
            except Exception as e:
                e.add_note(f"while running vmap(vmap) on {where}")
                raise
            torch.testing.assert_close(vv, out.unsqueeze(1).expand_as(vv),
                                       msg=lambda m, w=where: f"vmap(vmap): {w}: {m}")


# --------------------------------------------------------------------------- documentation example


@pytest.mark.parametrize("cls,shape", [(B.BatchNorm1d, (3, 4, 5)), (B.BatchNorm2d, (3, 4, 3, 3))],
                         ids=["BatchNorm1d", "BatchNorm2d"])
def test_vmap_batch_norm_without_running_stats(cls, shape):
    """functorch docs, "Patching Batch Norm" (track_running_stats=False): vmap over a batch of
    per-example inputs through a model whose BN keeps no running statistics, in training mode,
    equals the loop; and per-sample gradients with vmap(grad) equal the looped autograd ones."""
    torch.manual_seed(0)
    c = shape[1]
    model = nn.Sequential(cls(c, track_running_stats=False), nn.Flatten(), nn.Linear(c * shape[2] * (
        shape[3] if len(shape) > 3 else 1), 2)).double()
    xs = torch.randn(4, *shape, dtype=torch.double)
    out = vmap(model)(xs)
    torch.testing.assert_close(out, torch.stack([model(x) for x in xs]))

    params = dict(model.named_parameters())

    def loss(p, x):
        return functional_call(model, p, (x,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for name, p in params.items():
        expected = torch.stack([torch.autograd.grad(loss(params, x), p)[0] for x in xs])
        torch.testing.assert_close(per_sample[name], expected)
