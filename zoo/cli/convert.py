#!/usr/bin/env python
"""Convert an upstream checkpoint into a zoo weights file: validated, hashed, safetensors.

    python tools/convert_weights.py MODEL UPSTREAM_CKPT OUT_DIR [--key KEY] [--import MODULE]

Steps: build ``MODEL`` (``arch`` or ``arch.tag``, so the tag's num_classes applies); load the
checkpoint without unpickling code (safetensors, or ``torch.load(weights_only=True)``); take the
state dict from ``--key`` or the first of state_dict_ema / model_ema / state_dict / model; strip
DDP / torch.compile prefixes; apply the family's ``checkpoint_filter_fn``; load strictly; write
``<MODEL>-<sha256[:8]>.safetensors`` atomically after checking that
``timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` reproduces
exactly these tensors. Prints the path and the full sha256 for the family's ``zoo.hub.cfg``.
"""
import argparse
import hashlib
import importlib
import os
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class ConversionError(RuntimeError):
    """The checkpoint cannot be converted for this model; the message says why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_upstream(path: Path) -> Any:
    """The checkpoint object, loaded without executing pickled code."""
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        import safetensors.torch
        return safetensors.torch.load_file(str(path), device="cpu")
    if path.suffix in (".npz", ".npy"):
        raise ConversionError(f"{path.name}: numpy checkpoints need the model's own load_pretrained "
                              f"(a cfg with custom_load=True), not this tool")
    try:
        # argparse.Namespace is allowlisted as timm does: training scripts store their args in it.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"refusing to load {path}: it is not a plain weights file (torch.load(weights_only=True) "
            f"rejected it: {str(e).splitlines()[0]}). Ask upstream for a safetensors file or a plain "
            f"state dict; this tool does not unpickle arbitrary objects.") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ConversionError(f"cannot read {path} as a torch checkpoint: {e}") from None


def extract_state_dict(ckpt: Any, key: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, key it came from) with wrapper prefixes removed."""
    if not isinstance(ckpt, dict):
        raise ConversionError(f"checkpoint holds a {type(ckpt).__name__}, expected a dict of tensors")
    if key is not None:
        if key not in ckpt:
            raise ConversionError(f"--key {key!r} not in checkpoint; top-level keys: {sorted(map(str, ckpt))[:20]}")
        sd, used = ckpt[key], key
    else:
        used = next((k for k in STATE_DICT_KEYS if isinstance(ckpt.get(k), dict) and ckpt[k]), "")
        sd = ckpt[used] if used else ckpt
    if not isinstance(sd, dict):
        raise ConversionError(f"checkpoint[{used!r}] is a {type(sd).__name__}, expected a dict of tensors")
    out = {}
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    non_tensors = sorted(k for k, v in out.items() if not isinstance(v, torch.Tensor))
    if non_tensors and len(non_tensors) == len(out):
        raise ConversionError(f"no tensors found under {used or 'the top level'!r}; keys: {non_tensors[:20]}; "
                              f"pass --key to pick the state dict")
    return out, used


def _filter_fn(model: torch.nn.Module):
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def convert(model_name: str, checkpoint: os.PathLike, out_dir: os.PathLike, *, key: Optional[str] = None,
            use_filter: bool = True, log=print) -> Tuple[Path, str]:
    """Convert and write; return (output path, full sha256). Raises :class:`ConversionError`."""
    import timm
    import zoo  # noqa: F401  (registers the zoo families)
    from zoo.models._builder import PretrainedMismatchError, call_filter_fn, check_state_dict

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    arch = model_name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ConversionError(f"unknown model {model_name!r}; see zoo.list_models()")
    model = timm.create_model(model_name, pretrained=False)
    ckpt = load_upstream(checkpoint)
    sd, used = extract_state_dict(ckpt, key)
    log(f"{checkpoint.name} (sha256 {_sha256(checkpoint)}): {len(sd)} entries"
        + (f" from {used!r}" if used else ""))

    fn = _filter_fn(model) if use_filter else None
    if fn is not None:
        sd = call_filter_fn(fn, sd, model)
        log(f"applied {type(model).__module__}.checkpoint_filter_fn")
    elif use_filter:
        log(f"{type(model).__module__} has no checkpoint_filter_fn; keys used as they are")
    try:
        check_state_dict(sd, model, what=f"{checkpoint.name} (filtered)")
    except PretrainedMismatchError as e:
        raise ConversionError(str(e)) from None
    model.load_state_dict(sd, strict=True)

    import safetensors.torch
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    # A unique temporary beside the result, so the final os.replace is atomic.
    tmp = out_dir / f".{model_name}.{uuid.uuid4().hex[:12]}.partial.safetensors"
    try:
        # One metadata key only: safetensors writes several in random order, and the same
        # upstream file must always give the same bytes (and so the same sha256).
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a published file is world-readable
        _verify_round_trip(model_name, tmp, tensors)
        digest = _sha256(tmp)
        out = out_dir / f"{model_name}-{digest[:8]}.safetensors"
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out, digest


def _verify_round_trip(model_name: str, path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """The written file must load through the pretrained path and give back exactly these tensors
    (so the family's filter fn passes converted weights through unchanged)."""
    import timm
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as e:
        raise ConversionError(f"the converted file does not load with pretrained=True: {e}") from e
    loaded = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in loaded or not torch.equal(loaded[k], v.to(loaded[k].dtype))]
    if bad:
        raise ConversionError(f"after a pretrained load these tensors differ from the converted ones: {bad[:10]} "
                              f"(does checkpoint_filter_fn pass already-converted keys through unchanged?)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="registered model name, arch or arch.tag")
    ap.add_argument("checkpoint", help="upstream checkpoint (.pth/.pt/.bin/.safetensors)")
    ap.add_argument("out_dir", help="folder for <model>-<sha256[:8]>.safetensors")
    ap.add_argument("--key", default=None, help=f"checkpoint key holding the state dict (default: first of "
                                                f"{', '.join(STATE_DICT_KEYS)}, else the top level)")
    ap.add_argument("--no-filter", action="store_true", help="do not apply the family's checkpoint_filter_fn")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers models defined outside the zoo); repeatable")
    args = ap.parse_args(argv)
    try:
        for mod in args.imports:
            importlib.import_module(mod)
        out, digest = convert(args.model, args.checkpoint, args.out_dir, key=args.key,
                              use_filter=not args.no_filter)
    except (ConversionError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
