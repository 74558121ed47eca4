"""Pretrained weights through huggingface_hub and torch.hub, with the checks neither does.

Files on the Hugging Face Hub (cfg ``hf_hub_id``) come through ``huggingface_hub.hf_hub_download``
(its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``); other urls through ``torch.hub.download_url_to_file``
(``TORCH_HOME``, hash prefix of ``name-<hex>.pth``), kept offline by ``HF_HUB_OFFLINE=1`` too. Added
here: a full sha256 check where a cfg records one (:func:`cfg`); a download enters the cache under
its final name only after it parses as the format it claims (a single-file zip is unpacked, as
torch.hub does) and matches its hash; errors that name the cache path and never advise unsafe
unpickling. Strict loading of keys, shapes and heads is ``zoo.models._builder``.
"""
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import struct
import time
import urllib.error
import urllib.parse
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = [
    "KNOWN_SHA256", "SHA256_UNKNOWN_NOTE", "cfg", "weights_source", "verification", "fetch_weights", "download",
    "hf_download", "url_cache_dir", "file_sha256", "validate_weights_file", "WeightsDownloadError",
    "WeightsUnreachableError", "WeightsHTTPError", "WeightsHashMismatchError", "WeightsFormatError"]

_logger = logging.getLogger(__name__)

# url (or "hf://<repo>/<file>") -> sha256 hex digest of the file bytes, or None when none is known.
KNOWN_SHA256: Dict[str, Optional[str]] = {}

SHA256_UNKNOWN_NOTE = "no sha256 published: the file's format, keys and shapes are checked on load"
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole file
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_PREFIX_RE = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's rule, at least 8 hex digits
_TORCH_EXT = (".pth", ".pt", ".pth.tar", ".tar", ".bin", ".ckpt", ".zip")
_TMP_TAG = ".zoo-dl."


class WeightsDownloadError(RuntimeError):
    """Weights could not be fetched (e.g. the download broke off) or failed a check; none is cached."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url


class WeightsUnreachableError(WeightsDownloadError):
    """No connection (offline mode, DNS, refused, timeout) and no cached copy."""


class WeightsHTTPError(WeightsDownloadError):
    """The server answered with an HTTP error ``status`` (404, 403, 500 ...)."""

    def __init__(self, message: str, url: str = "", status: int = 0):
        super().__init__(message, url)
        self.status = status


class WeightsHashMismatchError(WeightsDownloadError):
    """The bytes do not have the sha256 (or torch.hub hash prefix) the cfg or file name promises."""


class WeightsFormatError(WeightsDownloadError):
    """The bytes are not the weights format they claim to be (an HTML page, a cut-off file ...)."""


# ----------------------------------------------------------------------------------------------
# cfg metadata

def _check_sha256(sha256: Optional[str], what: str) -> Optional[str]:
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower())):
        raise ValueError(f"{what}: sha256 must be the 64 hex digit sha256 of the file bytes or None, got {sha256!r}")
    return sha256 if sha256 is None else sha256.lower()


def _url_and_name(url) -> Tuple[str, str]:
    """timm's cfg ``url`` (a string or a ``(url, filename)`` pair) as (url, file name)."""
    url, name = url if isinstance(url, (tuple, list)) else (url or "", None)
    return url, name or os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))


def _source_key(kind: str, loc) -> Optional[str]:
    """The :data:`KNOWN_SHA256` key of a :func:`weights_source` result."""
    if kind == "url":
        return _url_and_name(loc)[0]
    if kind == "hf-hub":
        return f"hf://{loc[0]}/{loc[1] or 'model.safetensors'}"
    return None


def hash_prefix(name: str) -> Optional[str]:
    """The torch.hub sha256 prefix a file name carries (``resnet18-5c106cde.pth`` -> ``5c106cde``)."""
    m = _HASH_PREFIX_RE.search(name or "")
    return m.group(1) if m else None


def cfg(url: Union[str, Tuple[str, str]] = "", *, sha256: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """A timm pretrained cfg dict. ``sha256`` (of the file its :func:`weights_source` serves) is kept
    in :data:`KNOWN_SHA256`, as timm's cfg has no such field; without one, ``notes`` say so."""
    url_s, hf_id = _url_and_name(url)[0], kwargs.get("hf_hub_id")
    if url_s and urllib.parse.urlparse(url_s).scheme not in ("http", "https", "file"):
        raise ValueError(f"cfg url must be http(s):// or file://, got {url_s!r}")
    sha256 = _check_sha256(sha256, f"cfg(url={url_s!r}, hf_hub_id={hf_id!r})")
    if not (url_s or hf_id):
        if sha256 is not None:
            raise ValueError("cfg: sha256 given without a url or hf_hub_id")
        return dict(url=url, **kwargs)
    key = _source_key(*weights_source(dict(url=url, **kwargs)))
    if key is not None:
        if KNOWN_SHA256.get(key) is not None and sha256 is not None and KNOWN_SHA256[key] != sha256:
            raise ValueError(f"conflicting sha256 for {key}: {KNOWN_SHA256[key]} vs {sha256}")
        if sha256 is not None or key not in KNOWN_SHA256:
            KNOWN_SHA256[key] = sha256
    if sha256 is None:
        notes = tuple(kwargs.pop("notes", None) or ())
        kwargs["notes"] = notes + (() if SHA256_UNKNOWN_NOTE in notes else (SHA256_UNKNOWN_NOTE,))
    return dict(url=url, **kwargs)


def weights_source(pretrained_cfg: Dict[str, Any]) -> Tuple[str, Any]:
    """Where a cfg's weights come from, ``(kind, location)``, in this order: ``timm`` (``hf-hub:`` /
    ``local-dir:``, timm loads them), ``state_dict``, ``file``, a ``url`` whose bytes can be verified
    (recorded sha256, hash-prefixed name), ``hf-hub`` ``(repo, filename)``, any ``url``; else ``("", None)``.
    """
    c = pretrained_cfg
    if c.get("source") in ("hf-hub", "local-dir"):
        return "timm", None
    if c.get("state_dict"):
        return "state_dict", c["state_dict"]
    if c.get("file"):
        return "file", c["file"]
    url = c.get("url")
    url_s, name = _url_and_name(url)
    if url_s and (KNOWN_SHA256.get(url_s) or hash_prefix(name)):
        return "url", url
    if c.get("hf_hub_id"):
        return "hf-hub", (c["hf_hub_id"], c.get("hf_hub_filename"))
    return ("url", url) if url_s else ("", None)


def verification(pretrained_cfg: Dict[str, Any]) -> str:
    """What is checked of the bytes of a cfg's weights: ``verified`` (full sha256),
    ``hash-prefix-checked`` (torch.hub's file-name prefix) or ``unverified`` (format, keys and
    shapes only); ``""`` for a cfg without weights to fetch."""
    kind, loc = weights_source(pretrained_cfg)
    if kind not in ("url", "hf-hub"):
        return ""
    if KNOWN_SHA256.get(_source_key(kind, loc)):
        return "verified"
    return "hash-prefix-checked" if kind == "url" and hash_prefix(_url_and_name(loc)[1]) else "unverified"


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
    return f"bytes starting {head[:16]!r}" if head else "an empty file"


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


def _check_zip_crc(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
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
    """The format ``path`` parses as, if it is the one its ``name`` (default: its own) claims:
    ``safetensors``, ``torch`` (zip), ``torch-legacy``, ``zip-archive`` (a zip holding one file, as
    torch.hub unpacks), ``npz`` or ``hdf5``. Else :class:`WeightsFormatError`, saying what it holds."""
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
            _check_zip_crc(path)
            return "npz"
        if head.startswith(b"PK"):
            if not zipfile.is_zipfile(path):
                raise ValueError("a zip archive without its central directory (cut off?)")
            with zipfile.ZipFile(path) as zf:
                files = [i.filename for i in zf.infolist() if not i.is_dir()]
            single = len(files) == 1 and not files[0].endswith("data.pkl")
            if not single and not any(n.endswith("data.pkl") for n in files):
                raise ValueError("a zip archive without data.pkl: not a torch.save file")
            _check_zip_crc(path)
            return "zip-archive" if single else "torch"
        if head.startswith(b"\x80"):
            _check_legacy_pickle(path)
            return "torch-legacy"
        if name.endswith(_TORCH_EXT) or "." not in name:
            raise ValueError("neither a torch.save zip nor a legacy torch pickle")
        _check_safetensors(path, size)  # another extension (e.g. a bare url): accepted if it parses
        return "safetensors"
    except (ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsFormatError(
            f"{path} is not a valid weights file: {e}; it holds {_describe_head(head)} ({size} bytes)") from None


# ----------------------------------------------------------------------------------------------
# url downloads (torch.hub)

def url_cache_dir(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``<torch.hub dir>/checkpoints/zoo/<sha256(url)[:16]>``: keyed by the whole url, so two urls
    with one basename never share a file; the file inside keeps the url's basename."""
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return root / "zoo" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError as e:  # PermissionError: alive, another user's process
        return not isinstance(e, ProcessLookupError)


def _clean_stale(folder: Path, max_age_s: float = 24 * 3600.0) -> None:
    """Remove temporaries of downloads whose process is gone (without a pid in the name: a day old),
    which torch.hub leaves behind when a process is killed mid-download."""
    for p in folder.iterdir() if folder.is_dir() else ():
        if not (p.name.endswith(".partial") or _TMP_TAG in p.name):
            continue
        m = re.search(re.escape(_TMP_TAG) + r"(\d+)\.", p.name)
        try:
            if (not _pid_alive(int(m.group(1)))) if m else (time.time() - p.stat().st_mtime > max_age_s):
                p.unlink()
                _logger.info(f"removed the leftover of an interrupted download: {p}")
        except FileNotFoundError:
            pass


def _cached_file(folder: Path) -> Optional[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")] if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


@contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's urlopen has no timeout: bound each socket operation unless one is set already."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if old is None else old)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def download(url: str, sha256: Optional[str] = None, *, cache_dir: Optional[Union[str, os.PathLike]] = None,
             progress: bool = True, filename: Optional[str] = None, model_name: Optional[str] = None) -> Path:
    """Fetch ``url`` with ``torch.hub.download_url_to_file`` into :func:`url_cache_dir`; return the
    weights file (of a single-file zip: the file inside). A cached file is reused without the network
    (``sha256`` re-checked); a download is staged under a hidden name, checked (hash prefix,
    ``sha256``, :func:`validate_weights_file`), then renamed into place. ``model_name`` is for messages.
    """
    sha256 = _check_sha256(sha256, f"download({url!r})")
    name = filename or _url_and_name(url)[1] or "weights"
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
    model = repr(model_name) if model_name else "'<model>'"
    hint = (f"(cache: {folder / name}) With a good copy of the file, pass it: timm.create_model({model}, "
            f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/{name}'))")
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnreachableError(
            f"offline (HF_HUB_OFFLINE is set) and {url} is not cached in {folder}. Fetch it with network "
            f"access, or unset HF_HUB_OFFLINE. {hint}", url)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{name}{_TMP_TAG}{os.getpid()}.{uuid.uuid4().hex[:8]}."
    staged, extracted, prefix = folder / f"{tmp_prefix}download", None, hash_prefix(name)
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
            raise WeightsDownloadError(f"download of {url} broke off ({e!r}); nothing was cached. Retry. {hint}",
                                       url) from None
        if sha256 is not None and (got := file_sha256(staged)) != sha256:
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
        if fmt == "zip-archive":  # unpack the one file into a temporary, check it, move it into place
            with zipfile.ZipFile(staged) as zf:
                (info,) = [i for i in zf.infolist() if not i.is_dir()]
                member = os.path.basename(info.filename)
                if not member or member.startswith("."):
                    raise WeightsFormatError(f"{url}: the archive member {info.filename!r} has no usable name", url)
                extracted, final = folder / f"{tmp_prefix}{member}", folder / member
                with zf.open(info) as src, open(extracted, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            try:
                validate_weights_file(extracted, final.name)
            except WeightsFormatError as e:
                raise WeightsFormatError(f"the file inside {url}: {e}; nothing was cached", url) from None
            os.replace(extracted, final)
            staged.unlink()
        else:
            os.replace(staged, final)
    except BaseException:
        for p in filter(None, (staged, extracted)):
            p.unlink(missing_ok=True)
        raise
    if sha256 is None:
        _logger.info(f"downloaded {url} to {final} ({'hash prefix checked' if prefix else 'no published hash'})")
    return final


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub (huggingface_hub)

def hf_download(repo_id: str, filename: Optional[str] = None, *, sha256: Optional[str] = None,
                cache_dir: Optional[Union[str, os.PathLike]] = None, model_name: Optional[str] = None) -> Path:
    """``huggingface_hub.hf_hub_download`` of ``repo_id`` (``org/name[@revision]``), then the sha256 and
    format checks; without ``filename``: ``model.safetensors``, else ``pytorch_model.bin``, as timm."""
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
            for p in (path.resolve(), path):  # keep the bad bytes out of the cache: the blob and its link
                p.unlink(missing_ok=True)
            raise
        return path
    raise WeightsHTTPError(f"Hugging Face repo {repo!r} has none of {', '.join(names)}: {last}",
                           f"hf://{repo}", 404)


def fetch_weights(pretrained_cfg: Dict[str, Any], *, cache_dir=None, model_name: Optional[str] = None,
                  sha256: Optional[str] = None, progress: bool = True) -> Optional[Path]:
    """Local path of a cfg's weights (downloaded if needed), or None when timm loads them itself
    (``file`` / ``state_dict`` / ``hf-hub:`` / ``local-dir:`` sources)."""
    kind, loc = weights_source(pretrained_cfg)
    if kind == "url":
        url, name = _url_and_name(loc)
        return download(url, sha256 or KNOWN_SHA256.get(url), cache_dir=cache_dir, filename=name,
                        model_name=model_name, progress=progress)
    if kind == "hf-hub":
        return hf_download(*loc, sha256=sha256 or KNOWN_SHA256.get(_source_key(kind, loc)),
                           cache_dir=cache_dir, model_name=model_name)
    return None
