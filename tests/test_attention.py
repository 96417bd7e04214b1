"""Attention: the unfused MultiheadAttention against the fused reference, and compression of it.

The reference is always the user's own ``nn.MultiheadAttention`` on a copy of the model. With the
MHA fast paths off both run the same operations in the same order; only the in-projection GEMM is
split in three (q, k, v), which BLAS may sum in another order. The equivalence tests therefore run
in float64 and allow 1e-12 (a wrong mask, scale or head split is off by O(1)); with the fast paths
on (fused native kernels, nested tensors) the tolerance is float32-like.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from _attention_task import WIDTH, EncoderClassifier, make_task
from torch import nn

from automl_compress.attention import (
    UnfusedMultiheadAttention,
    fuse_attention,
    unfuse_attention,
    unfuse_task,
)
from automl_compress.capture import capture_hessians, select_layers
from automl_compress.config import load_config
from automl_compress.database.allocate import allocate_dp
from automl_compress.database.build import build_database
from automl_compress.evaluate import correct, dense_stats, metric
from automl_compress.stitch import stitch


@contextlib.contextmanager
def fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _same(a, b, exact: bool = True):
    """Equal up to summation order (float64: 1e-12), or float32 round-off when not ``exact``."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y, exact)
        return
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    tol = 1e-12 if exact else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _inputs(batch_first: bool, kdim: int, vdim: int, gen: torch.Generator):
    B, L, S, E = 3, 5, 6, 8
    f64 = {"generator": gen, "dtype": torch.float64}
    q = torch.randn((B, L, E) if batch_first else (L, B, E), **f64)
    k = torch.randn((B, S, kdim) if batch_first else (S, B, kdim), **f64)
    v = torch.randn((B, S, vdim) if batch_first else (S, B, vdim), **f64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    return q, k, v, kpm


MHA_VARIANTS = {
    "packed": {},
    "kdim_vdim": {"kdim": 6, "vdim": 4},
    "no_bias": {"bias": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "dropout": {"dropout": 0.3},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # on purpose
def test_unfused_mha_equals_fused_reference(batch_first, variant):
    torch.manual_seed(0)
    kw = MHA_VARIANTS[variant]
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64, **kw)
    with torch.no_grad():
        if ref.in_proj_bias is not None:  # the default init zeroes the biases
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ref.eval()
    state = copy.deepcopy(ref.state_dict())
    un = unfuse_attention(ref)
    assert isinstance(un, UnfusedMultiheadAttention) and isinstance(un.q_proj, nn.Linear)
    assert all(torch.equal(v, state[k]) for k, v in ref.state_dict().items())  # not modified
    gen = torch.Generator().manual_seed(1)
    q, k, v, kpm = _inputs(batch_first, ref.kdim, ref.vdim, gen)
    L, S = q.shape[1 if batch_first else 0], k.shape[1 if batch_first else 0]
    float_mask = torch.randn(3 * 2, L, S, generator=gen, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)[:, :S]
    calls = [
        dict(),
        dict(need_weights=False),
        dict(key_padding_mask=kpm),
        dict(key_padding_mask=kpm, need_weights=False),
        dict(attn_mask=torch.rand(L, S, generator=gen) > 0.7),
        dict(attn_mask=float_mask, average_attn_weights=False),
        dict(attn_mask=float_mask, key_padding_mask=kpm, need_weights=False),
    ]
    calls.append(dict(attn_mask=causal, is_causal=True, need_weights=False))
    with fastpath(False), torch.no_grad():
        for call in calls:
            _same(ref(q, k, v, **call), un(q, k, v, **call))
        if ref._qkv_same_embed_dim:  # self-attention, and unbatched input
            _same(ref(q, q, q), un(q, q, q))
            square = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
            # the causal hint with the weights asked for: the mask is applied, not dropped
            _same(ref(q, q, q, attn_mask=square, is_causal=True),
                  un(q, q, q, attn_mask=square, is_causal=True))
            x = q[0] if batch_first else q[:, 0]
            _same(ref(x, x, x, need_weights=False), un(x, x, x, need_weights=False))
    if ref._qkv_same_embed_dim and batch_first and not kw:
        with torch.no_grad():  # the native fused kernel of nn.MultiheadAttention
            _same(ref(q, q, q, key_padding_mask=kpm[:, :5]),
                  un(q, q, q, key_padding_mask=kpm[:, :5]), exact=False)
    back = fuse_attention(un)
    assert type(back) is nn.MultiheadAttention
    fused_state = back.state_dict()
    assert fused_state.keys() == state.keys()
    assert all(torch.equal(fused_state[k], state[k]) for k in state)


def _encoder(batch_first: bool, norm_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1,
                                       batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first).double().eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_transformer_encoder_with_and_without_fast_path(batch_first):
    model = _encoder(batch_first)
    un = unfuse_attention(model)
    assert un is not model and isinstance(model.layers[0].self_attn, nn.MultiheadAttention)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 7, 8) if batch_first else (7, 3, 8), generator=gen, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    calls = [dict(), dict(src_key_padding_mask=kpm), dict(mask=causal, is_causal=True)]
    with torch.no_grad():
        for call in calls:
            with fastpath(False):
                _same(model(x, **call), un(x, **call))
            # fast path: TransformerEncoder's nested tensors and the fused layer kernel run on
            # the reference; padded positions are zeros there (nested) and real values here
            ref, out = model(x, **call), un(x, **call)
            keep = ~kpm if "src_key_padding_mask" in call else torch.ones_like(kpm)
            if not batch_first:
                ref, out = ref.transpose(0, 1), out.transpose(0, 1)
            torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    # the unfused copy in training mode (grad on) runs the same slow path as the reference
    model.train()
    un.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = un(x)
    _same(a, b)


def test_decoder_cross_attention_and_norm_first():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, batch_first=True,
                                     norm_first=True).double().eval()
    un = unfuse_attention(dec)
    names = {n for n, m in un.named_modules() if isinstance(m, nn.Linear)}
    assert {"self_attn.q_proj", "multihead_attn.k_proj", "multihead_attn.out_proj"} <= names
    gen = torch.Generator().manual_seed(0)
    tgt = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    mem = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _same(dec(tgt, mem), un(tgt, mem))
    model = _encoder(True, norm_first=True)
    x = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _same(model(x), unfuse_attention(model)(x))


def test_capture_sees_every_projection_and_the_user_model_is_kept():
    model = _encoder(True)
    before = copy.deepcopy(model.state_dict())
    layers, unsupported = select_layers(model)
    assert "layers.0.self_attn" in {u.name for u in unsupported}
    assert "unfuse_attention" in str(next(u for u in unsupported if u.name.endswith("self_attn")))
    un = unfuse_attention(model)
    layers, unsupported = select_layers(un)
    assert unsupported == []
    expected = [f"layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "linear1", "linear2")]
    assert sorted(layers) == sorted(expected)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    hs = capture_hessians(un, xs)
    assert list(hs) == expected  # forward order: q, k, v, out, then the feed-forward
    # q, k and v see the attention input, so they share one Hessian
    for i in range(2):
        a = hs[f"layers.{i}.self_attn.q_proj"].H
        assert torch.equal(a, hs[f"layers.{i}.self_attn.k_proj"].H)
        assert torch.equal(a, hs[f"layers.{i}.self_attn.v_proj"].H)
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(hs["layers.0.self_attn.q_proj"].H[0], 2 * X.T @ X / len(X))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)


def test_unfuse_task_leaves_models_without_attention_alone():
    from _compress_task import make_task as make_cnn_task

    cnn = make_cnn_task()
    assert unfuse_task(cnn) is cnn
    task = make_task()
    un = unfuse_task(task)
    assert un.model is not task.model
    assert isinstance(task.model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(un.model.encoder.layers[0].self_attn, UnfusedMultiheadAttention)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The attention task through load_task (dotted path), a database, a DP plan at 4 bits."""
    from automl_compress.zoo.registry import load_task

    cfg = load_config(None, ["task.name=_attention_task:make_task", "menu.bits=[0, 2, 4, 8]",
                             "menu.patterns=[dense, '2:4']", "solver.quant=gptq",
                             "solver.prune=sparsegpt", "device=cpu"])
    task = load_task(cfg.task)
    db = build_database(task, cfg, tmp_path_factory.mktemp("db"), progress=False)
    plan = allocate_dp(db.tables(), 4.0, cfg.cost)
    model = correct(task.model, stitch(task.model, db, plan), task, plan, cfg.eval,
                    dense_stats(task.model, task))
    return cfg, task, db, plan, model


def test_every_projection_is_compressed_and_evaluated(compressed):
    cfg, task, db, plan, model = compressed
    names = [i.name for i in db.order]
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"encoder.layers.{i}.self_attn.{p}" in names
    assert set(plan.layers) == set(names)
    dense, comp = dict(task.model.named_modules()), dict(model.named_modules())
    for name in names:
        assert not torch.equal(dense[name].weight, comp[name].weight), name
    # the evaluated model runs through the projections: zeroing one changes the outputs
    x = task.calib[0]
    with torch.no_grad():
        base = model(x)
        m2 = copy.deepcopy(model)
        for p in ("q_proj", "out_proj"):
            getattr(m2.encoder.layers[0].self_attn, p).weight.add_(0.5)
            assert not torch.allclose(base, m2(x)), p
    assert 0.0 <= metric(model, task) <= 1.0


def test_stitched_export_and_state_dict_round_trip(compressed, tmp_path):
    from automl_compress.export import export_compressed, export_state_dict, load_compressed

    cfg, task, db, plan, model = compressed
    path = tmp_path / "c.safetensors"
    export_compressed(path, model, db, plan, cost=cfg.cost)
    reloaded = load_compressed(path, lambda: EncoderClassifier())
    assert isinstance(reloaded.encoder.layers[0].self_attn, nn.MultiheadAttention)
    sd_path = tmp_path / "state_dict.pt"
    export_state_dict(sd_path, model)
    fresh = EncoderClassifier()  # the user's own classes, fused in_proj_weight
    fresh.load_state_dict(torch.load(sd_path, weights_only=True))
    fresh.eval()
    x = torch.cat(list(task.calib))
    with fastpath(False), torch.no_grad():
        y = model(x)
        assert torch.equal(y, reloaded(x))
        assert torch.equal(y, fresh(x))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    W, E = fresh.encoder.layers[1].self_attn.in_proj_weight, WIDTH
    assert torch.equal(W[E : 2 * E], model.encoder.layers[1].self_attn.k_proj.weight)


def test_model_and_inputs_alone_get_unfused_attention():
    """The task made from a model and inputs (no Task factory) compresses the projections too,
    and its fidelity metric still compares with the user's own dense model."""
    from automl_compress.config import TaskConfig
    from automl_compress.zoo.registry import load_task

    task = load_task(TaskConfig(name="_attention_task:make_model",
                                inputs="_attention_task:make_inputs", distance="kl"))
    attn = task.model.encoder.layers[0].self_attn
    assert isinstance(attn, UnfusedMultiheadAttention)
    layers, unsupported = select_layers(task.model)
    assert "encoder.layers.0.self_attn.v_proj" in layers and unsupported == []
    assert task.evaluate(task.model) == pytest.approx(0.0, abs=1e-6)  # fused vs unfused: round-off
    with torch.no_grad():
        attn.out_proj.weight.mul_(0.0)
    assert task.evaluate(task.model) < -1e-4
