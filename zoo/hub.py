"""Pretrained weights through huggingface_hub and torch.hub, with the checks neither does.

Files on the Hugging Face Hub (cfg ``hf_hub_id`` + ``hf_hub_filename``) are fetched with
``huggingface_hub.hf_hub_download``: its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_HOME``
apply. Other urls are fetched with ``torch.hub.download_url_to_file`` into the torch.hub checkpoint
folder (``TORCH_HOME``), with torch.hub's hash-prefix check where the file name carries one
(``name-<hex>.pth``); ``HF_HUB_OFFLINE=1`` keeps those off the network too. What this module adds:

- a full sha256 check where a cfg records one (:func:`cfg`, :data:`KNOWN_SHA256`);
- a cache that cannot be poisoned: a download enters the cache under its final name only after it
  parses as the format it claims (torch zip / legacy pickle / safetensors / a single-file zip
  archive, which is unpacked as torch.hub does) and matches its hash; cache folders are keyed by
  the full url, and temporaries of dead downloads are removed;
- strict loading: after the family's ``checkpoint_filter_fn`` the state dict must have exactly the
  model's keys and shapes. A classifier that does not fit is an error unless the caller asked for
  a new head (``num_classes`` differing from a registry tag's, or ``pretrained_head='reset'``);
  the keys left at their initial values are then logged;
- errors that say what was wrong, name the cache path, and never advise unsafe unpickling.

:func:`build_model` is the drop-in for ``timm.models.build_model_with_cfg`` every family calls.
"""
import hashlib
import http.client
import inspect
import json
import logging
import os
import re
import socket
import struct
import urllib.error
import urllib.parse
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, resolve_pretrained_cfg

__all__ = [
    "KNOWN_SHA256", "cfg", "build_model", "download", "hf_download", "fetch_weights", "weights_source",
    "verification", "expected_sha256", "file_sha256", "validate_weights_file", "check_state_dict",
    "call_filter_fn", "url_cache_dir",
    "WeightsDownloadError", "WeightsUnreachableError", "WeightsHTTPError", "WeightsTruncatedError",
    "WeightsHashMismatchError", "WeightsFormatError", "PretrainedTagError", "PretrainedMismatchError",
]

_logger = logging.getLogger(__name__)

# url (or "hf://<repo>/<file>") -> sha256 hex digest of the file bytes, or None when none is known.
KNOWN_SHA256: Dict[str, Optional[str]] = {}

SHA256_UNKNOWN_NOTE = "no sha256 published: the file's format, keys and shapes are checked on load"
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole file
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_PREFIX_RE = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's rule, at least 8 hex digits
_TORCH_EXT = (".pth", ".pt", ".pth.tar", ".tar", ".bin", ".ckpt")
_TMP_TAG = ".zoo-dl."


class WeightsDownloadError(RuntimeError):
    """A weights file could not be fetched or failed verification; the cache holds no part of it."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url


class WeightsUnreachableError(WeightsDownloadError):
    """No connection (offline mode, DNS, refused, timeout) and no cached copy."""


class WeightsHTTPError(WeightsDownloadError):
    """The server answered with an HTTP error status (404, 403, 500 ...)."""

    def __init__(self, message: str, url: str = "", status: int = 0):
        super().__init__(message, url)
        self.status = status


class WeightsTruncatedError(WeightsDownloadError):
    """The body ended early (detected by the format check or the announced length)."""


class WeightsHashMismatchError(WeightsDownloadError):
    """The bytes do not have the sha256 (or torch.hub hash prefix) the cfg or file name promises."""


class WeightsFormatError(WeightsDownloadError):
    """The bytes are not the weights format they claim to be (an HTML page, a cut-off file ...)."""


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


def _hf_key(repo_id: str, filename: Optional[str]) -> str:
    return f"hf://{repo_id}/{filename or 'model.safetensors'}"


def cfg(url: Union[str, Tuple[str, str]] = "", *, sha256: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """A timm pretrained cfg dict; ``sha256`` (of the file the cfg's primary source serves) is kept
    in :data:`KNOWN_SHA256`, as timm's cfg has no such field.

    ``url`` may be timm's ``(url, cache_filename)`` pair. Without a sha256 the cfg's ``notes`` say
    that only the format, keys and shapes are checked.
    """
    url_s = _url_str(url)
    hf_id = kwargs.get("hf_hub_id")
    if url_s:
        scheme = urllib.parse.urlparse(url_s).scheme
        if scheme not in ("http", "https", "file"):
            raise ValueError(f"cfg url must be http(s):// or file://, got {url_s!r}")
    sha256 = _check_sha256(sha256, f"cfg(url={url_s!r}, hf_hub_id={hf_id!r})")
    if sha256 is not None and not (url_s or hf_id):
        raise ValueError("cfg: sha256 given without a url or hf_hub_id")
    if url_s or hf_id:
        partial = dict(url=url, **kwargs)
        kind, loc = weights_source(partial)
        key = _source_key(kind, loc)
        if key is not None:
            if KNOWN_SHA256.get(key) is not None and sha256 is not None and KNOWN_SHA256[key] != sha256:
                raise ValueError(f"conflicting sha256 for {key}: {KNOWN_SHA256[key]} vs {sha256}")
            if sha256 is not None or key not in KNOWN_SHA256:
                KNOWN_SHA256[key] = sha256
        if sha256 is None:
            notes = tuple(kwargs.pop("notes", None) or ())
            if SHA256_UNKNOWN_NOTE not in notes:
                notes += (SHA256_UNKNOWN_NOTE,)
            kwargs["notes"] = notes
    return dict(url=url, **kwargs)


def _source_key(kind: str, loc) -> Optional[str]:
    if kind == "url":
        return _url_str(loc)
    if kind == "hf-hub":
        return _hf_key(*loc)
    return None


def expected_sha256(url: str) -> Optional[str]:
    """The sha256 a zoo cfg recorded for ``url`` or ``hf://repo/file`` (None when unknown)."""
    return KNOWN_SHA256.get(_url_str(url))


def hash_prefix(name: str) -> Optional[str]:
    """The torch.hub sha256 prefix a file name carries (``resnet18-5c106cde.pth`` -> ``5c106cde``)."""
    m = _HASH_PREFIX_RE.search(name or "")
    return m.group(1) if m else None


def weights_source(pretrained_cfg: Dict[str, Any]) -> Tuple[str, Any]:
    """Where :func:`build_model` takes a cfg's weights from: ``(kind, location)``.

    ``file`` / ``state_dict`` first (as timm); then a url whose bytes we can verify (a recorded
    sha256 or a torch.hub hash prefix in its name); then ``hf_hub_id`` (``(repo, filename)``);
    then any url; ``("", None)`` when the cfg has no weights.
    """
    c = pretrained_cfg
    if c.get("source") in ("hf-hub", "local-dir"):
        return "timm", None
    if c.get("state_dict"):
        return "state_dict", c["state_dict"]
    if c.get("file"):
        return "file", c["file"]
    url = c.get("url")
    url_s = _url_str(url)
    name = url[1] if isinstance(url, (tuple, list)) and len(url) > 1 else _url_basename(url_s)
    if url_s and (KNOWN_SHA256.get(url_s) or hash_prefix(name)):
        return "url", url
    if c.get("hf_hub_id"):
        repo = c["hf_hub_id"]
        return "hf-hub", (repo, c.get("hf_hub_filename"))
    if url_s:
        return "url", url
    return "", None


def verification(pretrained_cfg: Dict[str, Any]) -> str:
    """What is checked about the bytes of a cfg's weights: ``verified`` (full sha256),
    ``hash-prefix-checked`` (torch.hub's file-name prefix) or ``unverified`` (format, keys and
    shapes only); ``""`` for a cfg without weights."""
    kind, loc = weights_source(pretrained_cfg)
    if kind in ("", "timm", "state_dict", "file"):
        return ""
    if KNOWN_SHA256.get(_source_key(kind, loc)):
        return "verified"
    if kind == "url":
        name = loc[1] if isinstance(loc, (tuple, list)) and len(loc) > 1 else _url_basename(_url_str(loc))
        if hash_prefix(name):
            return "hash-prefix-checked"
    return "unverified"


# ----------------------------------------------------------------------------------------------
# format checks

def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe_head(head: bytes) -> str:
    text = head[:64].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML/XML page (a login, error or redirect page?)"
    if text.startswith((b"{", b"[")):
        return "a JSON document"
    if not head:
        return "an empty file"
    return f"bytes starting {head[:16]!r}"


def _check_safetensors(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"safetensors header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"safetensors data ends at byte {8 + n + end} but the file has {size} bytes (cut off?)")


def _check_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise ValueError("a zip archive without data.pkl: not a torch.save file")
        bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"member {bad!r} fails its CRC check (corrupt or cut off)")


def _check_legacy_pickle(path: Path) -> None:
    import argparse
    try:  # argparse.Namespace allowed, as timm's loader does (training scripts store their args)
        with torch.serialization.safe_globals([argparse.Namespace]):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure means "not a loadable legacy torch file"
        raise ValueError(f"not a loadable legacy torch.save file ({type(e).__name__})") from None


def validate_weights_file(path: Union[str, os.PathLike], name: Optional[str] = None) -> str:
    """Check that ``path`` parses as the weights format its ``name`` (default: its own) claims.

    Returns the format: ``safetensors``, ``torch`` (zip), ``torch-legacy``, ``zip-archive`` (a zip
    holding one file, as torch.hub unpacks), ``npz`` or ``hdf5``. Raises :class:`WeightsFormatError`
    naming what the bytes look like instead.
    """
    path = Path(path)
    name = (name or path.name).lower()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        if name.endswith(".safetensors"):
            _check_safetensors(path, size)
            return "safetensors"
        if name.endswith((".h5", ".hdf5")):
            if not head.startswith(b"\x89HDF\r\n\x1a\n"):
                raise ValueError("no HDF5 signature")
            return "hdf5"
        if name.endswith(".npz"):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"member {bad!r} fails its CRC check (corrupt or cut off)")
            return "npz"
        if head.startswith(b"PK"):
            if not zipfile.is_zipfile(path):
                raise ValueError("a zip archive without its central directory (cut off?)")
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) == 1 and not infos[0].filename.endswith("data.pkl"):
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad!r} fails its CRC check (corrupt or cut off)")
                return "zip-archive"
            _check_torch_zip(path)
            return "torch"
        if head.startswith(b"\x80"):
            _check_legacy_pickle(path)
            return "torch-legacy"
        if name.endswith(_TORCH_EXT + (".zip",)) or "." not in name:
            raise ValueError("neither a torch.save zip nor a legacy torch pickle")
        # another extension with a safetensors body (e.g. a bare url): accept it if it parses
        _check_safetensors(path, size)
        return "safetensors"
    except (ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsFormatError(
            f"{path} is not a valid weights file: {e}; it holds {_describe_head(head)} ({size} bytes)") from None


# ----------------------------------------------------------------------------------------------
# url downloads (torch.hub)

def _offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def url_cache_dir(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder that caches ``url``: ``<torch.hub dir>/checkpoints/zoo/<sha256(url)[:16]>``.

    Keyed by the whole url, so two urls with one basename (``.../v1/model.pth`` and
    ``.../v2/model.pth``) never share a file; the file inside keeps the url's basename.
    """
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return root / "zoo" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(folder: Path, max_age_s: float = 24 * 3600.0) -> None:
    """Remove temporaries of downloads whose process is gone (or, without a pid, a day old)."""
    import time
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not (p.name.endswith(".partial") or _TMP_TAG in p.name):
            continue
        m = re.search(re.escape(_TMP_TAG) + r"(\d+)\.", p.name)
        try:
            stale = (not _pid_alive(int(m.group(1)))) if m else (time.time() - p.stat().st_mtime > max_age_s)
            if stale:
                p.unlink()
                _logger.info(f"removed the leftover of an interrupted download: {p}")
        except FileNotFoundError:
            pass


def _cached_file(folder: Path) -> Optional[Path]:
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return files[0] if len(files) == 1 else None


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if old is None:
            socket.setdefaulttimeout(None)


def _local_file_hint(model_name: Optional[str], name: str) -> str:
    model = repr(model_name) if model_name else "'<model>'"
    return (f"With a good copy of the file, pass it: timm.create_model({model}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='/path/to/{name}'))")


def _unpack_single(archive: Path, folder: Path, tmp_prefix: str) -> Tuple[Path, Path]:
    """Extract the one file of ``archive`` into a temporary in ``folder``; (tmp path, final path)."""
    with zipfile.ZipFile(archive) as zf:
        (info,) = [i for i in zf.infolist() if not i.is_dir()]
        member = os.path.basename(info.filename)
        if not member or member.startswith("."):
            raise WeightsFormatError(f"{archive}: the archive member {info.filename!r} has no usable name")
        tmp = folder / f"{tmp_prefix}{member}"
        with zf.open(info) as src, open(tmp, "xb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                dst.write(chunk)
    return tmp, folder / member


def download(
        url: str,
        sha256: Optional[str] = None,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        progress: bool = True,
        filename: Optional[str] = None,
        model_name: Optional[str] = None,
) -> Path:
    """Fetch ``url`` with ``torch.hub.download_url_to_file`` into :func:`url_cache_dir` and return
    the weights file (for a single-file zip archive: the file inside it).

    A cached file is reused without the network (its sha256 re-checked when one is known). A
    download goes to a temporary file, is checked against the torch.hub hash prefix of its name,
    ``sha256`` and its format (:func:`validate_weights_file`), and only then renamed into place.
    With ``HF_HUB_OFFLINE=1`` a cold cache fails at once. ``model_name`` only sharpens messages.
    """
    sha256 = _check_sha256(sha256, f"download({url!r})")
    name = filename or _url_basename(url) or "weights"
    if name in (".", "..") or "/" in name:
        raise ValueError(f"cannot derive a cache file name from url {url!r}; pass filename=")
    folder = url_cache_dir(url, cache_dir)
    _clean_stale(folder)
    cached = _cached_file(folder)
    if cached is not None:
        if sha256 is None or name.lower().endswith(".zip") or file_sha256(cached) == sha256:
            return cached
        _logger.warning(f"cached {cached} does not have sha256 {sha256}; removing it and downloading again")
        cached.unlink()
    hint = f"(cache: {folder / name}) " + _local_file_hint(model_name, name)
    if _offline():
        raise WeightsUnreachableError(
            f"offline (HF_HUB_OFFLINE is set) and {url} is not cached in {folder}. Fetch it with network "
            f"access, or unset HF_HUB_OFFLINE. {hint}", url)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{name}{_TMP_TAG}{os.getpid()}.{uuid.uuid4().hex[:8]}."
    staged = folder / f"{tmp_prefix}download"
    extracted = None
    prefix = hash_prefix(name)
    try:
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(staged), hash_prefix=prefix, progress=progress)
        except urllib.error.HTTPError as e:
            raise WeightsHTTPError(f"HTTP {e.code} {e.reason} for {url}. {hint}", url, e.code) from None
        except urllib.error.URLError as e:
            raise WeightsUnreachableError(
                f"cannot reach {url} ({e.reason}); offline or the server is down? {hint}", url) from None
        except RuntimeError as e:
            if "invalid hash value" not in str(e):
                raise
            raise WeightsHashMismatchError(
                f"{url}: the file name promises a sha256 starting {prefix} but the download's is different "
                f"({e}); the file was discarded. Retry, or check for a proxy rewriting downloads. {hint}",
                url) from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise WeightsTruncatedError(f"download of {url} broke off ({e!r}); nothing was cached. Retry. {hint}",
                                        url) from None
        if sha256 is not None:
            got = file_sha256(staged)
            if got != sha256:
                raise WeightsHashMismatchError(
                    f"sha256 mismatch for {url}: expected {sha256}, got {got}; the file was discarded. If upstream "
                    f"replaced the file, update the cfg's sha256; otherwise retry. {hint}", url)
        try:
            fmt = validate_weights_file(staged, name)
        except WeightsFormatError as e:
            raise WeightsFormatError(
                f"download of {url} for {folder / name} is not a valid weights file: "
                f"{str(e).split(': ', 1)[1]}; nothing was cached. {hint}", url) from None
        final = folder / name
        if fmt == "zip-archive":
            extracted, final = _unpack_single(staged, folder, tmp_prefix)
            try:
                validate_weights_file(extracted, final.name)
            except WeightsFormatError as e:
                raise WeightsFormatError(f"the file inside {url}: {e}; nothing was cached", url) from None
            os.replace(extracted, final)
            staged.unlink()
        else:
            os.replace(staged, final)
    except BaseException:
        for p in (staged, extracted):
            if p is not None:
                p.unlink(missing_ok=True)
        raise
    if sha256 is None:
        _logger.info(f"downloaded {url} to {final} ({'hash prefix checked' if prefix else 'no published hash'})")
    return final


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub (huggingface_hub)

def hf_download(repo_id: str, filename: Optional[str] = None, *, sha256: Optional[str] = None,
                cache_dir: Optional[Union[str, os.PathLike]] = None, model_name: Optional[str] = None) -> Path:
    """``huggingface_hub.hf_hub_download`` of ``repo_id`` (``org/name`` or ``org/name@revision``),
    then the format (and sha256, when known) check. Without ``filename``: ``model.safetensors``,
    else ``pytorch_model.bin``, as timm looks them up."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = repo_id.partition("@")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    last: Optional[Exception] = None
    for name in names:
        try:
            path = Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir))
        except LocalEntryNotFoundError as e:
            where = cache_dir or constants.HF_HUB_CACHE
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
            raise WeightsUnreachableError(
                f"{repo}/{name} is not in the Hugging Face cache ({where}) and {why}. Download it with network "
                f"access (HF_ENDPOINT selects a mirror), or pass a local copy with "
                f"pretrained_cfg_overlay=dict(file=...).", f"hf://{repo}/{name}") from e
        except EntryNotFoundError as e:
            last = e
            continue
        except RepositoryNotFoundError as e:
            raise WeightsHTTPError(f"Hugging Face repo {repo!r} not found at {constants.ENDPOINT}: {e}",
                                   f"hf://{repo}", 404) from None
        if sha256 is not None and file_sha256(path) != sha256:
            raise WeightsHashMismatchError(
                f"{path} (hf://{repo}/{name}) does not have the cfg's sha256 {sha256}. Delete it from the cache "
                f"(huggingface-cli delete-cache) and download again.", f"hf://{repo}/{name}")
        try:
            validate_weights_file(path, name)
        except WeightsFormatError:
            # keep the bad bytes out of the cache: drop the blob and its snapshot link
            blob = path.resolve()
            path.unlink(missing_ok=True)
            if blob != path:
                blob.unlink(missing_ok=True)
            raise
        return path
    raise WeightsHTTPError(f"Hugging Face repo {repo!r} has none of {', '.join(names)}: {last}",
                           f"hf://{repo}", 404)


def fetch_weights(pretrained_cfg: Dict[str, Any], *, cache_dir=None, model_name: Optional[str] = None,
                  sha256: Optional[str] = None, progress: bool = True) -> Optional[Path]:
    """Local path of a cfg's weights (downloading them if needed), or None when timm loads them
    itself (``file`` / ``state_dict`` / ``hf-hub:`` / ``local-dir:`` sources)."""
    kind, loc = weights_source(pretrained_cfg)
    if kind == "url":
        url, fname = (loc[0], loc[1]) if isinstance(loc, (tuple, list)) else (loc, None)
        return download(url, sha256 or expected_sha256(url), cache_dir=cache_dir, filename=fname,
                        model_name=model_name, progress=progress)
    if kind == "hf-hub":
        repo, fname = loc
        return hf_download(repo, fname, sha256=sha256 or KNOWN_SHA256.get(_hf_key(repo, fname)),
                           cache_dir=cache_dir, model_name=model_name)
    return None


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

    Weights come from :func:`fetch_weights` (huggingface_hub or torch.hub, validated) and are
    handed to timm as a local file. ``pretrained_cfg_overlay`` may carry ``sha256=`` for a mirror
    ``url=``. With ``pretrained_strict`` (default) the filtered state dict must match the model's
    keys and shapes; a classifier that does not fit is an error, unless ``num_classes`` differs
    from a registry tag's (timm's fine-tuning idiom) or ``pretrained_head='reset'``: the head then
    starts from its initial values and the keys are logged. A head that fits is always loaded.
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
