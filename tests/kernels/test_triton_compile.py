"""Every Triton kernel variant the interpreter tests launch also compiles for sm_90 (H100/H200),
through ptxas to a cubin, on this CPU-only machine: compiled-mode errors (types of loop-carried
values, constexpr/tensor mixes, 3-D tile layouts) the interpreter lets through fail here. Once from
recorded launches (with each variant's ptxas build), once through Triton's own launcher. The
compiler runs in $ZOO_TRITON_COMPILER_PYTHON when set (.ci/triton_compat.sh: the GPU machines'
Triton)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.kernels.msda import triton as msda_triton
from zoo.kernels import triton as ta

from _triton_aot import bundle_problems, compile_specs, launch_every_variant, model_shaped_launches, record_launches

pytestmark = pytest.mark.skipif(not (ta.interpreter_enabled() and msda_triton.AVAILABLE),
                                reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def test_every_launched_kernel_variant_compiles_for_sm90(monkeypatch):
    specs = []
    with record_launches(specs):
        launch_every_variant(monkeypatch)
    specs += model_shaped_launches()     # the production tiles and dispatch, at the families' shapes
    names = {s["name"] for s in specs}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_keylist_fwd", "_keylist_bwd"} <= names
    assert any(n.startswith("msda") for n in names)
    # triton 3.6 (what the GPU machines have) compiles only bundles that are all values or all bundles
    assert not [p for s in specs for p in bundle_problems(s)]
    failures = compile_specs(specs, arch=90)
    assert not failures, "\n\n".join(f"{f['name']} {f['constexprs']}:\n{f['error']}" for f in failures)


def test_every_kernel_variant_compiles_through_the_triton_launcher():
    """The same launches and those of test_attention_gpu.py (production tiles, bf16, head dims to
    256), bound and specialised by Triton's JIT itself (bundles, ints equal to 1, alignment) and
    compiled for sm_90 with the interpreter off (tests/kernels/_triton_launcher.py)."""
    python = os.environ.get("ZOO_TRITON_COMPILER_PYTHON") or sys.executable
    script = Path(__file__).with_name("_triton_launcher.py")
    res = subprocess.run([python, str(script)], env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["errors"], "\n".join(out["errors"])
    variants = out["variants"]
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_keylist_fwd", "_keylist_bwd"} <= set(variants)
    assert any(n.startswith("msda") for n in variants)
    assert sum(variants.values()) >= 200, variants     # 265 with triton 3.6 and 3.8
