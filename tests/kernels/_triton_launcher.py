"""Compile every kernel variant through Triton's own launcher, for sm_90, without a GPU.

`_triton_aot.compile_specs` rebuilds each launch's signature from a record; this script instead
drives the same launches (`launch_every_variant`, `model_shaped_launches`), and those of the GPU
tests (`launch_gpu_test_variants`: production tiles, bf16, head dims to 256), with the interpreter off,
so Triton's JIT binds and specialises the real arguments (argument bundles, ints equal to 1,
pointer alignment) exactly as on a GPU. A stand-in driver reports an sm_90 device and every launch
compiles without running (`warmup`); the outputs are never written, so the tests' numeric checks
fail and are ignored here (`unchecked` counts them). Prints one JSON line: launches and distinct
compiled variants per kernel, the errors and `unchecked`. Run by tests/kernels/test_triton_compile.py (any Triton >= 3.3, CPU tensors).
"""
import collections
import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"          # before triton is imported: kernels compile
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StandInDriver:
    """What the launcher asks of the CUDA driver before it compiles: an sm_90 device and stream."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


launches, variants, errors, unchecked = collections.Counter(), collections.defaultdict(set), [], [0]
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    launches[self.fn.__name__] += 1
    variants[self.fn.__name__].add(id(kernel))
    return kernel


_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(fn, *args):
    try:
        fn(*args)
    except AssertionError as e:
        # the tests' numeric checks fail (nothing ran); an assertion raised anywhere else
        # (Triton, zoo) is an error like any other
        raised_in = traceback.extract_tb(e.__traceback__)[-1].filename
        if os.path.abspath(raised_in).startswith(_TESTS + os.sep) or "torch/testing" in raised_in:
            unchecked[0] += 1
        else:
            errors.append("".join(traceback.format_exception(e))[-3000:])
    except Exception as e:                      # a compile error, or an argument the launcher rejects
        errors.append("".join(traceback.format_exception(e))[-3000:])


def main():
    driver.set_active(_StandInDriver())
    JITFunction.run = _compile_only
    from zoo.kernels.msda import triton as msda_triton
    from zoo.kernels.triton import _common
    from _triton_aot import launch_every_variant, launch_gpu_test_variants, model_shaped_launches

    # the backends take CPU tensors as they do under the interpreter
    _common.interpreter_enabled = lambda: True
    msda_triton.INTERPRETER = True
    launch_every_variant(pytest.MonkeyPatch(), call=_call)
    _call(model_shaped_launches)
    launch_gpu_test_variants(pytest.MonkeyPatch(), call=_call)
    print(json.dumps(dict(launches=launches, variants={k: len(v) for k, v in variants.items()}, errors=errors,
                          unchecked=unchecked[0])))


if __name__ == "__main__":
    main()
