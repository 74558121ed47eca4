"""Pretrained weights: cfg metadata, verified downloads, and the builder every family calls.

Interface (stable, families code against it):

- ``cfg(url=..., sha256=..., license=..., paper_ids=..., origin_url=..., **timm_cfg_fields)``
  returns a timm default-cfg dict and records the file's sha256 in :data:`KNOWN_SHA256` (or, in
  the cfg's ``notes``, that upstream publishes none).
- ``build_model(model_cls, variant, pretrained, pretrained_filter_fn=..., **kwargs)``: drop-in for
  ``timm.models.build_model_with_cfg``. URL weights are fetched through :func:`download` (hash
  checked, atomic, progress bar) and handed to timm as a local file; every pretrained load is
  checked key by key and shape by shape against the model after the filter fn.
- ``download(url, sha256=None, *, cache_dir=None, progress=True) -> pathlib.Path``.

timm itself loads local files with safetensors or ``torch.load(weights_only=True)`` only
(``timm.models.load_state_dict``), so no weights file is ever unpickled with arbitrary globals.
"""
import hashlib
import http.client
import inspect
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, resolve_pretrained_cfg
# The exact rule timm uses to pick state_dict / file / hf-hub / url; reusing it keeps our
# "is this a url load?" decision identical to what timm will do next.
from timm.models._builder import _resolve_pretrained_source

__all__ = [
    "KNOWN_SHA256", "cfg", "build_model", "download", "expected_sha256", "file_sha256", "check_state_dict",
    "call_filter_fn",
    "WeightsDownloadError", "WeightsUnreachableError", "WeightsHTTPError", "WeightsTruncatedError",
    "WeightsHashMismatchError", "PretrainedTagError", "PretrainedMismatchError",
]

_logger = logging.getLogger(__name__)

# url -> sha256 hex digest of the file bytes, or None when upstream publishes none.
KNOWN_SHA256: Dict[str, Optional[str]] = {}
# Cache file names. torch.hub names a cached file after the url's last path segment; where
# several cfg urls share one (onedrive's ".../root/content", "model_best.pth"), or it has no
# extension, each url gets a name with a digest of the url instead (see _register_cache_name).
_URLS_BY_NAME: Dict[str, set] = {}
_EXPLICIT_NAMES: Dict[str, str] = {}  # (url, filename) pairs: filename -> url
_CACHE_FILENAME: Dict[str, str] = {}  # url -> cache file name, where it is not the basename

SHA256_UNKNOWN_NOTE = "sha256 unknown upstream: keys and shapes are checked on load"
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole file
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class WeightsDownloadError(RuntimeError):
    """A weights file could not be fetched or failed verification; the cache holds no part of it."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url


class WeightsUnreachableError(WeightsDownloadError):
    """No connection to the server (offline, DNS, refused, timeout) or a missing ``file://`` path."""


class WeightsHTTPError(WeightsDownloadError):
    """The server answered with an HTTP error status (404, 403, 500 ...)."""

    def __init__(self, message: str, url: str = "", status: int = 0):
        super().__init__(message, url)
        self.status = status


class WeightsTruncatedError(WeightsDownloadError):
    """The body ended before the announced Content-Length."""


class WeightsHashMismatchError(WeightsDownloadError):
    """The bytes do not have the sha256 the cfg promises."""


class PretrainedTagError(RuntimeError):
    """``create_model('arch.tag')`` named a tag the architecture does not have, or one without weights."""


class PretrainedMismatchError(RuntimeError):
    """A (filtered) pretrained state dict does not match the model's keys or shapes."""


# ----------------------------------------------------------------------------------------------
# cfg metadata

def _check_sha256(sha256: Optional[str], what: str) -> Optional[str]:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower()):
        raise ValueError(f"{what}: sha256 must be the 64 hex digit sha256 of the file bytes or None, got {sha256!r}")
    return sha256.lower()


def _url_str(url: Union[str, Tuple[str, str], None]) -> str:
    if isinstance(url, (tuple, list)):
        return url[0]
    return url or ""


def _url_basename(url: str) -> str:
    return os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))


def _digest_name(name: str, url: str) -> str:
    stem, dot, suffix = name.partition(".")
    return f"{stem or 'weights'}-{hashlib.sha256(url.encode()).hexdigest()[:10]}{dot}{suffix}"


def _register_cache_name(url: str, explicit: Optional[str]) -> None:
    if explicit:
        if _EXPLICIT_NAMES.setdefault(explicit, url) != url:
            raise ValueError(f"cfg urls {_EXPLICIT_NAMES[explicit]} and {url} are both given the cache "
                             f"file name {explicit!r}; pick another name for one of them")
        name = explicit
    else:
        name = _url_basename(url)
        if "." not in name:  # ".../content", ".../download": meaningless in a shared cache
            _CACHE_FILENAME[url] = _digest_name(name, url)
    urls = _URLS_BY_NAME.setdefault(name, set())
    urls.add(url)
    if len(urls) > 1:
        for u in urls:
            if _EXPLICIT_NAMES.get(name) != u:
                _CACHE_FILENAME[u] = _digest_name(name, u)


def cfg(url: Union[str, Tuple[str, str]] = "", *, sha256: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """A timm pretrained cfg dict; ``sha256`` is kept beside it (timm's cfg has no such field).

    ``url`` may also be timm's ``(url, cache_filename)`` pair. Pass ``sha256=None`` only when
    upstream publishes no weights file you could hash; the cfg then says so in ``notes``.
    """
    url_s = _url_str(url)
    if url_s:
        scheme = urllib.parse.urlparse(url_s).scheme
        if scheme not in ("http", "https", "file"):
            raise ValueError(f"cfg url must be http(s):// or file://, got {url_s!r}")
        sha256 = _check_sha256(sha256, f"cfg(url={url_s!r})")
        _register_cache_name(url_s, url[1] if isinstance(url, (tuple, list)) else None)
        if KNOWN_SHA256.get(url_s) is not None and sha256 is not None and KNOWN_SHA256[url_s] != sha256:
            raise ValueError(f"conflicting sha256 for {url_s}: {KNOWN_SHA256[url_s]} vs {sha256}")
        if sha256 is not None or url_s not in KNOWN_SHA256:
            KNOWN_SHA256[url_s] = sha256
        if sha256 is None:
            notes = tuple(kwargs.pop("notes", None) or ())
            if SHA256_UNKNOWN_NOTE not in notes:
                notes += (SHA256_UNKNOWN_NOTE,)
            kwargs["notes"] = notes
    elif sha256 is not None:
        raise ValueError("cfg: sha256 given without a url")
    return dict(url=url, **kwargs)


def expected_sha256(url: str) -> Optional[str]:
    """The sha256 a zoo cfg recorded for ``url`` (None when unknown or not a zoo url)."""
    return KNOWN_SHA256.get(_url_str(url))


# ----------------------------------------------------------------------------------------------
# download

def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _local_file_hint(url: str, dest: Path, model_name: Optional[str], offline: bool = False) -> str:
    name = repr(model_name) if model_name else "'<model>'"
    first = (f"Fetch {url} where there is network access, then" if offline
             else "With a good copy of the file you can")
    return (f"{first} either pass it: timm.create_model({name}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='/path/to/{dest.name}')), or copy it to {dest}")


def _cache_path(url: str, cache_dir: Optional[Union[str, os.PathLike]], filename: Optional[str]) -> Path:
    if cache_dir is None:
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    name = filename or _CACHE_FILENAME.get(url) or _url_basename(url)
    if not name or name in (".", ".."):
        raise ValueError(f"cannot derive a cache file name from url {url!r}; pass filename=")
    return Path(cache_dir) / name


def download(
        url: str,
        sha256: Optional[str] = None,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        progress: bool = True,
        filename: Optional[str] = None,
        model_name: Optional[str] = None,
) -> Path:
    """Fetch ``url`` into the torch.hub checkpoint cache (or ``cache_dir``) and return its path.

    A cached file is reused without touching the network; its hash is re-checked when known and a
    corrupt copy is replaced. A download streams into a temporary file beside the target, is
    checked against Content-Length and ``sha256``, and only then moved into place (``os.replace``),
    so a failed or interrupted download never leaves a file under the final name, nor a partial
    one. The cache file is named after the url (or ``filename``), as torch.hub does, except where
    zoo cfgs have several urls with one basename, or one without an extension: those get a name
    with a digest of the url. ``model_name`` only makes error messages more specific.
    """
    sha256 = _check_sha256(sha256, f"download({url!r})")
    dest = _cache_path(url, cache_dir, filename)
    if dest.is_file():
        if sha256 is None:
            return dest
        got = file_sha256(dest)
        if got == sha256:
            return dest
        _logger.warning(f"cached {dest} has sha256 {got}, expected {sha256}; removing it and downloading again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)

    hint = _local_file_hint(url, dest, model_name)
    # A private temporary beside the target (same filesystem, so os.replace is atomic); opened
    # with open() rather than mkstemp so the cached file gets the usual umask permissions.
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        with open(tmp, "xb") as out:
            got, n_bytes = _stream(url, out, progress=progress, desc=dest.name, hint=hint,
                                   offline_hint=_local_file_hint(url, dest, model_name, offline=True))
        if sha256 is not None and got != sha256:
            raise WeightsHashMismatchError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got} ({n_bytes} bytes). The file was "
                f"discarded. If upstream replaced the file, update the cfg's sha256; otherwise retry or "
                f"check for a proxy rewriting downloads. {hint}", url)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sha256 is None:
        _logger.info(f"downloaded {url} (sha256 {got}, not published upstream)")
    return dest


def _stream(url: str, out, *, progress: bool, desc: str, hint: str, offline_hint: str) -> Tuple[str, int]:
    """Copy the body of ``url`` into ``out``; return (sha256 hex, byte count)."""
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "attention-zoo"})
    try:
        resp = urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise WeightsHTTPError(f"HTTP {e.code} {e.reason} for {url}. {hint}", url, e.code) from None
    except urllib.error.URLError as e:
        raise WeightsUnreachableError(
            f"cannot reach {url} ({e.reason}); offline or the server is down? {offline_hint}", url) from e
    except (OSError, http.client.HTTPException) as e:
        raise WeightsUnreachableError(f"cannot reach {url} ({e}); offline or the server is down? {offline_hint}", url) from e

    h = hashlib.sha256()
    n = 0
    with resp:
        length = resp.headers.get("Content-Length")
        try:
            total = int(length) if length is not None else None
        except ValueError:
            total = None
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=not progress, leave=False) as bar:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
        except http.client.IncompleteRead as e:
            n += len(e.partial)
            raise WeightsTruncatedError(
                f"download of {url} ended early: got {n} of {total} bytes (Content-Length); the partial "
                f"file was discarded. Retry; {hint}", url) from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, (socket.timeout, ConnectionError, http.client.HTTPException)):
                raise WeightsTruncatedError(
                    f"download of {url} broke off after {n} of {total if total is not None else '?'} bytes "
                    f"({e!r}); the partial file was discarded. Retry; {hint}", url) from e
            raise WeightsDownloadError(f"could not write the download of {url}: {e}", url) from e
    if total is not None and n != total:
        raise WeightsTruncatedError(
            f"download of {url} ended early: got {n} of {total} bytes (Content-Length); the partial file "
            f"was discarded. Retry; {hint}", url)
    return h.hexdigest(), n


# ----------------------------------------------------------------------------------------------
# building

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


def check_state_dict(state_dict: Dict[str, Any], model: torch.nn.Module, *, skip_prefixes=(),
                     any_shape_prefixes=(), what: str = "pretrained state dict") -> None:
    """Raise :class:`PretrainedMismatchError` unless ``state_dict`` has exactly the model's keys and shapes.

    Keys starting with ``skip_prefixes`` (classifier) are left to timm's head adaptation;
    keys under ``any_shape_prefixes`` (first conv) may differ in shape, as timm adapts in_chans.
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
        def head(xs):
            return ", ".join(xs[:12]) + (f", ... ({len(xs)} in all)" if len(xs) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {head(wrong)}")
        raise PretrainedMismatchError(
            f"{what} does not match {type(model).__name__} (after the checkpoint filter fn): " + "; ".join(parts))


def _strict_filter(filter_fn: Optional[Callable], pretrained_cfg: Dict[str, Any], what: str) -> Callable:
    """Wrap a filter fn so its output is checked against the model even when timm relaxes
    ``strict`` for a new head: weights without a published hash rely on this check."""
    skip = tuple(f"{c}." for c in _as_tuple(pretrained_cfg.get("classifier")))
    any_shape = tuple(f"{c}.weight" for c in _as_tuple(pretrained_cfg.get("first_conv")))

    def filter_and_check(state_dict, model):
        if filter_fn is not None:
            try:
                state_dict = call_filter_fn(filter_fn, state_dict, model)
            except TypeError as e:
                # timm retries a filter that raised TypeError with one argument, which would hide this
                raise RuntimeError(f"checkpoint filter fn {getattr(filter_fn, '__qualname__', filter_fn)} "
                                   f"failed on the {what}: {e!r}") from e
        check_state_dict(state_dict, model, skip_prefixes=skip, any_shape_prefixes=any_shape, what=what)
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
    return PretrainedTagError(
        f"{name!r} has no pretrained weights ({alt}). Use pretrained=False for random init, or load a "
        f"local file with pretrained_cfg_overlay=dict(file=...)")


def build_model(model_cls, variant: str, pretrained: bool = False, *, pretrained_cfg=None,
                pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
                pretrained_filter_fn: Optional[Callable] = None, pretrained_strict: bool = True,
                cache_dir: Optional[Union[str, os.PathLike]] = None, **kwargs):
    """Drop-in for ``timm.models.build_model_with_cfg`` (same arguments).

    Differences: an unknown tag fails with the list of known tags; url weights are downloaded by
    :func:`download` (sha256 from the cfg, or ``pretrained_cfg_overlay=dict(sha256=...)`` next to a
    mirror ``url=``) and loaded as a local file; with ``pretrained_strict`` (default) the filtered
    state dict must match the model's keys and shapes, classifier and first conv excepted.
    """
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        _check_tag(variant, pretrained_cfg)
    overlay = dict(pretrained_cfg_overlay or {})
    sha_given = "sha256" in overlay
    sha_override = overlay.pop("sha256", None)
    downloaded = False
    if pretrained:
        resolved = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                          pretrained_cfg_overlay=overlay).to_dict()
        load_from, loc = _resolve_pretrained_source(resolved)
        name = variant + (f".{resolved['tag']}" if resolved.get("tag") else "")
        if load_from == "url":
            url, fname = (loc[0], loc[1]) if isinstance(loc, (tuple, list)) else (loc, None)
            sha = sha_override if sha_given else expected_sha256(url)
            path = download(url, sha, cache_dir=cache_dir, filename=fname, model_name=name)
            overlay["file"] = str(path)
            overlay["custom_load"] = resolved.get("custom_load", False)
            downloaded = True
        elif load_from == "file" and not os.path.isfile(loc):
            raise FileNotFoundError(f"pretrained weights file for {name!r} not found: {loc!r} "
                                    f"(from pretrained_cfg file=)")
        elif load_from == "":
            raise _no_weights_error(variant, resolved)
        if pretrained_strict:
            pretrained_filter_fn = _strict_filter(pretrained_filter_fn, resolved, f"pretrained weights for {name!r}")
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=pretrained_filter_fn, pretrained_strict=pretrained_strict, cache_dir=cache_dir,
        **kwargs)
    if downloaded:
        # The cfg keeps naming the url as the weights' source, as after timm's own url loads.
        for attr in ("pretrained_cfg", "default_cfg"):
            c = getattr(model, attr, None)
            if isinstance(c, dict):
                c.pop("file", None)
    return model
