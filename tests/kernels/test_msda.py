"""Multi-scale deformable attention: Triton kernels (CPU interpreter) and the chunked reference
against the plain grid_sample formulation, gradients, and the detrex-compatible module."""
import os
import sys

import pytest
import torch

from zoo.kernels.msda import op as msda
from zoo.kernels.msda import triton as msda_triton
from zoo.kernels.msda import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_grid_sample

RAGGED = [(5, 7), (3, 4), (2, 2)]

needs_interp = pytest.mark.skipif(
    not (msda_triton.AVAILABLE and msda_triton.INTERPRETER),
    reason="Triton kernel tests run on CPU only under TRITON_INTERPRET=1 (set by tests/conftest.py)")


def _shapes(levels):
    shapes = torch.tensor(levels, dtype=torch.int64)
    hw = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    return shapes, starts, int(hw.sum())


def _inputs(levels=RAGGED, N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float32, seed=0, spread=1.6):
    """Random inputs with locations spread beyond [0, 1] plus a few exact edge / far-away ones."""
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = _shapes(levels)
    L = len(levels)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g) * spread - (spread - 1) / 2
    loc[0, 0, 0, 0, 0] = torch.tensor([-3.0, 0.45])   # far left: nothing (zeros) / the edge (border)
    loc[0, 0, 0, 1, 0] = torch.tensor([0.55, 7.0])    # far below
    loc[-1, -1, -1, -1, -1] = torch.tensor([1.0, 0.0])  # exact corner of the map
    loc[-1, 0, 0, -1, 0] = torch.tensor([1e9, -1e9])  # wild values must not overflow indices
    attn = torch.rand(N, Lq, M, L, P, generator=g)
    return value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)


def _grads(out, inputs, seed=1):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, go)


def _run(backend, value, shapes, starts, loc, attn, **kw):
    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = ms_deform_attn(v, shapes, starts, l, a, backend=backend, **kw)
    return (out,) + tuple(_grads(out, (v, l, a)))


def _assert_close(got, ref, atol, rtol, what):
    for name, x, y in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref):
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")


# ------------------------------------------------------------------------------------------------
# reference path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_reference_matches_grid_sample_formulation(padding_mode, align_corners, monkeypatch):
    # force several query chunks so the chunked forward/backward is exercised
    monkeypatch.setattr(msda, "_REF_CHUNK_ELEMS", 2 * 2 * 8 * 3 * 2 * 2)
    value, shapes, starts, loc, attn = _inputs(Lq=7)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    got = _run("reference", value, shapes, starts, loc, attn, **kw)
    v, l, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    base = ms_deform_attn_grid_sample(v, shapes, l, a, **kw)
    ref = (base,) + tuple(_grads(base, (v, l, a)))
    _assert_close(got, ref, 1e-5, 1e-5, "reference vs grid_sample")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_reference_gradcheck_fp64(padding_mode):
    value, shapes, starts, loc, attn = _inputs(levels=[(3, 4), (2, 2)], N=1, Lq=3, M=2, D=3, P=2,
                                               dtype=torch.float64, seed=3, spread=1.2)
    value.requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()

    def f(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a, padding_mode=padding_mode, backend="reference")

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-6)


def test_reference_known_answers():
    shapes, starts, S = _shapes([(4, 4)])
    value = torch.arange(S * 2, dtype=torch.float32).view(1, S, 1, 2)
    i, j = 2, 1  # pixel centre of row 2, column 1 -> exactly value[2*4 + 1]
    loc = torch.tensor([(j + 0.5) / 4, (i + 0.5) / 4]).view(1, 1, 1, 1, 1, 2)
    attn = torch.ones(1, 1, 1, 1, 1)
    for backend in ("reference",) + (("triton",) if msda_triton.INTERPRETER and msda_triton.AVAILABLE else ()):
        out = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
        torch.testing.assert_close(out.view(2), value[0, i * 4 + j, 0], atol=0, rtol=0)
        # beyond the map: zero with zeros padding, the nearest edge pixel with border padding
        far = torch.tensor([1.7, (i + 0.5) / 4]).view(1, 1, 1, 1, 1, 2)
        assert ms_deform_attn(value, shapes, starts, far, attn, backend=backend).abs().max() == 0
        out = ms_deform_attn(value, shapes, starts, far, attn, padding_mode="border", backend=backend)
        torch.testing.assert_close(out.view(2), value[0, i * 4 + 3, 0], atol=0, rtol=0)
    # uniform weights over levels holding the same constant -> that constant
    shapes, starts, S = _shapes(RAGGED)
    value = torch.full((1, S, 2, 3), 2.5)
    loc = torch.rand(1, 4, 2, 3, 2, 2) * 0.48 + 0.26  # inside every map, even 2x2
    attn = torch.full((1, 4, 2, 3, 2), 1 / 6)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn),
                               torch.full((1, 4, 6), 2.5))


def test_reference_low_precision_and_subset():
    value, shapes, starts, loc, attn = _inputs(Lq=9)
    full = ms_deform_attn(value, shapes, starts, loc, attn)
    # a data-dependent subset of queries (Focus-DETR's foreground tokens) = rows of the full result
    idx = torch.tensor([7, 2, 4])
    sub = ms_deform_attn(value, shapes, starts, loc[:, idx], attn[:, idx])
    torch.testing.assert_close(sub, full[:, idx], atol=1e-6, rtol=0)
    empty = ms_deform_attn(value, shapes, None, loc[:, :0], attn[:, :0])
    assert empty.shape == (2, 0, 16)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc, attn)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, atol=5e-2, rtol=2e-2)


def test_input_errors(monkeypatch):
    value, shapes, starts, loc, attn = _inputs()
    with pytest.raises(ValueError, match="padding_mode"):
        ms_deform_attn(value, shapes, starts, loc, attn, padding_mode="reflection")
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="cuda")
    with pytest.raises(ValueError, match="value must be"):
        ms_deform_attn(value[0], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, shapes, starts, loc[..., :1], attn)
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn(value[:, 1:], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts + 1, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes.float(), starts, loc, attn)
    with pytest.raises(TypeError, match="float16"):
        ms_deform_attn(value.long(), shapes, starts, loc, attn)
    monkeypatch.setattr(msda_triton, "INTERPRETER", False)
    if msda_triton.AVAILABLE:
        with pytest.raises(ValueError, match="CUDA"):
            ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")


def test_reference_without_triton(monkeypatch):
    """With triton not importable the module still imports and the reference path runs.
    kernels/msda/ is loaded a second time as a bare package, with `import triton` made to fail."""
    import importlib
    import types

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    pkg = types.ModuleType("_msda_probe")
    pkg.__path__ = [os.path.dirname(msda.__file__)]
    monkeypatch.setitem(sys.modules, "_msda_probe", pkg)
    try:
        probe = importlib.import_module("_msda_probe.op")
        assert not importlib.import_module("_msda_probe.triton").AVAILABLE
        value, shapes, starts, loc, attn = _inputs()
        torch.testing.assert_close(probe.ms_deform_attn(value, shapes, None, loc, attn),
                                   ms_deform_attn(value, shapes, starts, loc, attn, backend="reference"))
        with pytest.raises(RuntimeError, match="triton"):
            probe.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
    finally:
        for name in ("_msda_probe.op", "_msda_probe.triton"):
            sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------
# triton kernels under the interpreter
# ------------------------------------------------------------------------------------------------
@needs_interp
@pytest.mark.parametrize("padding_mode,align_corners,deterministic", [
    ("zeros", False, False), ("zeros", True, True), ("border", False, True), ("border", True, False)])
def test_triton_matches_reference_fp32(padding_mode, align_corners, deterministic):
    value, shapes, starts, loc, attn = _inputs(seed=5)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    ref = _run("reference", value, shapes, starts, loc, attn, **kw)
    got = _run("triton", value, shapes, starts, loc, attn, deterministic=deterministic, **kw)
    _assert_close(got, ref, 2e-5, 1e-5, f"triton fp32 {kw}")


@needs_interp
@pytest.mark.parametrize("padding_mode,align_corners", [("border", False), ("zeros", True)])
def test_triton_fp16_and_odd_head_dim(padding_mode, align_corners):
    value, shapes, starts, loc, attn = _inputs(seed=7, D=6, M=3, Lq=4)
    h = [t.half() for t in (value, loc.clamp(-1e4, 1e4), attn)]  # the 1e9 test point would be inf
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    # oracle: the same fp16-rounded inputs, computed in fp32
    ref = _run("reference", h[0].float(), shapes, starts, h[1].float(), h[2].float(), **kw)
    for det in (False, True):
        got = _run("triton", h[0], shapes, starts, h[1], h[2], deterministic=det, **kw)
        assert got[0].dtype == torch.float16 and got[2].dtype == torch.float16
        _assert_close(got, ref, 1e-2, 5e-3, f"triton fp16 det={det} {kw}")
    # fp16 value with fp32 locations / weights (what autocast produces) is accepted as is
    got = _run("triton", h[0], shapes, starts, h[1].float(), h[2].float(), **kw)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32
    _assert_close(got, ref, 1e-2, 5e-3, f"triton mixed dtypes {kw}")


@needs_interp
def test_triton_deterministic_and_subset():
    value, shapes, starts, loc, attn = _inputs(seed=9, Lq=6)
    a = _run("triton", value, shapes, starts, loc, attn, deterministic=True)
    b = _run("triton", value, shapes, starts, loc, attn, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    idx = torch.tensor([5, 0, 3])
    sub = ms_deform_attn(value, shapes, starts, loc[:, idx], attn[:, idx], backend="triton")
    torch.testing.assert_close(sub, a[0][:, idx], atol=1e-6, rtol=0)
    # a gathered (non-contiguous) query set and an empty one
    sub_nc = ms_deform_attn(value, shapes, starts, loc.transpose(0, 1)[idx].transpose(0, 1),
                            attn[:, idx], backend="triton")
    torch.testing.assert_close(sub_nc, sub, atol=0, rtol=0)
    # a hot spot: every query samples the same place, so value rows collect long contribution lists
    hot = loc.clone()
    hot[..., 0], hot[..., 1] = 0.37, 0.61
    hot = hot.repeat(1, 4, 1, 1, 1, 1)
    attn4 = attn.repeat(1, 4, 1, 1, 1)
    ref = _run("reference", value, shapes, starts, hot, attn4)
    got = _run("triton", value, shapes, starts, hot, attn4, deterministic=True)
    _assert_close(got, ref, 1e-4, 1e-5, "triton deterministic, hot spot")
    v = value.clone().requires_grad_()
    out = ms_deform_attn(v, shapes, starts, loc[:, :0], attn[:, :0], backend="triton")
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert v.grad is not None and v.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------
def _detrex_oracle(mod, query, value, identity, query_pos, key_padding_mask, ref, shapes):
    """Straight transcription of detrex's MultiScaleDeformableAttention.forward (batch_first=False,
    eval mode) on top of the plain grid_sample formulation."""
    M, L, P = mod.num_heads, mod.num_levels, mod.num_points
    if identity is None:
        identity = query
    q = (query + query_pos).permute(1, 0, 2)
    v = value.permute(1, 0, 2)
    N, Lq, _ = q.shape
    S = v.shape[1]
    v = mod.value_proj(v).masked_fill(key_padding_mask[..., None], 0.0).view(N, S, M, -1)
    off = mod.sampling_offsets(q).view(N, Lq, M, L, P, 2)
    aw = mod.attention_weights(q).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
    if ref.shape[-1] == 2:
        norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    out = mod.output_proj(ms_deform_attn_grid_sample(v, shapes, loc, aw)).permute(1, 0, 2)
    return out + identity


def _detrex_state_dict(C=32, M=4, L=3, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "sampling_offsets.weight": (M * L * P * 2, C), "sampling_offsets.bias": (M * L * P * 2,),
        "attention_weights.weight": (M * L * P, C), "attention_weights.bias": (M * L * P,),
        "value_proj.weight": (C, C), "value_proj.bias": (C,),
        "output_proj.weight": (C, C), "output_proj.bias": (C,),
    }
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def test_module_init_matches_deformable_detr():
    mod = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    b = mod.sampling_offsets.bias.view(4, 3, 2, 2)
    # head h points along angle 2*pi*h/4 scaled onto the unit square, point i at radius i+1
    expect = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(b[:, 0, 0], expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(b[:, 2, 1], 2 * expect, atol=1e-6, rtol=0)
    assert mod.sampling_offsets.weight.abs().max() == 0 and mod.attention_weights.weight.abs().max() == 0
    assert mod.value_proj.bias.abs().max() == 0 and mod.output_proj.bias.abs().max() == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_loads_detrex_weights_and_matches(ref_dim):
    C, M, L, P = 32, 4, 3, 2
    mod = MultiScaleDeformableAttention(embed_dim=C, num_heads=M, num_levels=L, num_points=P).eval()
    mod.load_state_dict(_detrex_state_dict(C, M, L, P), strict=True)
    shapes, starts, S = _shapes(RAGGED)
    g = torch.Generator().manual_seed(1)
    N, Lq = 2, 6
    value = torch.randn(S, N, C, generator=g)
    query = torch.randn(Lq, N, C, generator=g)
    pos = torch.randn(Lq, N, C, generator=g)
    ref = torch.rand(N, Lq, L, ref_dim, generator=g)
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[1, -5:] = True  # the last 5 tokens of image 1 are padding
    with torch.no_grad():
        out = mod(query, value=value, query_pos=pos, key_padding_mask=mask, reference_points=ref,
                  spatial_shapes=shapes, level_start_index=starts)
        expect = _detrex_oracle(mod, query, value, None, pos, mask, ref, shapes)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        # masked value tokens cannot influence the output
        value2 = value.clone()
        value2[-5:, 1] += 100.0
        out2 = mod(query, value=value2, query_pos=pos, key_padding_mask=mask, reference_points=ref,
                   spatial_shapes=shapes, level_start_index=starts)
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=0)
        # batch_first gives the same numbers in (N, L, C)
        mod_bf = MultiScaleDeformableAttention(embed_dim=C, num_heads=M, num_levels=L, num_points=P,
                                               batch_first=True).eval()
        mod_bf.load_state_dict(mod.state_dict())
        out_bf = mod_bf(query.transpose(0, 1), value=value.transpose(0, 1), query_pos=pos.transpose(0, 1),
                        key_padding_mask=mask, reference_points=ref, spatial_shapes=shapes,
                        level_start_index=starts)
        torch.testing.assert_close(out_bf, out.transpose(0, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reference_points"):
        mod(query, value=value, reference_points=ref[..., :1], spatial_shapes=shapes)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mod(query, value=value, reference_points=ref, spatial_shapes=shapes, key_padding_mask=mask[:, 1:])


@needs_interp
def test_module_triton_backward_matches_reference():
    C, M, L, P = 16, 2, 3, 2
    torch.manual_seed(0)
    mods = {}
    for backend in ("reference", "triton"):
        mods[backend] = MultiScaleDeformableAttention(C, M, L, P, dropout=0.0, batch_first=True,
                                                      backend=backend)
    mods["triton"].load_state_dict(_detrex_state_dict(C, M, L, P, seed=2))
    mods["reference"].load_state_dict(mods["triton"].state_dict())
    shapes, starts, S = _shapes(RAGGED)
    x = torch.randn(1, S, C)
    ref = torch.rand(1, 3, L, 4)
    q = torch.randn(1, 3, C)
    grads = {}
    for backend, mod in mods.items():
        out = mod(q, value=x, reference_points=ref, spatial_shapes=shapes, level_start_index=starts)
        out.square().sum().backward()
        grads[backend] = (out.detach(),) + tuple(p.grad.clone() for p in mod.parameters())
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
