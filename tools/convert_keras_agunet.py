#!/usr/bin/env python
"""Convert upstream's Keras AGUNet / DAGUNet ``model.h5`` into a zoo safetensors file.

    python tools/convert_keras_agunet.py resources/models/DAGUNet/model.h5 dagunet_3d out/dagunet.safetensors
    python tools/convert_keras_agunet.py model.h5 agunet_3d out.safetensors --filters 16 32 128 256 256

The released models are full-model Keras HDF5 files (``model_weights/<layer>/<layer>/<weight>:0``,
layer order in the ``layer_names`` attribute). Keras names layers ``conv3d``, ``conv3d_1``, ...
in the order the builder creates them, so each Keras layer type is matched, in that order, to
:meth:`zoo.models.agunet.AttentionUNet3d.keras_layers` (``--order file`` uses the file's
``layer_names`` order instead). Kernels are permuted channels-last -> channels-first; BatchNorm
statistics are copied; PAM/CAM gammas too.

The released DAGUNet's PAM projections are not in the file: upstream builds them inside the
layer's ``call()``, which tf.keras 1.x does not track, so only gamma was trained and the
projections were random at every load. They keep the zoo model's initialisation here (reported).
Needs h5py (``pip install 'attention-zoo[medical]'``).
"""
import argparse
import importlib.util
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if importlib.util.find_spec("zoo") is None:  # not installed: use this checkout
    sys.path.append(osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np
import torch

# name prefix -> Keras class; the transposed conv must be tested before the plain conv
_TYPE_PREFIXES = (("conv3d_transpose", "Conv3DTranspose"), ("conv3d", "Conv3D"),
                  ("batch_normalization", "BatchNormalization"), ("pam", "PAM"), ("cam", "CAM"))


class ConversionError(RuntimeError):
    """The h5 file does not fit the requested architecture; the message says how."""


def _s(x) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _keras_type(name: str, class_names: Dict[str, str]) -> Optional[str]:
    if name in class_names:
        return class_names[name]
    for prefix, kind in _TYPE_PREFIXES:
        if name == prefix or re.fullmatch(re.escape(prefix) + r"_\d+", name):
            return kind
    return None


def _creation_index(name: str) -> int:
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else 0


def read_keras_h5(path: str) -> List[Tuple[str, str, Dict[str, np.ndarray]]]:
    """[(layer name, Keras class, {weight name without ':0': array})] for layers holding weights,
    in the file's ``layer_names`` order."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading Keras .h5 files needs h5py: pip install 'attention-zoo[medical]'") from e
    import json

    if not osp.isfile(path):
        raise FileNotFoundError(f"Keras file {path!r} does not exist")
    out = []
    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in g.attrs:
            raise ConversionError(f"{path}: no 'layer_names' attribute; not a Keras HDF5 weights/model file")
        class_names = {}
        if "model_config" in f.attrs:
            cfg = json.loads(_s(f.attrs["model_config"]))
            for layer in cfg.get("config", {}).get("layers", []):
                class_names[layer["config"]["name"]] = layer["class_name"]
        for lname in (_s(n) for n in g.attrs["layer_names"]):
            wnames = [_s(w) for w in g[lname].attrs.get("weight_names", [])]
            if not wnames:
                continue
            kind = _keras_type(lname, class_names)
            if kind is None:
                raise ConversionError(f"{path}: cannot tell the Keras type of layer {lname!r} "
                                      f"(weights {wnames}); known: {[k for _, k in _TYPE_PREFIXES]}")
            weights = {}
            for w in wnames:
                short = w.split("/")[-1].split(":")[0]
                weights[short] = np.asarray(g[lname][w])
            out.append((lname, kind, weights))
    return out


def keras_state_dict(layers, model, order: str = "creation") -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map Keras layers onto ``model``; returns (state dict, model keys left at their init)."""
    from zoo.models.agunet import keras_to_torch

    if order not in ("creation", "file"):
        raise ValueError(f"order must be 'creation' or 'file', got {order!r}")
    slots = model.keras_layers()
    by_type: Dict[str, list] = {}
    for lname, kind, w in layers:
        by_type.setdefault(kind, []).append((lname, w))
    if order == "creation":
        for kind in by_type:
            by_type[kind].sort(key=lambda lw: _creation_index(lw[0]))
    want: Dict[str, list] = {}
    for kind, path in slots:
        want.setdefault(kind, []).append(path)
    counts = {k: (len(by_type.get(k, [])), len(want.get(k, []))) for k in set(by_type) | set(want)}
    bad = {k: c for k, c in counts.items() if c[0] != c[1]}
    if bad:
        detail = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in sorted(bad.items()))
        raise ConversionError(f"layer counts differ ({detail}); pick the matching model and flags "
                              f"(--filters, --no-pyramid, --no-deep-supervision)")
    ref = model.state_dict()
    sd = {}
    for kind, paths in want.items():
        for path, (lname, w) in zip(paths, by_type[kind]):
            for k, v in keras_to_torch(kind, w).items():
                key = f"{path}.{k}"
                if key not in ref:
                    raise ConversionError(f"internal: {key} not in the model")
                if tuple(ref[key].shape) != tuple(v.shape):
                    raise ConversionError(f"Keras layer {lname!r} ({kind}) -> {key}: shape {tuple(v.shape)} "
                                          f"but the model has {tuple(ref[key].shape)}")
                sd[key] = v.to(ref[key].dtype)
    left = [k for k in ref if k not in sd and not k.endswith("num_batches_tracked")]
    return sd, left


def convert(h5_path: str, model_name: str, out_path: str, order: str = "creation", log=print, **model_kwargs):
    """Build ``model_name`` (with ``model_kwargs``), load the Keras weights, write safetensors."""
    import timm
    from safetensors.torch import save_file

    import zoo  # noqa: F401
    from zoo.hub import WeightsFormatError, validate_weights_file

    try:  # a clear error for a download that is not HDF5 (an HTML page, a cut-off file)
        validate_weights_file(h5_path, "model.h5")
    except (WeightsFormatError, OSError) as e:
        raise ConversionError(str(e)) from None
    model = timm.create_model(model_name, **model_kwargs).eval()
    layers = read_keras_h5(h5_path)
    sd, left = keras_state_dict(layers, model, order)
    full = model.state_dict()
    full.update(sd)
    model.load_state_dict(full, strict=True)
    pam_left = [k for k in left if ".pam.key." in k or ".pam.query." in k or ".pam.value." in k]
    other = [k for k in left if k not in pam_left]
    if other:
        raise ConversionError(f"model weights without a Keras source: {other[:8]}")
    if pam_left:
        log(f"note: {len(pam_left)} PAM projection weights are not in the file (untracked by Keras; only "
            f"gamma was trained): they keep the zoo initialisation")
    os.makedirs(osp.dirname(osp.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise
    log(f"wrote {out_path} ({len(sd)} tensors from {len(layers)} Keras layers)")
    return model


def main(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("h5", help="upstream Keras model.h5")
    p.add_argument("model", help="zoo model name, e.g. agunet_3d or dagunet_3d")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--filters", type=int, nargs="+", help="channels per level (default: the model's)")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--no-pyramid", action="store_true", help="the Keras model was built without input_pyramid")
    p.add_argument("--no-deep-supervision", action="store_true")
    p.add_argument("--order", choices=("creation", "file"), default="creation",
                   help="match layers by Keras auto-name order (default) or by the file's layer order")
    a = p.parse_args(argv)
    kw = dict(num_classes=a.num_classes)
    if a.filters:
        kw["filters"] = tuple(a.filters)
    if a.no_pyramid:
        kw["input_pyramid"] = False
    if a.no_deep_supervision:
        kw["deep_supervision"] = False
    try:
        convert(a.h5, a.model, a.out, a.order, **kw)
    except ConversionError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
