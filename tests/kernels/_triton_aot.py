"""Compile the Triton kernels for a GPU architecture without a GPU.

The interpreter (how CI runs the kernels) is lenient where the compiler is not: loop-carried types,
constexpr/tensor mixes, layouts of 3-D tiles. `record_launches` captures the kernel launches of an
interpreter run (argument types, constexpr values, launch options); `compile_specs` compiles each
distinct launch for sm_90 in a subprocess with the interpreter off, through ptxas to a cubin, so
compiled-mode errors show up on a CPU-only machine.
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


def _spec(fn, args, kwargs):
    params = inspect.signature(fn).parameters
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
    kwargs = {k: v for k, v in kwargs.items() if k in params}      # drop runner flags (warmup, ...)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    sig, const = {}, {}
    for name, p in params.items():
        val = bound.arguments.get(name, p.default)
        is_const = "constexpr" in str(p.annotation)
        if isinstance(val, torch.Tensor):
            sig[name] = _PTR[val.dtype]
        elif is_const or val is None or (isinstance(val, int) and not isinstance(val, bool) and val == 1):
            # constexpr parameters, and ints equal to 1 (the JIT specializes those to constants)
            sig[name] = "constexpr"
            const[name] = ["dtype", str(val)] if type(val).__name__ == "dtype" else val
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            sig[name] = "i32" if -2 ** 31 <= val < 2 ** 31 else "i64"
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={val!r}")
    return dict(module=fn.__module__, name=fn.__name__, signature=sig, constexprs=const, options=opts)


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
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
arch = int(sys.argv[1])
failures = []
for spec in json.load(sys.stdin):
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = fn.arg_names
    consts = {}
    for k, v in spec["constexprs"].items():
        if isinstance(v, list) and v[:1] == ["dtype"]:
            v = tl.dtype(v[1])
        consts[(names.index(k),)] = v
    try:
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as e:
        failures.append(dict(name=spec["name"], constexprs=spec["constexprs"], error=f"{type(e).__name__}: {e}"[:2000]))
json.dump(failures, sys.stdout)
"""


def compile_specs(specs, arch: int = 90, timeout: int = 900):
    """Compile every spec for sm_`arch` (interpreter off); -> list of failures (name, error)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _COMPILER, str(arch)], input=json.dumps(specs), env=env,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"the compile subprocess failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
