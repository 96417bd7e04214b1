"""Hessian capture: H = 2·XᵀX/n per layer (and per group), checked against references."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.capture import (
    bias_correction,
    capture_hessians,
    layer_weight_2d,
    select_layers,
    set_layer_weight_2d,
)
from automl_compress.errors import InvalidInputError, NonFiniteError, ShapeMismatchError


def _unfold_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(groups, n, cols) im2col rows of a Conv2d with numeric padding (F.unfold's own padding)."""
    cols = F.unfold(
        x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
        stride=conv.stride,
    )  # (B, C*kh*kw, L)
    X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    g = conv.groups
    return X.view(X.shape[0], g, -1).transpose(0, 1)


def _reference_H(X: torch.Tensor) -> torch.Tensor:
    return 2.0 * X.transpose(-1, -2) @ X / X.shape[-2]


def _measured_row_mse(module: nn.Module, W_hat: torch.Tensor, inputs: list[torch.Tensor]):
    """Per output channel mean squared change of the layer output (bias unchanged)."""
    mod_hat = _copy_with_weight(module, W_hat)
    total, count = None, 0
    with torch.no_grad():
        for x in inputs:
            d = (module(x) - mod_hat(x)).double()
            if isinstance(module, nn.Linear):
                d = d.reshape(-1, d.shape[-1])  # (n, rows)
            else:
                d = d.transpose(0, 1).reshape(d.shape[1], -1).T  # (n, rows)
            s = (d**2).sum(0)
            total = s if total is None else total + s
            count += d.shape[0]
    return total / count


def _copy_with_weight(module: nn.Module, W2d: torch.Tensor) -> nn.Module:
    import copy

    mod = copy.deepcopy(module)
    set_layer_weight_2d(mod, W2d)
    return mod


def _perturbed(W: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return W + 0.1 * W.abs().mean() * torch.randn(W.shape, generator=gen, dtype=W.dtype)


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, stride=2, padding=1,
             dilation=1),
        dict(in_channels=6, out_channels=6, kernel_size=(3, 2), groups=6, stride=1,
             padding=(2, 1), dilation=2),  # depthwise, dilated, asymmetric kernel
        dict(in_channels=3, out_channels=5, kernel_size=3, groups=1, stride=(1, 2), padding=0,
             dilation=(1, 2), bias=False),
    ],
)
def test_conv2d_grouped_H_equals_unfold_reference(conv_kwargs, gen):
    torch.manual_seed(1)
    conv = nn.Conv2d(**conv_kwargs).double()
    xs = [torch.randn(3, conv.in_channels, 9, 8, generator=gen, dtype=torch.float64)
          for _ in range(2)]
    hs = capture_hessians(conv, xs)
    lh = hs[""]
    X = torch.cat([_unfold_reference(conv, x) for x in xs], dim=1)  # (g, n, cols)
    H_ref = _reference_H(X)
    assert lh.H.shape == (conv.groups, lh.info.cols, lh.info.cols)
    assert lh.n_samples == X.shape[1]
    torch.testing.assert_close(lh.H, H_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lh.mean, X.mean(dim=1), rtol=1e-10, atol=1e-12)
    info = lh.info
    assert info.kind == "conv2d" and info.groups == conv.groups
    assert info.rows == conv.out_channels and info.cols == conv.weight[0].numel()
    assert info.kernel == tuple(conv.kernel_size) and info.stride == tuple(conv.stride)
    assert info.has_bias == (conv.bias is not None)
    out = conv(xs[0])
    assert info.macs == out[0].numel() * info.cols


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(4, 6, kernel_size=3, groups=2, stride=2, padding=1),
        nn.Conv2d(6, 6, kernel_size=(3, 2), groups=6, dilation=2, padding=(2, 1)),
        nn.Conv2d(3, 4, kernel_size=4, padding="same"),  # even kernel: asymmetric 'same'
        nn.Conv1d(4, 6, kernel_size=4, padding="same", dilation=2, groups=2),
        nn.Conv1d(3, 5, kernel_size=5, stride=3, padding=2),
        nn.Linear(7, 5),
    ],
    ids=["grouped", "depthwise", "same2d", "same1d", "conv1d", "linear"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_quadratic_form_equals_measured_output_mse(module, gen):
    module = module.double()
    if isinstance(module, nn.Linear):
        shape = (2, 5, module.in_features)  # sequence input (B, T, d)
    elif isinstance(module, nn.Conv1d):
        shape = (3, module.in_channels, 17)
    else:
        shape = (3, module.in_channels, 9, 10)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5 for _ in range(3)]
    lh = capture_hessians(module, xs)[""]
    W = layer_weight_2d(module).clone()
    W_hat = _perturbed(W, gen)
    predicted = lh.row_errors(W, W_hat)
    measured = _measured_row_mse(module, W_hat, xs)
    torch.testing.assert_close(predicted, measured, rtol=1e-9, atol=1e-12)
    assert float(predicted.sum()) > 0


def test_linear_sequence_input_is_2XtX_over_n(gen):
    lin = nn.Linear(6, 3)
    xs = [torch.randn(2, 7, 6, generator=gen) for _ in range(2)]
    lh = capture_hessians(lin, xs)[""]
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert lh.n_samples == 28
    torch.testing.assert_close(lh.H[0], _reference_H(X), rtol=1e-10, atol=1e-12)
    assert lh.info.kind == "linear" and lh.info.kernel == () and lh.info.groups == 1
    assert lh.info.macs == 7 * 6 * 3  # per sequence: T tokens × rows × cols


def test_streaming_equals_one_big_batch(gen):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    big = torch.randn(12, 3, 6, 6, generator=gen) * 3 + 2
    one = capture_hessians(conv, [big])[""]
    parts = capture_hessians(conv, list(big.split([1, 5, 2, 4])))[""]
    capped = capture_hessians(conv, list(big.split(3)), max_batches=2)[""]
    torch.testing.assert_close(parts.H, one.H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.mean, one.mean, rtol=1e-12, atol=1e-12)
    assert parts.n_samples == one.n_samples == 12 * 36
    assert capped.n_samples == 6 * 36


def test_centered_H_and_bias_correction(gen):
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1).double()
    xs = [torch.relu(torch.randn(4, 4, 5, 5, generator=gen, dtype=torch.float64)) + 1.0
          for _ in range(3)]
    lh = capture_hessians(conv, xs, centered=True)[""]
    X = torch.cat([_unfold_reference(conv, x) for x in xs], dim=1)
    Xc = X - X.mean(dim=1, keepdim=True)
    torch.testing.assert_close(lh.H, _reference_H(Xc), rtol=1e-10, atol=1e-12)
    assert lh.centered
    # With the bias update (W−Ŵ)μ, the output MSE equals the centred quadratic form.
    W = layer_weight_2d(conv).clone()
    W_hat = _perturbed(W, gen)
    fixed = _copy_with_weight(conv, W_hat)
    with torch.no_grad():
        fixed.bias += bias_correction(W, W_hat, lh.mean).to(fixed.bias.dtype)
    d = torch.cat([(conv(x) - fixed(x)).transpose(0, 1).reshape(6, -1) for x in xs], dim=1)
    torch.testing.assert_close(lh.row_errors(W, W_hat), (d**2).mean(1), rtol=1e-9, atol=1e-12)
    # ... and is smaller than without bias folding (inputs have a large mean).
    unc = capture_hessians(conv, xs)[""]
    assert float(lh.row_errors(W, W_hat).sum()) < float(unc.row_errors(W, W_hat).sum())


def test_block_diagonal_fallback(gen):
    lin = nn.Linear(10, 3)
    xs = [torch.randn(20, 10, generator=gen)]
    dense = capture_hessians(lin, xs)[""]
    with pytest.warns(UserWarning, match="block-diagonal"):
        blocked = capture_hessians(lin, xs, max_dense_cols=8, block_cols=4)[""]
    assert blocked.blocked and blocked.H.shape == (1, 3, 4, 4)
    spans = [(c.start, c.stop) for _, _, c, _ in blocked.iter_blocks()]
    assert spans == [(0, 4), (4, 8), (8, 10)]
    for _, rows, c, Hb in blocked.iter_blocks():
        assert rows == slice(0, 3)
        torch.testing.assert_close(Hb, dense.H[0][c, c], rtol=1e-12, atol=1e-12)
    assert torch.all(blocked.H[0, 2, 2:, :] == 0) and torch.all(blocked.H[0, 2, :, 2:] == 0)
    # Errors add up over blocks: with a perturbation inside one block they equal the dense form.
    W = layer_weight_2d(lin).clone()
    W_hat = W.clone()
    W_hat[:, 4:8] += 0.3
    torch.testing.assert_close(blocked.row_errors(W, W_hat), dense.row_errors(W, W_hat))


class _Net(nn.Module):
    """Registration order differs from forward order; holds unsupported modules."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.bn = nn.BatchNorm1d(4)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.reflect = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x, _ = self.lstm(x)
        x, _ = self.attn(x, x, x)
        x = self.conv(self.bn(x.transpose(1, 2)))
        return self.head(self.reflect(x).mean(-1))


def test_select_layers_lists_unsupported_and_forward_order(gen):
    net = _Net()
    layers, unsupported = select_layers(net)
    assert list(layers) == ["head", "conv"]
    skipped = {u.name: u for u in unsupported}
    assert set(skipped) == {"emb", "lstm", "attn", "attn.out_proj", "reflect"}
    assert "reflect" in str(skipped["reflect"])
    layers, unsupported = select_layers(net, include=("c*", "h*"), exclude=("head",))
    assert list(layers) == ["conv"] and unsupported == []
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hs = capture_hessians(net, [torch.randint(0, 10, (2, 5), generator=gen)])
    assert list(hs) == ["conv", "head"]  # forward order
    assert [h.info.index for h in hs.values()] == [0, 1]
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():  # BN statistics untouched (eval during capture)
        assert torch.equal(v, before[k]), k


def test_errors(gen):
    lin = nn.Linear(4, 2)
    with pytest.raises(InvalidInputError, match="no calibration batches"):
        capture_hessians(lin, [])
    with pytest.raises(InvalidInputError, match="no Linear"):
        capture_hessians(lin, [torch.randn(2, 4)], include=("nothing",))
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        seq[0].weight[0, 1] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"parameter 0\.weight\[0, 1\] is -Inf \(1 of 16"):
        capture_hessians(seq, [torch.randn(3, 4, generator=gen)])
    with pytest.raises(ShapeMismatchError):
        set_layer_weight_2d(lin, torch.zeros(4, 2))
    conv = nn.Conv2d(2, 3, 3)
    W2 = layer_weight_2d(conv) * 2
    set_layer_weight_2d(conv, W2)
    assert torch.equal(conv.weight.flatten(1), W2)


def test_unused_layer_warns(gen):
    seq = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hs = capture_hessians(seq, [torch.randn(2, 3, generator=gen)],
                              forward=lambda m, x: m["a"](x))
    assert list(hs) == ["a"]
    assert any("never called" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capture_matches_cpu(gen):
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1)
    xs = [torch.randn(4, 4, 8, 8, generator=gen) for _ in range(2)]
    cpu = capture_hessians(conv, xs)[""]
    gpu = capture_hessians(conv, xs, device="cuda")[""]
    assert gpu.H.is_cuda and conv.weight.device.type == "cpu"  # model moved back
    torch.testing.assert_close(gpu.H.cpu(), cpu.H, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Non-finite values name the culprit


class _GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(self.bn(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_non_finite_weight_is_named_by_parameter_and_index_before_any_forward(gen):
    net = _GroupedNet()
    with torch.no_grad():
        net.conv2.weight[3, 1, 0, 2] = float("nan")
        net.conv2.weight[5, 0, 1, 1] = float("inf")
    calls = _count_forwards(net)
    with pytest.raises(NonFiniteError) as exc:
        capture_hessians(net, [torch.randn(2, 2, 5, 5, generator=gen)])
    msg = str(exc.value)
    assert msg.startswith("parameter conv2.weight[3, 1, 0, 2] is NaN (2 of 144 values")
    assert "re-load" in msg
    assert calls == []  # found before any forward
    net = _GroupedNet()
    with torch.no_grad():
        net.bn.running_var[2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"buffer bn\.running_var\[2\] is NaN"):
        capture_hessians(net, [torch.randn(2, 2, 5, 5, generator=gen)])


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class _Sqrt(nn.Module):
    """fc1 -> (functional sqrt in this forward) -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sqrt(self.fc1(x)))


def test_non_finite_activation_names_the_first_module_whose_output_went_non_finite(gen):
    # encoder.layers.0.linear1 received NaN, but the log module produced it
    net = nn.Sequential()
    net.add_module("embed", nn.Linear(4, 4))
    block = nn.Sequential()
    block.add_module("log", _Log())
    block.add_module("linear1", nn.Linear(4, 4))
    net.add_module("block", block)
    x = [torch.randn(8, 4, generator=gen)]
    with pytest.raises(NonFiniteError) as exc:
        capture_hessians(net, x)
    msg = str(exc.value)
    assert "layer 'block.linear1' received NaN or Inf inputs" in msg
    assert "the first module whose output went non-finite is 'block.log' (_Log)" in msg
    # an operation between modules: named through the enclosing module
    with pytest.raises(NonFiniteError) as exc:
        capture_hessians(_Sqrt(), x)
    msg = str(exc.value)
    assert "layer 'fc2' received" in msg
    assert "the input of 'fc2' (Linear) is already non-finite" in msg
    assert "forward of '<model>' (_Sqrt)" in msg
    # bad calibration data
    bad = torch.randn(8, 4, generator=gen)
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"batch 1\): the calibration batch itself holds NaN"):
        capture_hessians(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), [torch.ones(8, 4), bad])
