#!/usr/bin/env python
"""Benchmark zoo models: params, GMACs, inference / train-step img/s (samples/s), peak memory; JSON out.

Examples::

    python tools/benchmark.py halonet26t_zoo --batch 8 --img-size 224 --out r.json --markdown
    python tools/benchmark.py --family halonet --max-params 60 --out model_cards/results/halonet.json
    python tools/benchmark.py halonet26t_zoo --reference halonet26t            # timm model, same process
    python tools/benchmark.py m --reference mypkg.models:build --reference-path /src/upstream
    python tools/benchmark.py zoo_test_toynet --import tests/_toy_models.py    # extra registrations
    python tools/benchmark.py --family puppeteer --batch 1 --input-kw num_joints=32   # non-image models
    python tools/benchmark.py partcrafter_dit --batch 1 --flops-only                # params / GMACs only

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

Timing: ``--rounds`` rounds of ``--iters`` steps after ``--warmup`` steps; per round the mean step
time, reported: the median over rounds. With ``--reference`` the zoo model and the reference are
timed in the same process, interleaved round by round (A/B/A/B), and the ratio of medians is given.
Non-fp32 dtypes run under ``torch.autocast`` (fp32 weights), for inference and training alike.
Peak memory: CUDA ``max_memory_allocated`` over one step minus what was allocated before; CPU the
peak of live tensor-storage bytes allocated during one step, tracked by a dispatch mode (RSS is
useless here: glibc keeps freed memory mapped, so the delta after warm-up reads ~0).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import weakref
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
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
# timing and memory
# --------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TensorMemory(TorchDispatchMode):
    """Live bytes of tensor storages created under the mode (freed when the storage dies); peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # sparse tensors (the key_lists CSR path) have no storage of their own: their index and
            # value tensors are counted when they are created
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided:
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n == 0 or key in self.seen:
                    continue
                self.seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def peak_memory_mb(step: Callable[[], None], device) -> float:
    """Peak memory of one call of ``step`` above what was in use before it, MiB."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    mode = _TensorMemory()
    with mode:
        step()
    return mode.peak / 2 ** 20


def interleaved_times(steps: Dict[str, Callable[[], None]], device, warmup: int, iters: int,
                      rounds: int) -> Dict[str, float]:
    """Median over rounds of the mean step time (s) per entry; entries alternate round by round."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    per: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            per[name].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in per.items()}


def _autocast(device, dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_steps(model: torch.nn.Module, x, device, dtype, batch: Optional[int] = None):
    """(inference step, train step) closures on fixed input ``x`` (a tensor, or a dict of keyword
    inputs from ``example_inputs``; then ``batch`` is its sample count)."""
    num_classes = getattr(model, "num_classes", 0) or 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
    batch = x.shape[0] if batch is None else batch
    target = torch.randint(0, max(num_classes, 1), (batch,), device=device)

    def infer():
        model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            _call(model, x)

    def train():
        model.train()
        with _autocast(device, dtype):
            out = _call(model, x)
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (batch, num_classes) \
                    and num_classes > 0:
                loss = torch.nn.functional.cross_entropy(out.float(), target)
            else:  # dense / dict outputs (segmenters, detectors, DiTs): a scalar touching every output
                loss = _scalar_loss(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return infer, train


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


def load_reference(spec: str, ref_path: Optional[str]):
    """A timm model name, or ``module:callable`` (callable() -> nn.Module), importable after
    ``ref_path`` is put on sys.path."""
    if ref_path:
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
        raise ValueError(f"--reference {spec!r} is neither a timm model name nor 'module:callable'")
    return timm.create_model(spec, pretrained=False)


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


def bench_one(name: str, model: torch.nn.Module, size, args, ref: Optional[torch.nn.Module]) -> dict:
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
    if not args.no_flops:
        model.eval()
        f = count_flops(model, x1)
        rec.update(gmacs=round(f["total"] / 2e9, 4), attention_gmacs=round(f["attention"] / 2e9, 4),
                   flops_note=FLOP_NOTE)
    if getattr(args, "flops_only", False):
        rec["timing"] = "skipped (--flops-only): parameters and GMACs only"
        if ref is not None:
            rec["reference"] = dict(name=args.reference, params_m=round(n_params(ref) / 1e6, 3))
        return rec
    model.to(device)
    if size is None:
        x = make_example_inputs(model, args.batch, device, input_kw)
    else:
        x = torch.randn(args.batch, *size, device=device)
    infer, train = make_steps(model, x, device, dtype, args.batch)
    steps = {"infer": infer}
    if not args.no_train:
        steps["train"] = train
    if ref is not None:
        rec["reference"] = dict(name=args.reference, params_m=round(n_params(ref) / 1e6, 3))
        if not args.no_flops:
            ref.eval()
            rf = count_flops(ref, x1)
            rec["reference"]["gmacs"] = round(rf["total"] / 2e9, 4)
        ref.to(device)
        rinfer, rtrain = make_steps(ref, x, device, dtype, args.batch)
        steps["ref_infer"] = rinfer
        if not args.no_train:
            steps["ref_train"] = rtrain
    # interleave inference with inference and train with train (A/B per round)
    groups = [[k for k in steps if k.endswith("infer")], [k for k in steps if k.endswith("train")]]
    times = {}
    for g in groups:
        if g:
            times.update(interleaved_times({k: steps[k] for k in g}, device, args.warmup, args.iters, args.rounds))
    rec[f"infer_{rk}"] = round(args.batch / times["infer"], 3)
    rec["infer_mem_mb"] = _round(peak_memory_mb(infer, device))
    if "train" in times:
        rec[f"train_{rk}"] = round(args.batch / times["train"], 3)
        rec["train_mem_mb"] = _round(peak_memory_mb(train, device))
    if ref is not None:
        r = rec["reference"]
        r[f"infer_{rk}"] = round(args.batch / times["ref_infer"], 3)
        r["infer_ratio"] = round(times["ref_infer"] / times["infer"], 4)   # >1: zoo faster
        r["infer_mem_mb"] = _round(peak_memory_mb(rinfer, device))
        if "ref_train" in times:
            r[f"train_{rk}"] = round(args.batch / times["ref_train"], 3)
            r["train_ratio"] = round(times["ref_train"] / times["train"], 4)
            r["train_mem_mb"] = _round(peak_memory_mb(rtrain, device))
        r["ratio_note"] = f"zoo {unit} / reference {unit}, medians of interleaved rounds"
    rec["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rec["memory_method"] = ("torch.cuda.max_memory_allocated minus allocated before the step" if device.type == "cuda"
                            else "peak bytes of tensor storages allocated during one step (dispatch-mode tracker; "
                            "includes grads of a train step, excludes allocator caching and non-tensor memory)")
    return rec


def _round(v, n=1):
    return None if v is None else round(v, n)


def env_info(device) -> dict:
    import timm
    return dict(device=args_device_str(device), device_name=device_name(device), torch=torch.__version__,
                timm=timm.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def args_device_str(device) -> str:
    return device.type


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


MD_COLS = [("model", "model"), ("params (M)", "params_m"), ("GMACs", "gmacs"), ("attn GMACs", "attention_gmacs"),
           ("input", "input_size"), ("batch", "batch"), ("dtype", "dtype"), ("infer {u}", "infer_rate"),
           ("train {u}", "train_rate"), ("infer peak MiB", "infer_mem_mb"), ("train peak MiB", "train_mem_mb")]


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


def markdown_table(records: List[dict]) -> str:
    """Markdown table of benchmark records (reference ratios in extra columns when present)."""
    has_ref = any("reference" in r for r in records)
    u = records_unit(records)
    head = [h.format(u=u) for h, _ in MD_COLS] + (
        ["reference", f"ref infer {u}", "infer ratio", "train ratio"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            lines.append("| " + r["model"] + " | error: " + r["error"].replace("|", "/")[:80] + " |"
                         + " |" * (len(head) - 2))
            continue
        row = []
        for _, k in MD_COLS:
            if k.endswith("_rate"):
                v = rate(r, k[:-5])
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
    p.add_argument("--reference", default=None, help="timm model name or 'module:callable' to compare with")
    p.add_argument("--reference-path", default=None, help="directory put on sys.path for --reference")
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
        rec = dict(model=name, family=family_of(name))
        try:
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
            ref = load_reference(args.reference, args.reference_path) if args.reference else None
            what = tuple(size) if size is not None else f"example_inputs({args.input_kw or ''})"
            print(f"benchmark: {name} {what} batch {args.batch} on {device} ...", file=sys.stderr, flush=True)
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
