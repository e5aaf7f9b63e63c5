"""Model zoo: shapes, our layers behind every norm name, any layer class, BN-LSTM details."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.models import MODELS, LSTMClassifier, build_model, layer_groups, make_norm


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(1, 40), (1, 12, 12)])
def test_models_forward(name, shape):
    kw = {"depth": 3} if name in ("deep-mlp", "resnet-mlp") else {}
    for norm in ("none", "batchnorm", "frozen"):
        m = build_model(name, shape, 10, norm=norm, **kw)
        out = m(torch.randn(6, *shape))
        assert out.shape == (6, 10)
        assert m.hidden_acts or name == "logistic", "probes need the hidden activations"


def test_norm_names_use_our_layers():
    assert isinstance(make_norm("batchnorm", 8, 1), batchnorm.BatchNorm1d)
    assert isinstance(make_norm("batchnorm", 8, 2), batchnorm.BatchNorm2d)
    ghost = make_norm("ghost", 8, 1, virtual_batch_size=4)
    assert isinstance(ghost, batchnorm.BatchNorm1d) and ghost.virtual_batch_size == 4
    assert isinstance(make_norm("renorm", 8, 2), batchnorm.BatchRenorm2d)
    frozen = make_norm("frozen", 8, 1)
    frozen.train()
    x = torch.randn(16, 8) * 3 + 2
    # frozen statistics (0, 1): the layer is the identity at init, whatever the batch
    torch.testing.assert_close(frozen(x), x, atol=1e-4, rtol=1e-4)
    assert isinstance(make_norm("none", 8), nn.Identity)
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("layernorm?", 8)


def test_any_layer_class():
    m = build_model("mlp", (1, 40), 10, norm=nn.LayerNorm)
    assert sum(isinstance(x, nn.LayerNorm) for x in m.modules()) == 2
    m2 = build_model("mlp", (1, 40), 10, norm="torch.nn:BatchNorm1d")
    assert sum(type(x) is nn.BatchNorm1d for x in m2.modules()) == 2
    assert m(torch.randn(4, 1, 40)).shape == (4, 10)


def test_reference_architectures():
    mlp = build_model("mlp", (1, 40), 10)
    assert [tuple(p.shape) for p in mlp.parameters()] == [(100, 40), (100,), (100, 100), (100,), (10, 100), (10,)]
    cnn = build_model("cnn", (1, 40), 10)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(25, 5, 2), (25, 3, 2), (25, 3, 2)]
    assert [m for m in cnn.modules() if isinstance(m, nn.Linear)][0].in_features == 125
    paper = build_model("paper-mlp", (1, 40), 10, norm="batchnorm")
    assert sum(isinstance(m, nn.Sigmoid) for m in paper.modules()) == 3
    seq = list(paper.body)
    for i, m in enumerate(seq):  # BN right before each sigmoid
        if isinstance(m, nn.Sigmoid):
            assert isinstance(seq[i - 1], batchnorm.BatchNorm1d)


def test_bn_lstm_per_timestep_gamma():
    m = build_model("lstm", (1, 40), 10, norm="batchnorm")
    assert len(m.bn_x.layers) == 40 and len(m.bn_c.layers) == 40
    for layer in list(m.bn_x.layers) + list(m.bn_h.layers) + list(m.bn_c.layers):
        assert torch.all(layer.weight == 0.1)
    m.train()
    m(torch.randn(8, 1, 40))
    # each time step has its own running statistics
    assert not torch.allclose(m.bn_c.layers[0].running_mean, m.bn_c.layers[10].running_mean)


def test_skipinit_and_layer_groups():
    m = build_model("resnet-mlp", (1, 40), 10, norm="batchnorm", depth=4, skipinit=True)
    x = torch.randn(5, 1, 40)
    # SkipInit: at init every residual branch is multiplied by 0, the body is the identity
    h = m.inp(m.flatten(x))
    torch.testing.assert_close(m.blocks(h), h)
    groups = layer_groups(m)
    assert len(groups) == 6
    all_names = [n for _, ns in groups for n in ns]
    assert sorted(all_names) == sorted(n for n, _ in m.named_parameters())


def test_weight_scale():
    torch.manual_seed(0)
    a = build_model("mlp", (1, 40), 10)
    torch.manual_seed(0)
    b = build_model("mlp", (1, 40), 10, weight_scale=3.0)
    torch.testing.assert_close(b.body[1].weight, 3 * a.body[1].weight)


@pytest.mark.parametrize("shape,rank", [((6, 12), 1), ((6, 12, 7), 1), ((6, 12, 5, 4), 2)])
def test_groupnorm_and_layernorm_for_dense_conv_and_sequence_layouts(shape, rank):
    """``layernorm``: statistics per example over every channel and position (torch's layer_norm over all
    non-batch dims, per-channel affine); ``groupnorm``: torch's group_norm with the largest group count <= 8
    dividing the channels (12 -> 6). Checked with non-trivial gamma/beta."""
    x = torch.randn(*shape) * 3 + 1
    ln = make_norm("layernorm", 12, rank)
    gn = make_norm("groupnorm", 12, rank)
    for layer in (ln, gn):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    affine = (1, 12) + (1,) * (len(shape) - 2)
    want_ln = nn.functional.layer_norm(x, x.shape[1:], eps=ln.eps) * ln.weight.view(affine) + ln.bias.view(affine)
    torch.testing.assert_close(ln(x), want_ln)
    assert gn.num_groups == 6
    torch.testing.assert_close(gn(x), nn.functional.group_norm(x, 6, gn.weight, gn.bias, gn.eps))
    # per-example statistics: one example alone gives the same output (unlike BN)
    torch.testing.assert_close(ln(x[:1]), ln(x)[:1])


def test_bn_lstm_with_layernorm_normalizes_each_step_over_features():
    m = build_model("lstm", (1, 40), 10, norm="layernorm")
    assert isinstance(m.bn_x.layers[0], nn.GroupNorm) and m.bn_x.layers[0].num_groups == 1
    assert m(torch.randn(3, 1, 40)).shape == (3, 10)


def test_mlp_placement_and_dropout():
    before = build_model("mlp", (1, 40), 10, norm="batchnorm")
    after = build_model("mlp", (1, 40), 10, norm="batchnorm", placement="after", dropout=0.3)
    kinds = [type(m).__name__ for m in after.body]
    assert kinds[:5] == ["Flatten", "Linear", "ReLU", "BatchNorm1d", "Dropout"]
    assert [type(m).__name__ for m in before.body][:4] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
    with pytest.raises(ValueError, match="placement"):
        build_model("mlp", (1, 40), 10, placement="inside")


def test_noisy_bn_shifts_in_training_only():
    layer = make_norm("noisy", 8, 1)
    x = torch.randn(64, 8)
    torch.manual_seed(0)
    y1 = layer.train()(x)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)  # a new shift and scale every step
    m, s = y1.mean(0), y1.std(0)
    assert (m.abs() > 0.05).any() and ((s - 1).abs() > 0.1).any()  # not zero-mean / unit-variance anymore
    layer.eval()
    torch.testing.assert_close(layer(x), layer.bn(x))


def test_resnet_skipinit_starts_as_the_shortcut():
    """SkipInit (De & Smith 2020): with the branch scalars at 0 every block is its shortcut plus ReLU."""
    torch.manual_seed(0)
    m = build_model("resnet", (1, 12, 12), 10, norm="none", skipinit=True)
    x = torch.randn(4, 1, 12, 12)
    h = m.stem(x)
    for block in m.blocks:
        h = torch.relu(block.short(h))
    torch.testing.assert_close(m.head(h), m(x))
    assert all(b.alpha is not None for b in m.blocks)


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_lstm_backward_is_linear_in_the_sequence_length(norm):
    """The input projection is one matmul over all time steps; taking step t out of it with
    ``xs[:, t]`` made autograd build a zero gradient of the whole (N, T, 4H) tensor for every step
    and add them up: T full-size fills per backward, 60-70% of a BN-LSTM step at T = 40. The
    gradients are the same either way (each step's slice is written once); the backward must make
    fewer full-size tensors than there are steps."""
    torch.manual_seed(0)
    model = LSTMClassifier((1, 40), 10, norm=norm)
    x = torch.randn(16, 1, 40)
    loss = model(x).sum()
    full = (16, 40, 4 * model.hidden)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    made = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")
            and e.input_shapes and tuple(e.input_shapes[0]) == full]
    assert len(made) < 40, len(made)
