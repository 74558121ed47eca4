"""Every Triton kernel variant the interpreter tests launch also compiles for sm_90 (H100/H200),
through ptxas to a cubin, on this CPU-only machine: compiled-mode errors (types of loop-carried
values, constexpr/tensor mixes, 3-D tile layouts) the interpreter lets through fail here."""
import pytest
import torch

from zoo.kernels.msda import triton as msda_triton
from zoo.kernels import triton as ta

from _triton_aot import bundle_problems, compile_specs, model_shaped_launches, record_launches

pytestmark = pytest.mark.skipif(not (ta.interpreter_enabled() and msda_triton.AVAILABLE),
                                reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def test_every_launched_kernel_variant_compiles_for_sm90(monkeypatch):
    import test_attention_triton as A
    import test_msda as MS

    monkeypatch.setitem(ta.TILE_OPTIONS, "block_m", 16)
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_n", 16)
    specs = []
    with record_launches(specs):
        for name in A.CASES:
            A._check(name, torch.float32)
        for name in A.FP16:
            A._check(name, torch.float16)
        A.test_triton_head_dims_padded_and_dv_differs()
        for shape in ((2, 3, 37, 37, 6, (2, 3), 1, 24, 24, True), (2, 2, 21, 50, 1, (2, 1), 18, 32, 16, False),
                      (1, 2, 40, 29, 5, (1, 2), 0, 16, 40, False)):
            A.test_triton_key_lists_gather_kernel(shape, torch.float16, monkeypatch)
        A.test_triton_key_lists_gather_kernel((1, 2, 40, 29, 5, (1, 2), 0, 16, 40, False), torch.float32, monkeypatch)
        for det in (False, True):
            value, shapes, starts, loc, attn = MS._inputs(seed=5)
            MS._run("triton", value, shapes, starts, loc, attn, deterministic=det, padding_mode="border")
            h = [t.half() for t in (value, loc.clamp(-1e4, 1e4), attn)]
            MS._run("triton", h[0], shapes, starts, h[1], h[2], deterministic=det, align_corners=True)
    monkeypatch.undo()                   # the production tiles and dispatch, at the families' shapes
    specs += model_shaped_launches()
    names = {s["name"] for s in specs}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_keylist_fwd", "_keylist_bwd"} <= names
    assert any(n.startswith("msda") for n in names)
    # triton 3.6 (what the GPU machines have) compiles only bundles that are all values or all bundles
    assert not [p for s in specs for p in bundle_problems(s)]
    failures = compile_specs(specs, arch=90)
    assert not failures, "\n\n".join(f"{f['name']} {f['constexprs']}:\n{f['error']}" for f in failures)
