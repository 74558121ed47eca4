#!/usr/bin/env python
"""Benchmark zoo models against their references: params, GMACs, inference / train-step img/s (samples/s),
peak memory, eager and torch.compile'd; JSON out.

Examples::

    python tools/benchmark.py halonet26t_zoo --batch 8 --img-size 224 --out r.json --markdown
    python tools/benchmark.py --family halonet --max-params 60 --out model_cards/results/halonet.json
    python tools/benchmark.py --family halonet --reference auto          # each model's declared reference
    python tools/benchmark.py halonet26t_zoo --reference halonet26t      # any timm model, same process
    python tools/benchmark.py ffnet_1 --reference auto --reference-path /src/FFNet   # upstream checkout
    python tools/benchmark.py m --reference mypkg.models:build --reference-path /src/upstream
    python tools/benchmark.py ffnet_1 --reference auto --reference-path /src/FFNet --compile   # + inductor
    python tools/benchmark.py zoo_test_toynet --import tests/_toy_models.py    # extra registrations
    python tools/benchmark.py --family puppeteer --batch 1 --input-kw num_joints=32   # non-image models
    python tools/benchmark.py partcrafter_dit --batch 1 --flops-only                # params / GMACs only

References: ``--reference`` takes a timm model name, ``module:callable`` (callable() -> nn.Module, importable
after ``--reference-path`` is put on sys.path), ``upstream:<family>:<variant>`` (the family's original code,
loaded at run time from the checkout given by ``--reference-path``: a work tree or a bare git directory), or
``auto``: the reference each family declares for its models in ``REFERENCES`` (models without one run
alone). Where a family declares ``weights=True`` the reference's weights (perturbed off their initial
values, so no zero-initialised gain silences a branch) are loaded into the zoo model through the family's
``checkpoint_filter_fn`` and the largest output difference is recorded
(``reference.max_abs_diff``), so both timed networks compute the same function. Families declared with
``fuse=True`` (re-parameterisable networks) time inference on the fused deployment form of both models.

Inputs: an image model gets a random ``(batch, *input_size)`` tensor (``input_size`` from its cfg).
A model that does not take an image defines ``example_inputs(batch_size, device, dtype, **kw)``
returning the keyword arguments of one ``forward`` call for ``batch_size`` samples; the tool calls
``model(**inputs)``, reports samples/s instead of img/s (JSON keys ``infer_samples_s`` /
``train_samples_s``, ``rate_unit``) and records the shapes of one sample's inputs
(``sample_inputs``); ``--input-kw k=v`` is passed on to ``example_inputs``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) on a CPU fp32 copy
at batch 1. The zoo's attention is counted through the ``zoo::attention_ref`` custom op (calls are
routed there with ``force_custom_op`` while counting) with the formula registered below: 2·(D + Dv)
FLOPs per *kept* (query, key) pair, the pairs read from the layout (window keys including the
virtual zero-border keys, which take part in the softmax; duplicates in a routed top-k counted
once; masked keys excluded). Backward is counted as twice the forward (dQ, dK, dV, dP), like
torch's SDPA formula; the recompute of the reference backward is not counted. Counting runs with
SDPA forced to its math backend: torch has no formula for the fused CPU SDPA kernel (it would
count 0 for a timm reference model's attention).

Timing (``measure``, shared with tools/bench_ops.py and tools/experiments/): ``--warmup`` calls of each
step, then ``--rounds`` rounds of ``--iters`` calls; a round's mean call time is one sample; reported: the
median over rounds (rates) and the quartiles (``step_ms``). Everything compared -- zoo and reference, eager
and compiled -- is interleaved round by round, the order reversed every other round, so a shared
machine's load falls on all of them alike. Non-fp32 dtypes run under ``torch.autocast`` (fp32 weights).

Peak memory (``peak_memory_mb``, shared too): CUDA ``max_memory_allocated`` over one step minus what was
allocated before; CPU the peak of bytes allocated and not yet freed during one step, replayed from the CPU
allocator's events (torch.profiler ``profile_memory``), which see eager ops, custom ops' internals and
compiled code alike (the resident set does not: glibc reuses freed heap memory without growing it).

``--compile`` adds, per model and per reference, a ``compiled`` block (``torch.compile``, backend
``--compile-backend``, default inductor): rates, speed-up over eager (``*_speedup``; for the reference
also ``*_ratio`` to the compiled zoo model), compile seconds (first calls), graph breaks, memory and the
largest difference of the compiled inference output from eager's (``max_abs_diff``). A model that fails
to compile gets ``compiled.error`` and keeps its eager numbers. ``mode_records`` expands a record into
its eager and compiled rows, as the markdown table shows them.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
FLOP_NOTE = ("torch.utils.flop_counter at batch 1, CPU fp32; zoo attention: 2*(D+Dv) FLOPs per kept "
             "(query, key) pair read from the layout; MACs = FLOPs/2")

# --------------------------------------------------------------------------------------------------
# FLOP formula for the zoo attention custom ops
# --------------------------------------------------------------------------------------------------

def kept_pairs(layout, B: int, H: int, Lq: int, Lk: int) -> int:
    """(query, key) pairs that enter the softmax, summed over batch and heads.

    Window layouts with border="zero" count the virtual border keys (they are computed and take
    part in the softmax); a routed top-k region listed twice counts once; masked keys do not count.
    """
    from zoo.kernels import RoutedLayout, WindowLayout
    if layout is None:
        return B * H * Lq * Lk
    if isinstance(layout, WindowLayout) and layout.kv_valid is None:
        if layout.border == "zero":
            return B * H * Lq * layout.win * layout.win
        return B * H * Lq * layout.win_h * layout.win_w
    if isinstance(layout, RoutedLayout) and layout.kv_valid is None:
        b, hk = layout.topk_index.shape[:2]
        per = int((~layout.dup).sum()) * layout.region_size ** 2
        return per * (B // b) * (H // hk)
    if isinstance(layout, WindowLayout):
        mask = layout.to_dense_mask(include_virtual=layout.border == "zero")
    else:
        mask = layout.to_dense_mask()
    b, h = mask.shape[:2]
    return int(mask.sum()) * (B // b) * (H // h)


def _attn_fwd_flops(q, k, v, lt, fl, it, meta, scale, *args, out_val=None, **kwargs) -> int:
    from zoo.kernels.custom_op import unflatten
    layout = unflatten(lt, fl, it, meta)[0]  # (layout, bias, score_mod[, head_mix, ...])
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    return 2 * (D + Dv) * kept_pairs(layout, B, H, Lq, k.shape[2])


def _attn_bwd_flops(dout, dlse, q, k, v, *rest, out_val=None, **kwargs) -> int:
    # reference bwd: (dout, dlse, q, k, v, lt, fl, it, meta, scale)
    # triton bwd:    (dout, dlse, q, k, v, out, lse, lt, fl, it, meta, scale)
    lt, fl, it, meta, scale = rest[-5:]
    return 2 * _attn_fwd_flops(q, k, v, lt, fl, it, meta, scale)


def register_attention_flops() -> List[str]:
    """Register the formulas for every zoo attention op present; returns the op names done."""
    import zoo.kernels  # noqa: F401  registers zoo::attention_ref (and the Triton ops on CUDA)
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    done = []
    for name, fn in (("attention_ref", _attn_fwd_flops), ("attention_ref_bwd", _attn_bwd_flops),
                     ("attention_triton", _attn_fwd_flops), ("attention_triton_bwd", _attn_bwd_flops)):
        try:
            packet = getattr(torch.ops.zoo, name)
        except (AttributeError, RuntimeError):
            continue
        if packet not in flop_registry:
            register_flop_formula(packet, get_raw=True)(fn)
        done.append(f"zoo::{name}")
    return done


def _call(model: torch.nn.Module, inputs):
    """``model(inputs)`` for an image tensor, ``model(**inputs)`` for example_inputs' keyword dict."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _scalar_loss(out) -> torch.Tensor:
    """A scalar touching every floating output (dense / dict / tuple outputs)."""
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise TypeError(f"the model returned no floating-point tensor to back-propagate from ({type(out).__name__})")
    return sum(t.float().mean() for t in leaves)


def count_flops(model: torch.nn.Module, x, train: bool = False) -> Dict[str, float]:
    """Total and attention FLOPs of one forward (and backward when ``train``) on ``x`` (an input
    tensor, or a dict of keyword inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from zoo.kernels.custom_op import force_custom_op
    register_attention_flops()
    fc = FlopCounterMode(display=False)
    # SDPA's fused CPU kernel has no flop formula (counts 0); the math backend decomposes into
    # counted matmuls, so reference models (timm, fused_attn) are counted fairly.
    # Inference: grad mode stays on (FlopCounterMode's module tracker can fail on no_grad views of
    # parameters), but the parameters stop requiring grad meanwhile, so no autograd graph is kept:
    # a big model's forward then needs no more memory than an inference step.
    frozen = [] if train else [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with force_custom_op(True), sdpa_kernel([SDPBackend.MATH]), fc:
            if train:
                _scalar_loss(_call(model, x)).backward()
            else:
                _call(model, x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    counts = fc.get_flop_counts().get("Global", {})
    attn = sum(v for k, v in counts.items() if str(k).startswith("zoo."))
    return dict(total=float(fc.get_total_flops()), attention=float(attn))


# --------------------------------------------------------------------------------------------------
# the shared timing and memory loop
# --------------------------------------------------------------------------------------------------

def sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Seconds per call over the timed rounds: median, quartiles, fastest, and the samples."""
    median: float
    q1: float
    q3: float
    min: float
    samples: tuple

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def ms(self, digits: int = 3) -> dict:
        """``{median, q1, q3}`` in milliseconds, rounded (the JSON form)."""
        return {k: round(getattr(self, k) * 1e3, digits) for k in ("median", "q1", "q3")}


def timing_of(samples: Sequence[float]) -> Timing:
    """Median and quartiles (inclusive method: the quartiles of 2 samples are interpolated between them)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("timing_of needs at least one sample")
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return Timing(statistics.median(xs), q1, q3, xs[0], tuple(xs))


def measure(steps: Dict[str, Callable[[], object]], device, warmup: int = 1, reps: int = 5,
            iters: int = 1) -> Dict[str, Timing]:
    """Seconds per call of each step, the steps interleaved.

    Each step is called ``warmup`` times, then ``reps`` rounds follow; in a round every step runs
    ``iters`` times back to back and the mean call time is that round's sample. The order of the
    steps reverses every other round (A/B, B/A, ...), so no step always runs first after another.
    """
    if reps < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"measure: reps and iters must be >= 1 and warmup >= 0, got {reps}, {iters}, {warmup}")
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per: Dict[str, List[float]] = {k: [] for k in steps}
    order = list(steps.items())
    for r in range(reps):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            per[name].append((time.perf_counter() - t0) / iters)
    return {k: timing_of(v) for k, v in per.items()}


def peak_cpu_alloc_mb(step: Callable[[], object]) -> float:
    """Peak CPU memory (MiB) held by tensors allocated during one call of ``step``, from the CPU
    allocator's events as torch.profiler records them: allocations and frees in time order, the
    largest running sum. The allocator sees every tensor buffer -- eager ops, custom ops' internals,
    compiled code (which allocates outside the dispatcher) and upstream code alike."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, n in sorted(events):
        live += n
        peak = max(peak, live)
    return peak / 2 ** 20


def peak_memory_mb(step: Callable[[], object], device) -> float:
    """Peak memory of one call of ``step`` above what was in use before it, MiB: CUDA
    ``max_memory_allocated``; CPU the allocator's events (``peak_cpu_alloc_mb``)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return peak_cpu_alloc_mb(step)


def memory_method(device) -> str:
    """What ``peak_memory_mb`` measures, in words (stored next to the numbers)."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the step"
    return ("peak of the bytes allocated and not yet freed during one step, from the CPU allocator's events "
            "(torch.profiler profile_memory; includes grads of a train step, excludes non-tensor memory)")


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------

def _autocast(device, dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_steps(model: torch.nn.Module, x, device, dtype, batch: Optional[int] = None,
               infer_model: Optional[torch.nn.Module] = None):
    """(inference step, train step) closures on fixed input ``x`` (a tensor, or a dict of keyword
    inputs from ``example_inputs``; then ``batch`` is its sample count). ``infer_model`` (e.g. a
    fused or compiled copy sharing nothing mutable with training) serves the inference step. The
    inference step returns the model's output."""
    num_classes = getattr(model, "num_classes", 0) or 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
    batch = x.shape[0] if batch is None else batch
    target = torch.randint(0, max(num_classes, 1), (batch,), device=device)
    infer_model = model if infer_model is None else infer_model
    train_module = model

    def infer():
        infer_model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            return _call(infer_model, x)

    def train():
        train_module.train()
        with _autocast(device, dtype):
            out = _call(train_module, x)
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (batch, num_classes) \
                    and num_classes > 0:
                loss = torch.nn.functional.cross_entropy(out.float(), target)
            else:  # dense / dict outputs (segmenters, detectors, DiTs): a scalar touching every output
                loss = _scalar_loss(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return infer, train


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over the floating tensors of two outputs of the same structure."""
    la = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    lb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise ValueError("the two outputs differ in structure or shape")
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb) if x.numel()), default=0.0)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------

def import_extra(spec: str):
    """Import a module by dotted name or a .py file path (for extra model registrations)."""
    p = Path(spec)
    if spec.endswith(".py") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"--import: no such file {spec!r}")
        name = p.stem
        s = importlib.util.spec_from_file_location(name, p)
        mod = importlib.util.module_from_spec(s)
        sys.modules[name] = mod
        s.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


def default_input_size(name: str):
    """(C, *spatial) from the cfg: ``input_size``, else ``test_input_size`` (3-D volumes)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name) or {}
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    size = cfg.get("input_size") or cfg.get("test_input_size")
    if not size:
        raise ValueError(f"{name}: its cfg has no input_size / test_input_size and the model has no "
                         "example_inputs(batch_size, device, dtype) method, so this tool cannot make its input")
    return tuple(size)


def _light_model(name: str) -> torch.nn.Module:
    """The model built on the meta device when it allows it (no memory, no init), else on the CPU."""
    import timm
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    except Exception:
        return timm.create_model(name, pretrained=False)


def params_m(name: str) -> float:
    """Parameter count in millions, built on the meta device when the model allows it."""
    return n_params(_light_model(name)) / 1e6


def takes_example_inputs(model) -> bool:
    """True for a model that says how to call it (``example_inputs``) instead of taking an image."""
    return callable(getattr(model, "example_inputs", None))


def make_example_inputs(model: torch.nn.Module, batch: int, device, input_kw: Optional[dict] = None) -> dict:
    """``model.example_inputs(batch_size=batch, device=device, dtype=float32, **input_kw)``, checked.

    Float inputs stay fp32: non-fp32 runs use autocast, as for images."""
    try:
        inputs = model.example_inputs(batch_size=batch, device=device, dtype=torch.float32, **(input_kw or {}))
    except TypeError as e:
        raise TypeError(f"{type(model).__name__}.example_inputs rejected --input-kw {input_kw or {}}: {e}") from e
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        raise TypeError(f"{type(model).__name__}.example_inputs must return a dict of forward keyword arguments, "
                        f"got {type(inputs).__name__}")
    return inputs


def describe_inputs(inputs: dict) -> dict:
    """JSON description of keyword inputs: tensors as shape + dtype (+ the values of tiny integer or
    bool tensors), plain scalars as they are."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            d = dict(shape=list(v.shape), dtype=str(v.dtype).replace("torch.", ""))
            if not v.is_floating_point() and v.numel() <= 4 and v.device.type != "meta":
                d["value"] = v.reshape(-1).tolist()
            out[k] = d
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        else:
            out[k] = type(v).__name__
    return out


def inputs_str(desc: Optional[dict], compact: bool = False) -> str:
    """Short text for a ``describe_inputs`` dict: ``x 4×1024×64, timestep (1,), num_parts=4``. ``compact`` keeps
    floating tensors and scalar values only (masks and index tensors dropped)."""
    if not desc:
        return "–"
    parts = []
    for k, v in desc.items():
        if isinstance(v, dict):
            if "value" in v:
                vals = v["value"]
                parts.append(f"{k}={vals[0] if len(set(vals)) == 1 else vals}")
            elif not compact or v.get("dtype", "").startswith(("float", "bfloat")):
                shape = v["shape"]
                parts.append(f"{k} ({shape[0]},)" if len(shape) == 1 else f"{k} " + "×".join(str(i) for i in shape))
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def create(name: str, img_size: Optional[int]):
    """timm model (zoo or reference) with random weights; ``img_size`` passed when it differs."""
    import timm
    if img_size is not None and tuple(default_input_size(name)[1:]) != (img_size, img_size):
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False)



def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# references, declared per family
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilyReferences:
    """What a family's models are compared with.

    ``models``: zoo model name -> reference (a timm name, ``module:callable`` or
    ``upstream:<family>:<variant>``). ``weights``: the reference's weights load into the zoo model
    through ``zoo.models.<family>.checkpoint_filter_fn`` (same function, outputs compared).
    ``fuse``: inference is timed on the re-parameterised (fused) form of both models."""
    models: Dict[str, str]
    weights: bool = False
    fuse: bool = False
    note: str = ""


REFERENCES: Dict[str, FamilyReferences] = {
    "halonet": FamilyReferences(
        {f"{n}_zoo": n for n in ("halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts", "haloregnetz_b",
                                 "halo2botnet50ts_256")}, weights=True, note="timm's byoanet models"),
    "transformer_in_transformer": FamilyReferences(
        {"tnt_s_patch16_224_zoo": "tnt_s_patch16_224", "tnt_b_patch16_224_zoo": "tnt_b_patch16_224"},
        weights=True, note="timm's TNT"),
    "biformer": FamilyReferences(
        {n: f"upstream:biformer:{n}" for n in ("biformer_tiny", "biformer_small", "biformer_base")},
        weights=True, note="official code, github.com/rayleizhu/BiFormer"),
    "ffnet": FamilyReferences(
        {f"ffnet_{i}": f"upstream:ffnet:ffnet_{i}" for i in range(1, 5)}, weights=True, fuse=True,
        note="official code, github.com/ysj9909/FFNet"),
    "sparsifiner": FamilyReferences(
        {"sparsifiner_deit_small_patch16_224": "deit_small_patch16_224",
         "sparsifiner_deit_tiny_patch16_224": "deit_tiny_patch16_224"},
        note="the dense host network (timm DeiT)"),
    "gmm_vit": FamilyReferences(
        {f"gmm_{h}": f"{h}_gmmbase" for h in ("vit_tiny_p4_32", "vit_tiny_p8_64", "swin_tiny_p2_32", "swin_tiny_p4_64",
                                                "cait_tiny_p4_32", "cait_tiny_p8_64", "pit_tiny_p2_32", "pit_tiny_p4_64")}
        | {"gmm_t2t_vit_32": "t2t_vit_32_gmmbase", "gmm_t2t_vit_64": "t2t_vit_64_gmmbase"},
        note="the same host without the Gaussian mixture"),
}


def declared_reference(name: str, family: Optional[str]) -> Optional[str]:
    """The reference the family declares for ``name`` (None when it declares none)."""
    decl = REFERENCES.get(family or "")
    return decl.models.get(name) if decl else None


@contextlib.contextmanager
def _timm_registry_untouched():
    """Let upstream model files import without registering their names with timm (the zoo owns
    them) and with the builder helper older timm versions had."""
    import timm.models
    import timm.models._builder as builder
    import timm.models._registry as registry
    saved = (timm.models.register_model, registry.register_model)
    added = not hasattr(builder, "_update_default_kwargs")
    if added:
        builder._update_default_kwargs = lambda *a, **k: None
    timm.models.register_model = registry.register_model = lambda fn: fn
    try:
        yield
    finally:
        timm.models.register_model, registry.register_model = saved
        if added:
            del builder._update_default_kwargs


_TREES: Dict[tuple, Path] = {}


def work_tree(path: str, folders: Sequence[str]) -> Path:
    """A checkout's files: ``path`` itself for a work tree; for a bare git directory the ``folders``
    of its HEAD, extracted once per process into a temporary directory."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"--reference-path {path!r} is not a directory")
    if (p / "HEAD").is_file() and (p / "objects").is_dir():
        key = (str(p), tuple(folders))
        if key not in _TREES:
            dest = Path(tempfile.mkdtemp(prefix="upstream_"))
            atexit.register(shutil.rmtree, dest, True)
            archive = subprocess.run(["git", "--git-dir", str(p), "archive", "HEAD", "--", *folders],
                                     capture_output=True)
            if archive.returncode != 0:
                raise RuntimeError(f"git archive of {', '.join(folders)} from {p} failed: {archive.stderr.decode()[:300]}")
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
            _TREES[key] = dest
        return _TREES[key]
    return p


def _need_file(tree: Path, rel: str, repo: str) -> Path:
    f = tree / rel
    if not f.is_file():
        raise FileNotFoundError(f"{tree} is not a checkout of {repo} ({rel} not found)")
    return f


def upstream_biformer(tree: Path, variant: str) -> torch.nn.Module:
    """rayleizhu/BiFormer ``models/biformer.py`` (needs einops; fairscale's unused checkpoint
    wrapper is stood in for when fairscale is absent)."""
    _need_file(tree, "models/biformer.py", "github.com/rayleizhu/BiFormer")
    try:
        import einops  # noqa: F401
    except ImportError as e:
        raise ImportError("the official BiFormer code needs einops: pip install einops") from e
    if importlib.util.find_spec("fairscale") is None and "fairscale" not in sys.modules:
        fs, fs_nn, fs_ck = (types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"))
        fs_ck.checkpoint_wrapper = lambda m, *a, **k: m
        fs.nn, fs_nn.checkpoint = fs_nn, fs_ck
        sys.modules.update({"fairscale": fs, "fairscale.nn": fs_nn, "fairscale.nn.checkpoint": fs_ck})
    sys.path.insert(0, str(tree))
    try:
        with _timm_registry_untouched():
            mod = importlib.import_module("models.biformer")
    finally:
        sys.path.remove(str(tree))
    if not callable(getattr(mod, variant, None)) or not variant.startswith("biformer_"):
        raise ValueError(f"upstream:biformer: no model {variant!r} in models/biformer.py")
    return getattr(mod, variant)()


# upstream FFNet constructor arguments per variant (from its registered entry points)
FFNET_ARGS = {
    "ffnet_1": dict(depth=[2, 2, 8, 2], embed_dim=[80, 160, 320, 640], kernel_sizes=[3, 3, 3, 3]),
    "ffnet_2": dict(depth=[3, 3, 15, 3], embed_dim=[88, 176, 352, 704], kernel_sizes=[7, 7, 7, 7]),
    "ffnet_3": dict(depth=[4, 4, 22, 5], embed_dim=[96, 192, 384, 768], kernel_sizes=[7, 7, 7, 7],
                    use_layer_scale=True, layer_scale_init_value=1e-6),
    "ffnet_4": dict(depth=[4, 4, 27, 3], embed_dim=[128, 256, 512, 1024], kernel_sizes=[7, 7, 7, 7],
                    use_layer_scale=True, layer_scale_init_value=1e-6),
}


def upstream_ffnet(tree: Path, variant: str) -> torch.nn.Module:
    """ysj9909/FFNet ``models/ffnet.py``, built with the variant's arguments, no drop path."""
    f = _need_file(tree, "models/ffnet.py", "github.com/ysj9909/FFNet")
    if variant not in FFNET_ARGS:
        raise ValueError(f"upstream:ffnet: unknown variant {variant!r}; known: {', '.join(FFNET_ARGS)}")
    mod = types.ModuleType("upstream_ffnet")
    mod.__file__ = str(f)
    with _timm_registry_untouched():
        exec(compile(f.read_text(), str(f), "exec"), mod.__dict__)
    return mod.FFNet(drop_path_rate=0., **FFNET_ARGS[variant])


# family -> (loader(work tree, variant), the folders of the checkout it reads)
UPSTREAM: Dict[str, tuple] = {"biformer": (upstream_biformer, ("models", "ops")), "ffnet": (upstream_ffnet, ("models",))}


def load_reference(spec: str, ref_path: Optional[str]) -> torch.nn.Module:
    """A timm model name, ``module:callable`` (callable() -> nn.Module, importable after ``ref_path``
    is put on sys.path) or ``upstream:<family>:<variant>`` (``ref_path``: the upstream checkout)."""
    if spec.startswith("upstream:"):
        _, fam, variant = (spec.split(":") + ["", ""])[:3]
        if fam not in UPSTREAM or not variant:
            raise ValueError(f"--reference {spec!r}: expected upstream:<family>:<variant> with family one of "
                             f"{', '.join(UPSTREAM)}")
        if not ref_path:
            raise ValueError(f"--reference {spec!r} needs --reference-path: a checkout of the upstream repository "
                             f"({REFERENCES[fam].note}), a work tree or a bare git directory")
        loader, folders = UPSTREAM[fam]
        return loader(work_tree(ref_path, folders), variant)
    if ref_path and str(Path(ref_path).resolve()) not in sys.path:
        sys.path.insert(0, str(Path(ref_path).resolve()))
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        obj = import_extra(mod_name)
        for a in attr.split("."):
            obj = getattr(obj, a)
        model = obj()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"--reference {spec!r} returned {type(model).__name__}, expected an nn.Module")
        return model
    import timm
    if not timm.is_model(spec):
        raise ValueError(f"--reference {spec!r} is neither a timm model name, 'module:callable' nor "
                         "'upstream:<family>:<variant>'")
    return timm.create_model(spec, pretrained=False)


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Move every weight off its initial value (parameters by ``scale``-sized noise, batch-norm
    running statistics to random positive values), so no branch is silenced by a zero-initialised
    gain and an output comparison sees every path."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    for m in model.modules():
        if isinstance(getattr(m, "running_var", None), torch.Tensor):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.75, 1.25)


def share_weights(model: torch.nn.Module, ref: torch.nn.Module, family: str) -> None:
    """Load the reference's weights, perturbed off their initial values, into the zoo model through the
    family's checkpoint_filter_fn."""
    perturb_weights(ref)
    fn = getattr(importlib.import_module(f"zoo.models.{family}"), "checkpoint_filter_fn")
    model.load_state_dict(fn(dict(ref.state_dict()), model), strict=True)


def fused(model: torch.nn.Module) -> torch.nn.Module:
    """A re-parameterised (fused) copy for inference; the trainable model stays as it is."""
    from timm.utils.model import reparameterize_model
    return reparameterize_model(copy.deepcopy(model).eval())


@dataclass
class Reference:
    """A reference model ready to time, with what was done to make the comparison fair."""
    label: str
    module: torch.nn.Module
    info: dict = field(default_factory=dict)
    fuse: bool = False


def reference_for(name: str, family: Optional[str], spec: Optional[str]) -> Optional[str]:
    """The reference to compare ``name`` with: ``spec`` itself, or for ``auto`` the family's
    declaration (None when it declares none)."""
    return declared_reference(name, family) if spec == "auto" else spec


def prepare_reference(name: str, family: Optional[str], model: torch.nn.Module, label: str,
                      ref_path: Optional[str], x1) -> Reference:
    """Load reference ``label`` for zoo model ``name``; where it is the family's declared one, share
    weights and compare outputs on ``x1`` (``weights=True``) and mark it for fusing (``fuse=True``)."""
    decl = REFERENCES.get(family or "")
    module = load_reference(label, ref_path)
    info = dict(name=label)
    declared = decl is not None and decl.models.get(name) == label
    if declared and decl.weights:
        share_weights(model, module, family)
        model.eval(), module.eval()
        with torch.no_grad():
            info["max_abs_diff"] = float(f"{max_abs_diff(_call(model, x1), _call(module, x1)):.3g}")
        info["weights"] = "the reference's, perturbed off init, loaded by checkpoint_filter_fn"
    else:
        info["weights"] = "random, independent"
    fuse = bool(declared and decl.fuse)
    if fuse:
        info["inference_form"] = "fused (re-parameterised) for both models"
    return Reference(label, module, info, fuse)


# --------------------------------------------------------------------------------------------------
# one record
# --------------------------------------------------------------------------------------------------

def graph_breaks() -> int:
    """Graph breaks torch.compile has counted in this process so far."""
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def compiled_steps(model, infer_src, x, device, dtype, batch, backend: str, with_train: bool):
    """Steps of ``torch.compile``'d copies: (infer, train or None, info). ``infer_src`` is the module
    inference runs (``model`` or its fused copy). info: first-call (compile) seconds, graph breaks and
    the largest difference of the compiled inference output from eager's."""
    eager_out = make_steps(model, x, device, dtype, batch, infer_model=infer_src)[0]()
    cmodel = torch.compile(model, backend=backend)
    cinfer = cmodel if infer_src is model else torch.compile(infer_src, backend=backend)
    infer, train = make_steps(cmodel, x, device, dtype, batch, infer_model=cinfer)
    breaks0 = graph_breaks()
    t0 = time.perf_counter()
    got = infer()
    sync(device)
    info = dict(compile_s={"infer": round(time.perf_counter() - t0, 2)})
    if with_train:
        t0 = time.perf_counter()
        train()
        sync(device)
        info["compile_s"]["train"] = round(time.perf_counter() - t0, 2)
    info["graph_breaks"] = graph_breaks() - breaks0
    info["max_abs_diff"] = float(f"{max_abs_diff(got, eager_out):.3g}")
    return infer, (train if with_train else None), info


def _rates(t: Dict[str, Timing], prefix: str, batch: int, rk: str) -> dict:
    """``{phase}_{rk}`` rates and ``step_ms`` quartiles of the timed phases under key prefix."""
    out, ms = {}, {}
    for phase in ("infer", "train"):
        k = f"{prefix}/{phase}"
        if k in t:
            out[f"{phase}_{rk}"] = round(batch / t[k].median, 3)
            ms[phase] = t[k].ms()
    out["step_ms"] = ms
    return out


def bench_one(name: str, model: torch.nn.Module, size, args, ref: Optional[Reference] = None) -> dict:
    """One record. ``size``: (C, *spatial) of an image model; None for a model with ``example_inputs``
    (then rates are samples/s and ``sample_inputs`` describes one sample's inputs)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    input_kw = getattr(args, "input_kw", None) or {}
    rk = "img_s" if size is not None else "samples_s"
    unit = "img/s" if size is not None else "samples/s"
    rec = dict(model=name, params_m=round(n_params(model) / 1e6, 3), input_size=list(size) if size else None,
               batch=args.batch, dtype=str(dtype).replace("torch.", ""), amp=dtype != torch.float32)
    if size is None:
        x1 = make_example_inputs(model, 1, "cpu", input_kw)
        rec.update(sample_inputs=describe_inputs(x1), input_kw=dict(input_kw), rate_unit=unit,
                   sample_note="a sample is one batch element of the model's example_inputs (sample_inputs: the "
                               "forward inputs at batch 1)")
    else:
        x1 = torch.randn(1, *size)
    if ref is not None:
        rec["reference"] = dict(ref.info, params_m=round(n_params(ref.module) / 1e6, 3))
    if not args.no_flops:
        model.eval()
        f = count_flops(model, x1)
        rec.update(gmacs=round(f["total"] / 2e9, 4), attention_gmacs=round(f["attention"] / 2e9, 4),
                   flops_note=FLOP_NOTE)
        if ref is not None:
            ref.module.eval()
            rec["reference"]["gmacs"] = round(count_flops(ref.module, x1)["total"] / 2e9, 4)
    if getattr(args, "flops_only", False):
        rec["timing"] = "skipped (--flops-only): parameters and GMACs only"
        return rec
    model.to(device)
    if size is None:
        x = make_example_inputs(model, args.batch, device, input_kw)
    else:
        x = torch.randn(args.batch, *size, device=device)
    fuse = ref is not None and ref.fuse
    who = {"zoo": model}
    if ref is not None:
        who["ref"] = ref.module.to(device)
    infer_src = {w: fused(m) if fuse else m for w, m in who.items()}
    if fuse and "max_abs_diff" in rec["reference"]:   # the fused forms must still compute the same function
        with torch.no_grad():
            xd = x1.to(device) if isinstance(x1, torch.Tensor) else x
            rec["reference"]["max_abs_diff_fused"] = float(
                f"{max_abs_diff(_call(infer_src['zoo'], xd), _call(infer_src['ref'], xd)):.3g}")
    steps: Dict[str, Callable] = {}
    for w, m in who.items():
        infer, train = make_steps(m, x, device, dtype, args.batch, infer_model=infer_src[w])
        steps[f"{w}/eager/infer"] = infer
        if not args.no_train:
            steps[f"{w}/eager/train"] = train
    compiled: Dict[str, dict] = {}
    if getattr(args, "compile", False):
        importlib.import_module("torch._dynamo").reset()
        for w, m in who.items():
            compiled[w] = dict(backend=args.compile_backend)
            try:
                infer, train, info = compiled_steps(m, infer_src[w], x, device, dtype, args.batch,
                                                    args.compile_backend, not args.no_train)
            except Exception as e:  # the record keeps its eager numbers and says why compiling failed
                compiled[w]["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                print(f"benchmark: {name}: torch.compile of the {w} model failed: {compiled[w]['error']}",
                      file=sys.stderr)
                continue
            compiled[w].update(info)
            steps[f"{w}/compiled/infer"] = infer
            if train is not None:
                steps[f"{w}/compiled/train"] = train
    # everything of one phase is interleaved round by round: zoo/reference, eager/compiled
    times: Dict[str, Timing] = {}
    for phase in ("infer", "train"):
        group = {k: v for k, v in steps.items() if k.endswith(phase)}
        if group:
            times.update(measure(group, device, args.warmup, args.rounds, args.iters))
    rec.update(_rates(times, "zoo/eager", args.batch, rk))
    for phase in ("infer", "train"):
        if f"zoo/eager/{phase}" in steps:
            rec[f"{phase}_mem_mb"] = _round(peak_memory_mb(steps[f"zoo/eager/{phase}"], device))
    if ref is not None:
        r = rec["reference"]
        r.update(_rates(times, "ref/eager", args.batch, rk))
        for phase in ("infer", "train"):
            if f"ref/eager/{phase}" in steps:
                r[f"{phase}_ratio"] = round(times[f"ref/eager/{phase}"].median / times[f"zoo/eager/{phase}"].median, 4)
                r[f"{phase}_mem_mb"] = _round(peak_memory_mb(steps[f"ref/eager/{phase}"], device))
        r["ratio_note"] = f"zoo {unit} / reference {unit}, medians of interleaved rounds"
    for w, c in compiled.items():
        if "error" in c:
            continue
        c.update(_rates(times, f"{w}/compiled", args.batch, rk))
        for phase in ("infer", "train"):
            if f"{w}/compiled/{phase}" not in steps:
                continue
            c[f"{phase}_speedup"] = round(times[f"{w}/eager/{phase}"].median / times[f"{w}/compiled/{phase}"].median, 4)
            c[f"{phase}_mem_mb"] = _round(peak_memory_mb(steps[f"{w}/compiled/{phase}"], device))
            if w == "ref" and "error" not in compiled["zoo"]:
                c[f"{phase}_ratio"] = round(times[f"ref/compiled/{phase}"].median
                                            / times[f"zoo/compiled/{phase}"].median, 4)
        c["speedup_note"] = "eager time / compiled time, medians of interleaved rounds"
    if "zoo" in compiled:
        rec["compiled"] = compiled["zoo"]
    if "ref" in compiled:
        rec["reference"]["compiled"] = compiled["ref"]
    rec["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rec["memory_method"] = memory_method(device)
    return rec


def _round(v, n=1):
    return None if v is None else round(v, n)


def env_info(device) -> dict:
    import timm
    return dict(device=device.type, device_name=device_name(device), torch=torch.__version__,
                timm=timm.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def resolve_models(args) -> List[str]:
    import zoo
    names = list(args.models)
    if args.family:
        for fam in args.family:
            names += zoo.list_models(family=fam)
    if args.all:
        names += zoo.list_models()
    if not names:
        raise SystemExit("benchmark: give model names, --family F or --all")
    import timm
    bad = [n for n in names if not timm.is_model(n)]
    if bad:
        raise SystemExit(f"benchmark: unknown model(s) {', '.join(bad)}; see zoo.list_models() "
                         "(or pass --import for test-only registrations)")
    return list(dict.fromkeys(names))


def family_of(name: str) -> Optional[str]:
    import zoo
    try:
        return zoo.model_family(name)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# records: units, rows, tables (also read by tools/make_cards.py)
# --------------------------------------------------------------------------------------------------

MD_COLS = [("model", "model"), ("params (M)", "params_m"), ("GMACs", "gmacs"), ("attn GMACs", "attention_gmacs"),
           ("input", "input_size"), ("batch", "batch"), ("dtype", "dtype"), ("infer {u}", "infer_rate"),
           ("train {u}", "train_rate"), ("infer peak MiB", "infer_mem_mb"), ("train peak MiB", "train_mem_mb")]
_MEASURED = ("infer_img_s", "train_img_s", "infer_samples_s", "train_samples_s", "infer_mem_mb", "train_mem_mb",
             "step_ms", "infer_ratio", "train_ratio")


def rate_unit(r: dict) -> str:
    """"samples/s" for a record of a model fed by example_inputs, else "img/s" (older records)."""
    return "samples/s" if r.get("rate_unit") == "samples/s" or "infer_samples_s" in r else "img/s"


def rate(r: dict, phase: str):
    """Throughput of ``phase`` ("infer" / "train") in the record's own unit, None when not timed."""
    v = r.get(f"{phase}_samples_s")
    return r.get(f"{phase}_img_s") if v is None else v


def records_unit(records: List[dict]) -> str:
    """Column unit for a table of records: img/s, samples/s, or both spelled out when mixed."""
    units = {rate_unit(r) for r in records if "error" not in r}
    return units.pop() if len(units) == 1 else "img/s or samples/s"


def _as_mode(d: dict, block: Optional[dict]) -> dict:
    """``d`` with its measured numbers replaced by those of a ``compiled`` block (none if it failed)."""
    out = {k: v for k, v in d.items() if k not in _MEASURED and k != "compiled"}
    if block and "error" not in block:
        out.update({k: v for k, v in block.items() if k in _MEASURED})
    elif block:
        out["compile_error"] = block["error"]
    return out


def mode_records(r: dict) -> List[dict]:
    """A record's rows: the eager measurement (``mode`` "eager") and, when ``--compile`` ran, the compiled
    one (``mode`` "compiled": rates, memory, and the reference's compiled numbers with compiled-vs-compiled
    ratios; ``compile_error`` where compiling failed)."""
    rows = [dict(r, mode="eager")]
    if "compiled" in r:
        row = dict(_as_mode(r, r["compiled"]), mode="compiled")
        if r.get("reference"):
            row["reference"] = _as_mode(r["reference"], r["reference"].get("compiled") or {"error": "not compiled"})
        rows.append(row)
    return rows


def markdown_table(records: List[dict]) -> str:
    """Markdown table of benchmark records: a row per mode (eager, compiled), reference ratios in extra
    columns when present."""
    has_ref = any("reference" in r for r in records)
    has_mode = any("compiled" in r for r in records)
    u = records_unit(records)
    cols = MD_COLS[:1] + ([("mode", "mode")] if has_mode else []) + MD_COLS[1:]
    head = [h.format(u=u) for h, _ in cols] + (
        ["reference", f"ref infer {u}", "infer ratio", "train ratio"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        if "error" in rec:
            lines.append("| " + rec["model"] + " | error: " + rec["error"].replace("|", "/")[:80] + " |"
                         + " |" * (len(head) - 2))
            continue
        for r in mode_records(rec):
            row = []
            for _, k in cols:
                if k.endswith("_rate"):
                    v = rate(r, k[:-5])
                    if v is None and r.get("compile_error") and k == "infer_rate":
                        v = "compile error"
                else:
                    v = r.get(k)
                if k == "input_size":
                    v = "x".join(str(i) for i in v[1:]) if v else inputs_str(r.get("sample_inputs"))
                row.append("–" if v is None else str(v))
            if has_ref:
                ref = r.get("reference") or {}
                row += [str(ref.get("name", "–")), str(rate(ref, "infer") or "–"), str(ref.get("infer_ratio", "–")),
                        str(ref.get("train_ratio", "–"))]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def record_key(r: dict) -> tuple:
    """What makes two records the same measurement: model, input (image size or one sample's inputs),
    batch, dtype, device."""
    inputs = json.dumps(r.get("sample_inputs"), sort_keys=True) if r.get("sample_inputs") else None
    return (r.get("model"), tuple(r.get("input_size") or ()), inputs, r.get("batch"), r.get("dtype"), r.get("device"))


def merge_records(old: List[dict], new: List[dict]) -> List[dict]:
    """Replace old records measured with the same (model, input, batch, dtype, device)."""
    key = record_key
    keys = {key(r) for r in new}
    return [r for r in old if key(r) not in keys] + new


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("models", nargs="*", help="zoo (or timm) model names")
    p.add_argument("--family", action="append", default=[], help="all models of a zoo family (repeatable)")
    p.add_argument("--all", action="store_true", help="every zoo model")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="module or .py file to import first (extra registrations, e.g. tests/_toy_models.py)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the cfg's)")
    p.add_argument("--max-img-size", type=int, default=None, help="cap the cfg's size at this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip the train-step measurement")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--flops-only", action="store_true",
                   help="parameters and GMACs only, no timing or memory (models too large to time here)")
    p.add_argument("--input-kw", action="append", default=[], metavar="K=V",
                   help="keyword passed to a non-image model's example_inputs (repeatable; V a Python literal)")
    p.add_argument("--max-params", type=float, default=None, help="skip models above this many M params")
    p.add_argument("--reference", default=None,
                   help="timm model name, 'module:callable', 'upstream:<family>:<variant>' or 'auto' (each "
                        "model's declared reference, see REFERENCES) to compare with")
    p.add_argument("--reference-path", default=None,
                   help="directory put on sys.path for a 'module:callable' reference; the upstream checkout "
                        "(work tree or bare git dir) for an upstream one")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd copies of the model and its reference (a 'compiled' block)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--out", default=None, help="JSON file (list of records); existing records of the same "
                                                 "model/size/batch/dtype/device are replaced")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    a = p.parse_args(argv)
    for n in ("batch", "warmup", "iters", "rounds"):
        lo = 0 if n == "warmup" else 1
        if getattr(a, n) < lo:
            p.error(f"--{n} must be >= {lo}, got {getattr(a, n)}")
    if a.img_size is not None and a.img_size < 8:
        p.error(f"--img-size must be >= 8, got {a.img_size}")
    try:
        dev = torch.device(a.device)
    except RuntimeError:
        p.error(f"--device must be cpu or cuda[:N], got {a.device!r}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {a.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    if a.reference_path and not a.reference:
        p.error("--reference-path needs --reference")
    if a.flops_only and a.no_flops:
        p.error("--flops-only and --no-flops exclude each other")
    if a.compile and a.flops_only:
        p.error("--compile times models; --flops-only times nothing")
    if a.compile:
        known = importlib.import_module("torch._dynamo").list_backends(exclude_tags=())
        if a.compile_backend not in known:
            p.error(f"--compile-backend {a.compile_backend!r} is not a torch.compile backend; known: {', '.join(known)}")
    a.input_kw = _parse_input_kw(p, a.input_kw)
    return a


def _parse_input_kw(p, items: List[str]) -> dict:
    import ast
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.isidentifier():
            p.error(f"--input-kw takes NAME=VALUE (e.g. num_parts=2), got {item!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            p.error(f"--input-kw {k}: value {v!r} is not a Python literal (int, float, str in quotes, ...)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import zoo  # noqa: F401  registers the zoo models
    for spec in args.imports:
        import_extra(spec)
    torch.manual_seed(0)
    device = torch.device(args.device)
    names = resolve_models(args)
    env = env_info(device)
    records, failed = [], 0
    for name in names:
        family = family_of(name)
        rec = dict(model=name, family=family)
        try:
            ref_label = reference_for(name, family, args.reference)
            if args.reference == "auto" and ref_label is None and len(names) == 1:
                raise ValueError(f"--reference auto: family {family!r} declares no reference for {name}; declared: "
                                 f"{', '.join(sorted(m for d in REFERENCES.values() for m in d.models))}")
            light = _light_model(name)
            example = takes_example_inputs(light)
            pm = n_params(light) / 1e6
            del light
            if args.max_params is not None and pm > args.max_params:
                print(f"benchmark: skip {name}: {pm:.1f}M params > --max-params {args.max_params}", file=sys.stderr)
                continue
            if example:
                if args.img_size is not None or args.max_img_size is not None:
                    raise ValueError(f"{name} does not take an image (it has example_inputs): --img-size / "
                                     "--max-img-size do not apply; size its inputs with --input-kw")
                size = None
                model = create(name, None)
                x1 = make_example_inputs(model, 1, "cpu", args.input_kw)
            else:
                if args.input_kw:
                    raise ValueError(f"{name} takes an image: --input-kw applies only to models with "
                                     "example_inputs; use --img-size")
                size = default_input_size(name)
                if args.img_size is not None:
                    size = (size[0],) + (args.img_size,) * (len(size) - 1)
                elif args.max_img_size is not None:
                    size = (size[0],) + tuple(min(s, args.max_img_size) for s in size[1:])
                square2d = len(size) == 3 and size[1] == size[2]
                model = create(name, size[1] if square2d else None)
                x1 = torch.randn(1, *size)
            ref = prepare_reference(name, family, model, ref_label, args.reference_path, x1) if ref_label else None
            what = tuple(size) if size is not None else f"example_inputs({args.input_kw or ''})"
            vs = f" vs {ref.label}" if ref is not None else ""
            print(f"benchmark: {name}{vs} {what} batch {args.batch} on {device} ...", file=sys.stderr, flush=True)
            rec.update(bench_one(name, model, size, args, ref))
            del model, ref
        except Exception as e:  # keep going over a family; the record says what failed
            failed += 1
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"benchmark: {name} failed: {rec['error']}", file=sys.stderr)
            if len(names) == 1:
                raise
        rec.update(env)
        records.append(rec)
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else []
        if not isinstance(old, list):
            raise SystemExit(f"benchmark: {out} does not hold a list of records; choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(merge_records(old, records), indent=1) + "\n")
    if args.markdown:
        print(markdown_table(records))
    elif not args.out:
        print(json.dumps(records, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
