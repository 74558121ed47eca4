"""Compile the Triton kernels for a GPU architecture without a GPU.

The interpreter (how CI runs the kernels) is lenient where the compiler is not: loop-carried types,
constexpr/tensor mixes, layouts of 3-D tiles. `record_launches` captures the kernel launches of an
interpreter run (argument types, constexpr values, launch options); `compile_specs` compiles each
distinct launch for sm_90 in a subprocess with the interpreter off, through ptxas to a cubin, so
compiled-mode errors show up on a CPU-only machine.

`python tests/kernels/_triton_aot.py` prints ptxas's register and spill counts for the kernels at
the families' real tile shapes (how the launch configurations in triton/block_sparse.py were chosen).
"""
import contextlib
import inspect
import json
import os
import subprocess
import sys

import torch

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
        torch.bool: "*i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _type(fn, name, val, is_const):
    """(signature entry, constexpr value or None) of one argument, as the JIT specializes it. Tuples
    (argument bundles) are typed element by element; a NamedTuple keeps its class so fields read
    by name in the kernel. JSON form: a tuple is {"tuple": class path or None, "items": [...]}."""
    if isinstance(val, tuple) and not is_const:
        cls = None if type(val) is tuple else f"{type(val).__module__}:{type(val).__qualname__}"
        parts = [_type(fn, name, v, False) for v in val]
        return dict(tuple=cls, items=[p[0] for p in parts]), dict(tuple=cls, items=[p[1] for p in parts])
    if isinstance(val, torch.Tensor):
        return _PTR[val.dtype], None
    if is_const or val is None or type(val).__name__ == "constexpr" or (
            isinstance(val, int) and not isinstance(val, bool) and val == 1):
        # constexpr parameters and values, and ints equal to 1 (the JIT specializes those to constants)
        return "constexpr", _const(getattr(val, "value", val) if type(val).__name__ == "constexpr" else val)
    if isinstance(val, bool):
        return "i1", None
    if isinstance(val, int):
        return ("i32" if -2 ** 31 <= val < 2 ** 31 else "i64"), None
    if isinstance(val, float):
        return "fp32", None
    raise TypeError(f"{fn.__name__}: cannot type argument {name}={val!r}")


def _const(val):
    """JSON form of a constexpr value (dtypes as ["dtype", name], tuples as in `_type`)."""
    if isinstance(val, tuple):
        cls = None if type(val) is tuple else f"{type(val).__module__}:{type(val).__qualname__}"
        return dict(tuple=cls, items=[_const(v) for v in val])
    return ["dtype", str(val)] if type(val).__name__ == "dtype" else val


def _spec(fn, args, kwargs):
    params = inspect.signature(fn).parameters
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
    kwargs = {k: v for k, v in kwargs.items() if k in params}      # drop runner flags (warmup, ...)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    sig, const = {}, {}
    for name, p in params.items():
        val = bound.arguments.get(name, p.default)
        sig[name], c = _type(fn, name, val, "constexpr" in str(p.annotation))
        if sig[name] == "constexpr" or isinstance(sig[name], dict):
            const[name] = c
    return dict(module=fn.__module__, name=fn.__name__, signature=sig, constexprs=const, options=opts)


def flat_constexprs(spec) -> dict:
    """The constexpr values of a spec by field / parameter name (bundles flattened)."""
    out = {}

    def walk(name, v):
        if isinstance(v, dict) and "items" in v:
            fields = _fields(v["tuple"]) if v["tuple"] else [f"{name}[{i}]" for i in range(len(v["items"]))]
            for f, item in zip(fields, v["items"]):
                walk(f, item)
        elif v is not None:
            out[name] = v
    for name, v in spec["constexprs"].items():
        walk(name, v)
    return out


def bundle_problems(spec) -> list:
    """Argument bundles of a spec that triton 3.3-3.6's front end mishandles: a bundle holding
    both plain values and sub-bundles (a specialised constant inside the sub-bundle is lost when
    the compiler copies the bundle at a loop), and fields named like `tl.tuple`'s own attributes."""
    out = []

    def walk(name, entry):
        if not isinstance(entry, dict):
            return
        nested = [isinstance(i, dict) for i in entry["items"]]
        fields = _fields(entry["tuple"]) if entry["tuple"] else []
        if any(nested) and not all(nested):
            out.append(f"{spec['name']}: {name} mixes values and bundles")
        out.extend(f"{spec['name']}: {name}.{f} shadows tl.tuple.{f}" for f in fields if f in ("values", "type"))
        for f, item in zip(fields or range(len(nested)), entry["items"]):
            walk(f"{name}.{f}", item)

    for name, entry in spec["signature"].items():
        walk(name, entry)
    return out


def _fields(path):
    import importlib
    mod, qual = path.split(":")
    return list(getattr(importlib.import_module(mod), qual)._fields)


@contextlib.contextmanager
def record_launches(specs: list):
    """Append one spec per distinct interpreter launch to `specs` while the block runs."""
    from triton.runtime.interpreter import InterpretedFunction
    orig = InterpretedFunction.run
    seen = {json.dumps(s, sort_keys=True) for s in specs}

    def run(self, *args, **kwargs):
        spec = _spec(self.fn, args, {k: v for k, v in kwargs.items() if k != "grid"})
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
        return orig(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield specs
    finally:
        InterpretedFunction.run = orig


_COMPILER = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
arch, want_info = int(sys.argv[1]), sys.argv[2] == "1"


def cls(path, items):
    if path is None:
        return tuple(items)
    mod, qual = path.split(":")
    return getattr(importlib.import_module(mod), qual)(*items)


def sig(v):          # signature entry: a type string, or a (named) tuple of entries
    return cls(v["tuple"], [sig(i) for i in v["items"]]) if isinstance(v, dict) else v


def const(v):        # constexpr value: dtypes and (named) tuples rebuilt
    if isinstance(v, dict):
        return cls(v["tuple"], [const(i) for i in v["items"]])
    return tl.dtype(v[1]) if isinstance(v, list) and v[:1] == ["dtype"] else v


def paths(s, v, path, out):
    for i, (si, vi) in enumerate(zip(s["items"], v["items"])):
        if isinstance(si, dict):
            paths(si, vi, path + (i,), out)
        elif si == "constexpr":
            out[path + (i,)] = const(vi)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
failures, info = [], []
for spec in json.load(sys.stdin):
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = fn.arg_names
    consts = {}
    for k, v in spec["constexprs"].items():
        if spec["signature"][k] == "constexpr":
            consts[(names.index(k),)] = const(v)
        else:                                   # a runtime bundle: its constexpr elements by path
            paths(spec["signature"][k], v, (names.index(k),), consts)
    try:
        src = ASTSource(fn=fn, signature={k: sig(v) for k, v in spec["signature"].items()}, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as e:
        failures.append(dict(name=spec["name"], constexprs=spec["constexprs"], error=f"{type(e).__name__}: {e}"[:2000]))
        continue
    if want_info:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.devnull], capture_output=True,
                                 text=True).stderr
        num = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else -1
        info.append(dict(spec, registers=num(r"Used (\d+) registers"), spill_bytes=num(r"(\d+) bytes spill stores")))
json.dump(dict(failures=failures, info=info), sys.stdout)
"""


def compile_specs(specs, arch: int = 90, timeout: int = 900, ptxas_info: bool = False):
    """Compile every spec for sm_`arch` (interpreter off); -> list of failures (name, error), and
    with `ptxas_info` also each spec with its `registers` and `spill_bytes` (ptxas -v). The compiler
    runs in $ZOO_TRITON_COMPILER_PYTHON when set (another Triton version, .ci/triton_compat.sh)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    python = os.environ.get("ZOO_TRITON_COMPILER_PYTHON") or sys.executable
    res = subprocess.run([python, "-c", _COMPILER, str(arch), str(int(ptxas_info))], input=json.dumps(specs),
                         env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"the compile subprocess failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return (out["failures"], out["info"]) if ptxas_info else out["failures"]


def launch_every_variant(monkeypatch, call=lambda fn, *args: fn(*args)):
    """Launch the kernel variants the interpreter tests cover (their cases at 16x16 tiles), each
    through `call(fn, *args)`; the production tiles come from `model_shaped_launches`."""
    import test_attention_triton as A
    import test_msda as MS
    from zoo.kernels import triton as ta

    monkeypatch.setitem(ta.TILE_OPTIONS, "block_m", 16)
    monkeypatch.setitem(ta.TILE_OPTIONS, "block_n", 16)
    for name in A.CASES:
        call(A._check, name, torch.float32)
    for name in A.FP16:
        call(A._check, name, torch.float16)
    call(A.test_triton_head_dims_padded_and_dv_differs)
    for shape in ((2, 3, 37, 37, 6, (2, 3), 1, 24, 24, True), (2, 2, 21, 50, 1, (2, 1), 18, 32, 16, False),
                  (1, 2, 40, 29, 5, (1, 2), 0, 16, 40, False)):
        call(A.test_triton_key_lists_gather_kernel, shape, torch.float16, monkeypatch)
    call(A.test_triton_key_lists_gather_kernel, (1, 2, 40, 29, 5, (1, 2), 0, 16, 40, False), torch.float32,
         monkeypatch)
    for det in (False, True):
        value, shapes, starts, loc, attn = MS._inputs(seed=5)
        call(lambda: MS._run("triton", value, shapes, starts, loc, attn, deterministic=det, padding_mode="border"))
        h = [t.half() for t in (value, loc.clamp(-1e4, 1e4), attn)]
        call(lambda: MS._run("triton", h[0], shapes, starts, h[1], h[2], deterministic=det, align_corners=True))
    monkeypatch.undo()


HEAD_DIMS = [16, 24, 32, 40, 48, 64, 80, 96, 128, 256]
HEAD_DIM_LAYOUTS = ["dense", "window", "routed", "key_lists"]


def head_dim_inputs(d, layout, dev):
    """(layout, q, k, v) of test_attention_gpu.py's head-dim check: fp16, batch 2, 3 heads."""
    import zoo.kernels as zk
    torch.manual_seed(0)
    if layout == "dense":
        lay, L = None, 200
    elif layout == "window":
        lay, L = zk.window_2d(16, 16, 8, 3), 256
    elif layout == "routed":
        lay, L = zk.routed_topk(torch.randint(0, 4, (2, 4, 2), device=dev), 64), 256
    else:
        L = 197
        lay = zk.key_lists(torch.rand(2, 3, L, L, device=dev).topk(50, -1).indices, L, dense_rows=1)
    q, k, v = (torch.randn(2, 3, L, d, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    return lay, q, k, v


def keylist_gather_inputs(dtype, dev):
    """(layout, q, k, v) of test_attention_gpu.py's gather-kernel check: unused slots, an empty row,
    a dense row; batch 2, 3 heads, 197 tokens, D 64."""
    import zoo.kernels as zk
    from test_attention_triton import _keylist_case
    torch.manual_seed(0)
    lay = zk.key_lists(_keylist_case(2, 3, 197, 197, 50, 2, 3, seed=1).to(dev), 197, dense_rows=1)
    q, k, v = (torch.randn(2, 3, 197, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    return lay, q, k, v


def launch_gpu_test_variants(monkeypatch, call=lambda fn, *args: fn(*args)):
    """Launch what tests/kernels/test_attention_gpu.py launches on a GPU (production tiles): every
    interpreter case in fp32 / fp16 / bf16, the head-dim checks, the gather kernel in each dtype and
    the torch.compile tests' shapes (eagerly: the compiled graph calls the same kernels), each
    through `call`. Calls name backend="triton" where the GPU tests leave it to the router (which
    picks it for CUDA tensors)."""
    import test_attention_triton as A
    import zoo.kernels as zk
    from zoo.kernels.triton import key_lists as keylist_triton

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name in A.CASES:
            call(A._check, name, dtype)
    monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0)     # key lists: the gather kernel

    def head_dims(d, layout):
        lay, q, k, v = head_dim_inputs(d, layout, "cpu")
        torch.autograd.grad(zk.attention(q, k, v, lay, backend="triton").float().square().sum(), (q, k, v))
    for d in HEAD_DIMS:
        for layout in HEAD_DIM_LAYOUTS:
            call(head_dims, d, layout)

    def gather(dtype):
        lay, q, k, v = keylist_gather_inputs(dtype, "cpu")
        o, lse = zk.attention(q, k, v, lay, return_lse=True, backend="triton")
        torch.autograd.grad(o.float().sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), (q, k, v))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        call(gather, dtype)

    def compiled_tests_eager(gather):         # the shapes of the torch.compile tests, run eagerly
        monkeypatch.setattr(keylist_triton, "GATHER_MAX_KEEP", 1.0 if gather else 0.0)
        L = 197
        lay = zk.key_lists(torch.rand(2, 4, L, L).topk(50, -1).indices, L, dense_rows=1)
        q, k, v = (torch.randn(2, 4, L, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
        torch.autograd.grad(zk.attention(q, k, v, lay, backend="triton").float().sum(), (q, k, v))
        q, k, v = (torch.randn(2, 4, 256, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
        rh = torch.randn(2, 4, 256, 23, dtype=torch.float16, requires_grad=True)
        o = zk.attention(q, k, v, zk.window_2d(16, 16, 8, 2), bias=zk.RelPosBias(rh, rh), backend="triton")
        torch.autograd.grad(o.float().sum(), (q, k, v, rh))
    for g in (True, False):
        call(compiled_tests_eager, g)
    monkeypatch.undo()


def model_shaped_launches():
    """Interpreter launches (fp16, batch 1, one head) at the families' tile shapes."""
    import zoo.kernels as zk
    specs = []

    def run(lay, Lq, Lk, D, bias=None, score_mod=None):
        q, k, v = (torch.randn(1, 1, L, D, dtype=torch.float16, requires_grad=True) for L in (Lq, Lk, Lk))
        zk.attention(q, k, v, lay, bias=bias, score_mod=score_mod, backend="triton").float().sum().backward()

    with record_launches(specs):
        for D in (16, 32, 64):                   # HaloNet: 8x8 blocks, halo 3, rel-pos logits
            rh = torch.randn(1, 1, 256, 27, dtype=torch.float16)
            run(zk.window_2d(16, 16, 8, 3), 256, 256, D, bias=zk.RelPosBias(rh, rh))
        for D in (32, 64):                       # BiFormer: 64-token regions, top-2
            run(zk.routed_topk(torch.randint(0, 4, (1, 4, 2)), 64), 256, 256, D)
        run(zk.varlen(torch.tensor([0, 100, 256])), 256, 256, 64)                         # PartCrafter parts
        run(None, 197, 197, 64, score_mod=zk.GaussianMixture(torch.randn(1, 2), torch.rand(1, 2) + 0.5, (14, 14),
                                                               num_prefix_tokens=1))     # GMM-ViT
        run(zk.causal(200, prefix=70), 200, 200, 64,                                     # Puppeteer
            bias=zk.IndexedBias(torch.randn(1, 4, dtype=torch.float16), torch.randint(0, 4, (1, 200, 200))))
        run(zk.from_dense_mask(torch.rand(1, 1, 197, 197) > 0.7), 197, 197, 64)          # Sparsifiner's mask
        run(zk.key_lists(torch.rand(1, 1, 197, 197).topk(12, -1).indices, 197, dense_rows=1), 197, 197, 64)
        run(None, 256, 256, 128)                 # wide heads
    return specs


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1: the launches are recorded from the interpreter")
    fails, rows = compile_specs(model_shaped_launches(), ptxas_info=True)
    for r in rows:
        c = flat_constexprs(r)
        tile = "x".join(str(c[k]) for k in ("BM", "BN") if k in c)
        print(f"{r['name']:<16} D={c.get('DP', c.get('D', '')):<4} tile={tile:<6} bias={c.get('BIAS', '-')} "
              f"gmm={c.get('GMM', '-')} {r['options']} registers={r['registers']} spill_bytes={r['spill_bytes']}")
    for f in fails:
        print("FAILED", f["name"], f["error"][:500])
