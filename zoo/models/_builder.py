"""Strict pretrained loading: the zoo's drop-in for ``timm.models.build_model_with_cfg``.

Every family builds through :func:`build_model`. Weights are fetched by :mod:`zoo.hub` and handed to
timm as a local file; after the family's ``checkpoint_filter_fn`` the state dict must have exactly
the model's keys and shapes. A classifier that does not fit is an error unless the caller asked for
a new head (``num_classes`` differing from a registry tag's, or ``pretrained_head='reset'``); the
keys left at their initial values are then logged.
"""
import inspect
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, resolve_pretrained_cfg

from zoo.hub import SHA256_UNKNOWN_NOTE, fetch_weights, weights_source

__all__ = ["build_model", "check_state_dict", "call_filter_fn", "PretrainedTagError", "PretrainedMismatchError"]

_logger = logging.getLogger(__name__)


class PretrainedTagError(RuntimeError):
    """``create_model('arch.tag')`` named a tag the architecture does not have, or one without weights."""


class PretrainedMismatchError(RuntimeError):
    """A (filtered) pretrained state dict does not match the model's keys or shapes."""


def call_filter_fn(filter_fn: Callable, state_dict, model):
    """Call a timm filter fn with (state_dict, model) or (state_dict), by its signature."""
    try:
        params = [p for p in inspect.signature(filter_fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        two = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        two = True
    return filter_fn(state_dict, model) if two else filter_fn(state_dict)


def _as_tuple(v) -> Tuple[str, ...]:
    if not v:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def _head(xs):
    return ", ".join(xs[:12]) + (f", ... ({len(xs)} in all)" if len(xs) > 12 else "")


def check_state_dict(state_dict: Dict[str, Any], model: torch.nn.Module, *, skip_prefixes=(),
                     any_shape_prefixes=(), what: str = "pretrained state dict") -> None:
    """Raise :class:`PretrainedMismatchError` unless ``state_dict`` has exactly the model's keys and shapes.

    Keys starting with ``skip_prefixes`` are not checked; keys under ``any_shape_prefixes`` (first
    conv) may differ in shape, as timm adapts ``in_chans``.
    """
    expected = model.state_dict()

    def skipped(k):
        return any(k.startswith(p) for p in skip_prefixes)

    missing = [k for k in expected if k not in state_dict and not skipped(k)]
    unexpected = [k for k in state_dict if k not in expected and not skipped(k)]
    wrong = []
    for k, v in state_dict.items():
        if k in expected and not skipped(k) and not any(k.startswith(p) for p in any_shape_prefixes):
            shape = tuple(getattr(v, "shape", ()))
            if not isinstance(v, torch.Tensor) or shape != tuple(expected[k].shape):
                wrong.append(f"{k}: {shape if isinstance(v, torch.Tensor) else type(v).__name__} "
                             f"vs model {tuple(expected[k].shape)}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_head(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {_head(wrong)}")
        raise PretrainedMismatchError(
            f"{what} does not match {type(model).__name__} (after the checkpoint filter fn): " + "; ".join(parts))


def _strict_filter(filter_fn: Optional[Callable], pretrained_cfg: Dict[str, Any], what: str,
                   head_swap: bool, reason: str) -> Callable:
    """Wrap a filter fn: map, then settle the classifier, then check every key and shape.

    A classifier whose shapes fit the model is loaded. One that does not is replaced by the
    model's freshly initialised head when ``head_swap`` (logged with the keys), else an error.
    """
    heads = tuple(f"{c}." for c in _as_tuple(pretrained_cfg.get("classifier")))
    any_shape = tuple(f"{c}.weight" for c in _as_tuple(pretrained_cfg.get("first_conv")))

    def filter_and_check(state_dict, model):
        if filter_fn is not None:
            try:
                state_dict = call_filter_fn(filter_fn, state_dict, model)
            except TypeError as e:
                # timm retries a filter that raised TypeError with one argument, which would hide this
                raise RuntimeError(f"checkpoint filter fn {getattr(filter_fn, '__qualname__', filter_fn)} "
                                   f"failed on the {what}: {e!r}") from e
        check_state_dict(state_dict, model, skip_prefixes=heads, any_shape_prefixes=any_shape, what=what)
        own = model.state_dict()
        head_keys = sorted({k for k in list(state_dict) + list(own) if k.startswith(heads)}) if heads else []
        misfit = [k for k in head_keys if k not in state_dict or k not in own
                  or tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)]
        if misfit:
            detail = ", ".join(
                f"{k} {tuple(state_dict[k].shape) if k in state_dict else 'absent'} vs model "
                f"{tuple(own[k].shape) if k in own else 'absent'}" for k in misfit)
            if not head_swap:
                raise PretrainedMismatchError(
                    f"the classifier of the {what} does not fit the model ({detail}). To fine-tune with a new, "
                    f"randomly initialised head pass pretrained_head='reset'; to keep the trained head build the "
                    f"model with the weights' num_classes.")
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
            state_dict.update({k: v for k, v in own.items() if k.startswith(heads)})
            _logger.warning(f"{what}: head swapped ({reason}); left at initial values: {', '.join(head_keys)}")
        check_state_dict(state_dict, model, any_shape_prefixes=any_shape, what=what)
        return state_dict

    return filter_and_check


def _check_tag(variant: str, tag: str) -> None:
    cfgs = get_arch_pretrained_cfgs(variant)
    if f"{variant}.{tag}" in cfgs:
        return
    if not cfgs:
        raise PretrainedTagError(f"{variant!r} has no pretrained tags, so '{variant}.{tag}' is unknown; "
                                 f"use {variant!r} without a tag")
    known = ", ".join(f"{n} ({'weights' if c.has_weights else 'no weights'})" for n, c in cfgs.items())
    raise PretrainedTagError(f"unknown pretrained tag {tag!r} for {variant!r}; known: {known}")


def _no_weights_error(variant: str, resolved: Dict[str, Any]) -> PretrainedTagError:
    name = variant + (f".{resolved['tag']}" if resolved.get("tag") else "")
    with_weights = [n for n, c in get_arch_pretrained_cfgs(variant).items() if c.has_weights]
    alt = (f"tags with weights: {', '.join(with_weights)}" if with_weights
           else f"{variant!r} has no published weights")
    notes = " ".join(n for n in _as_tuple(resolved.get("notes")) if n != SHA256_UNKNOWN_NOTE)
    return PretrainedTagError(
        f"{name!r} has no downloadable weights ({alt}). Use pretrained=False for random init, or load a "
        f"local file with pretrained_cfg_overlay=dict(file=...)" + (f". Notes: {notes}" if notes else ""))


_HEAD_MODES = ("auto", "reset")


def build_model(model_cls, variant: str, pretrained: bool = False, *, pretrained_cfg=None,
                pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
                pretrained_filter_fn: Optional[Callable] = None, pretrained_strict: bool = True,
                pretrained_head: str = "auto", cache_dir: Optional[Union[str, os.PathLike]] = None, **kwargs):
    """Drop-in for ``timm.models.build_model_with_cfg`` (same arguments, plus ``pretrained_head``).

    ``pretrained_cfg_overlay`` may carry ``sha256=`` for a mirror ``url=``. With ``pretrained_strict``
    (default) the filtered state dict must match the model (module docstring); a head that fits is
    always loaded, one that does not is replaced only when ``num_classes`` differs from a registry
    tag's (timm's fine-tuning idiom) or with ``pretrained_head='reset'``.
    """
    if pretrained_head not in _HEAD_MODES:
        raise ValueError(f"pretrained_head must be one of {_HEAD_MODES}, got {pretrained_head!r}")
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        _check_tag(variant, pretrained_cfg)
    overlay = dict(pretrained_cfg_overlay or {})
    sha_override = overlay.pop("sha256", None)
    downloaded = False
    if pretrained:
        resolved = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                          pretrained_cfg_overlay=overlay).to_dict()
        name = variant + (f".{resolved['tag']}" if resolved.get("tag") else "")
        kind, loc = weights_source(resolved)
        if kind == "":
            raise _no_weights_error(variant, resolved)
        if kind == "file" and not os.path.isfile(loc):
            raise FileNotFoundError(f"pretrained weights file for {name!r} not found: {loc!r} "
                                    f"(from pretrained_cfg file=)")
        path = fetch_weights(resolved, cache_dir=cache_dir, model_name=name, sha256=sha_override)
        if path is not None:
            overlay["file"] = str(path)
            downloaded = True
        if pretrained_strict:
            want = kwargs.get("num_classes")
            cfg_classes = resolved.get("num_classes")
            user_file = "file" in (pretrained_cfg_overlay or {}) or kind in ("file", "state_dict")
            swap = pretrained_head == "reset" or (
                not user_file and want is not None and cfg_classes is not None and want != cfg_classes)
            reason = ("pretrained_head='reset'" if pretrained_head == "reset"
                      else f"num_classes={want} instead of the weights' {cfg_classes}")
            if want is not None and cfg_classes is not None and want != cfg_classes:
                # timm would drop the classifier before our check; we decide (above) instead
                overlay["num_classes"] = want
            pretrained_filter_fn = _strict_filter(pretrained_filter_fn, resolved,
                                                  f"pretrained weights for {name!r}", swap, reason)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=pretrained_filter_fn, pretrained_strict=pretrained_strict, cache_dir=cache_dir,
        **kwargs)
    if downloaded:
        # the cfg keeps naming the url / hub repo as the weights' source, as after timm's own loads
        for attr in ("pretrained_cfg", "default_cfg"):
            c = getattr(model, attr, None)
            if isinstance(c, dict):
                c.pop("file", None)
    return model
