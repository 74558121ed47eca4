"""zoo.hub (downloads through torch.hub / huggingface_hub, cache validation), zoo.models._builder
(strict loading) and tools/convert_weights.py, against real HTTP servers on 127.0.0.1 started here (a plain file server
and a Hugging Face Hub endpoint stand-in); nothing touches the network."""
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import zoo
import zoo.hub as hub
from zoo.hub import WeightsFormatError, WeightsHashMismatchError, WeightsHTTPError, WeightsUnreachableError, download
from zoo.models._builder import PretrainedMismatchError, PretrainedTagError

import _tinynet

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------------------------
# local servers

class _Handler(http.server.BaseHTTPRequestHandler):
    def _route(self):
        srv = self.server
        srv.hits[self.path] += 1
        return srv.routes.get(self.path)

    def _headers(self, body, length):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length != "none":
            self.send_header("Content-Length", str(len(body) if length is None else length))
        if self.server.hf:
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.end_headers()

    def do_HEAD(self):
        route = self._route()
        if route is None:
            self.send_error(404, "Not Found")
            return
        self._headers(*route)

    def do_GET(self):
        route = self._route()
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, length = route
        self._headers(body, length)
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class Server:
    """http.server in a thread on an ephemeral port. ``routes[path] = (body, content_length)``: a
    content_length larger than the body makes a truncated response, ``"none"`` sends no length.
    ``hf=True`` adds the headers a Hugging Face Hub endpoint sends (commit, etag)."""

    def __init__(self, hf: bool = False):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes = {}
        self.httpd.hits = Counter()
        self.httpd.hf = hf
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()
        self.running = True

    @property
    def routes(self):
        return self.httpd.routes

    @property
    def hits(self):
        return self.httpd.hits

    def add(self, path: str, body: bytes, content_length=None) -> str:
        self.routes[path] = (body, content_length)
        return self.base + path

    def add_hf(self, repo: str, filename: str, body: bytes) -> None:
        self.add(f"/{repo}/resolve/main/{filename}", body)

    def stop(self):
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.running = False


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _torch_home(tmp_path, monkeypatch):
    """Every test gets its own torch.hub cache, so nothing leaks between tests or from the user."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; these servers are local


@pytest.fixture
def hf_hub(tmp_path, monkeypatch):
    """A Hub endpoint stand-in and an empty Hugging Face cache, as HF_ENDPOINT / HF_HUB_CACHE set them."""
    from huggingface_hub import constants
    s = Server(hf=True)
    monkeypatch.setattr(constants, "ENDPOINT", s.base)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", s.base + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield s
    s.stop()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tree(d: Path):
    """Every file under d, hidden temporaries included, relative to d."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.exists() else []


def _pth_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_bytes(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
    return buf.getvalue()


GOOD = _pth_bytes({"w": torch.arange(300_000, dtype=torch.float32)})  # ~1.2 MB: several read chunks
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>" * 20
UNSAFE_ADVICE = "weights_only=False"


# ----------------------------------------------------------------------------------------------
# download(): torch.hub's downloader + validation

def test_download_good_then_cache_hit_with_server_down(server, tmp_path):
    url = server.add("/w/good.pth", GOOD)
    path = download(url, sha(GOOD), progress=False)
    assert path == hub.url_cache_dir(url) / "good.pth"
    assert path.is_relative_to(Path(torch.hub.get_dir()) / "checkpoints") and path.read_bytes() == GOOD
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    server.stop()
    assert download(url, sha(GOOD)) == path  # no network: the server is gone
    assert download(url, None) == path
    assert server.hits["/w/good.pth"] == 1
    assert tree(path.parent) == ["good.pth"]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("case", ["html", "truncated", "truncated_no_length", "random"])
def test_bad_bodies_never_enter_the_cache(server, tmp_path, case):
    body, length, name = {
        "html": (HTML, None, "model.pth"),
        "truncated": (GOOD[:400_000], len(GOOD), "model.pth"),
        "truncated_no_length": (GOOD[:400_000], "none", "model.pth"),
        "random": (os.urandom(5000), None, "model.pth.tar"),
    }[case]
    url = server.add(f"/w/{case}/{name}", body, content_length=length)
    with pytest.raises(hub.WeightsDownloadError) as e:
        download(url, None, cache_dir=tmp_path, model_name="zoo_test_tinynet.x")
    msg = str(e.value)
    assert url in msg and str(hub.url_cache_dir(url, tmp_path) / name) in msg
    assert UNSAFE_ADVICE not in msg and "pretrained_cfg_overlay=dict(file=" in msg
    if case == "html":
        assert isinstance(e.value, WeightsFormatError) and "HTML" in msg
    assert tree(tmp_path) == []  # nothing under the final name, no temporaries
    # once the server is fixed, the same url downloads fine: nothing was poisoned
    server.add(f"/w/{case}/{name}", GOOD)
    assert download(url, None, cache_dir=tmp_path).read_bytes() == GOOD


def test_same_basename_different_urls_get_their_own_files(server, tmp_path):
    v1, v2 = _pth_bytes({"v": torch.ones(3)}), _pth_bytes({"v": torch.zeros(5)})
    u1, u2 = server.add("/v1/model_best.pth", v1), server.add("/v2/model_best.pth", v2)
    p1, p2 = download(u1, cache_dir=tmp_path), download(u2, cache_dir=tmp_path)
    assert p1 != p2 and p1.name == p2.name == "model_best.pth"
    assert p1.read_bytes() == v1 and p2.read_bytes() == v2
    assert download(u2, cache_dir=tmp_path).read_bytes() == v2


def test_hash_prefixed_filename_is_checked(server, tmp_path):
    good_name = f"tiny-{sha(GOOD)[:8]}.pth"
    other = _pth_bytes({"w": torch.zeros(3)})
    bad = server.add(f"/bad/{good_name}", other)
    with pytest.raises(WeightsHashMismatchError) as e:
        download(bad, None, cache_dir=tmp_path)
    assert sha(GOOD)[:8] in str(e.value) and sha(other) in str(e.value) and UNSAFE_ADVICE not in str(e.value)
    assert tree(tmp_path) == []
    ok = server.add(f"/ok/{good_name}", GOOD)
    assert download(ok, None, cache_dir=tmp_path).read_bytes() == GOOD


def test_full_sha256_mismatch_and_corrupt_cached_copy(server, tmp_path):
    url = server.add("/w/a.pth", GOOD)
    with pytest.raises(WeightsHashMismatchError) as e:
        download(url, sha(b"something else"), cache_dir=tmp_path)
    assert sha(GOOD) in str(e.value) and tree(tmp_path) == []
    path = download(url, sha(GOOD), cache_dir=tmp_path)
    path.write_bytes(GOOD[:-1] + b"\0")  # bit rot in the cache
    assert download(url, sha(GOOD), cache_dir=tmp_path).read_bytes() == GOOD  # re-fetched


def test_single_file_zip_archive_is_unpacked(server, tmp_path):
    url = server.add("/rel/model_12ep.zip", _zip_bytes("model_12ep.pth", GOOD))
    path = download(url, None, cache_dir=tmp_path)
    assert path.name == "model_12ep.pth" and path.read_bytes() == GOOD
    assert tree(path.parent) == ["model_12ep.pth"]  # the archive itself is not kept
    server.stop()
    assert download(url, None, cache_dir=tmp_path) == path
    # an archive holding something that is not weights is refused
    s = Server()
    try:
        bad = s.add("/rel/bad.zip", _zip_bytes("readme.pth", b"not weights"))
        with pytest.raises(WeightsFormatError, match="inside"):
            download(bad, None, cache_dir=tmp_path / "b")
        assert tree(tmp_path / "b") == []
    finally:
        s.stop()


def test_stale_partials_are_cleaned_up(server, tmp_path):
    url = server.add("/w/stale.pth", GOOD)
    folder = hub.url_cache_dir(url, tmp_path)
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left_by_dead = folder / f".stale.pth.zoo-dl.{dead.pid}.1a2b3c4d.download.0f0f.partial"
    left_by_dead.write_bytes(GOOD[:100])
    old_torch_partial = folder / "stale.pth.deadbeef.partial"
    old_torch_partial.write_bytes(b"x")
    os.utime(old_torch_partial, (time.time() - 3 * 86400,) * 2)
    ours_running = folder / f".stale.pth.zoo-dl.{os.getpid()}.99999999.download"
    ours_running.write_bytes(b"in flight")  # a live process's download is left alone
    path = download(url, None, cache_dir=tmp_path)
    assert tree(folder) == sorted([ours_running.name, "stale.pth"])
    assert path.read_bytes() == GOOD


def test_http_errors_and_server_down(server, tmp_path):
    with pytest.raises(WeightsHTTPError) as e:
        download(server.base + "/w/missing.pth", None, cache_dir=tmp_path)
    assert e.value.status == 404
    url = server.add("/w/down.pth", GOOD)
    server.stop()
    with pytest.raises(WeightsUnreachableError) as e:
        download(url, None, cache_dir=tmp_path, model_name="some_model.tag")
    assert url in str(e.value) and "some_model.tag" in str(e.value)
    assert tree(tmp_path) == []


def test_url_download_honours_hf_hub_offline(server, tmp_path, monkeypatch):
    from huggingface_hub import constants
    url = server.add("/w/off.pth", GOOD)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnreachableError, match="HF_HUB_OFFLINE") as e:
        download(url, None, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 5 and str(hub.url_cache_dir(url, tmp_path)) in str(e.value)
    assert server.hits["/w/off.pth"] == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path = download(url, None, cache_dir=tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download(url, None, cache_dir=tmp_path) == path  # warm cache works offline


def test_validate_weights_file_formats(tmp_path):
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.ones(4)}, str(st))
    assert hub.validate_weights_file(st) == "safetensors"
    st.write_bytes(st.read_bytes()[:-3])
    with pytest.raises(WeightsFormatError, match="cut off"):
        hub.validate_weights_file(st)
    legacy = tmp_path / "old.pth"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert hub.validate_weights_file(legacy) == "torch-legacy"
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert hub.validate_weights_file(h5) == "hdf5"
    h5.write_bytes(HTML)
    with pytest.raises(WeightsFormatError, match="HTML"):
        hub.validate_weights_file(h5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="64 hex"):
        download("http://127.0.0.1:9/x.pth", "deadbeef")
    with pytest.raises(ValueError, match="http"):
        hub.cfg(url="ftp://example.invalid/x.pth")
    with pytest.raises(ValueError, match="without a url"):
        hub.cfg(sha256="0" * 64)


def test_cfg_records_sha256_and_verification_levels():
    known = hub.cfg(url="https://example.invalid/a-1.pth", sha256="A" * 64, license="mit")
    assert hub.KNOWN_SHA256["https://example.invalid/a-1.pth"] == "a" * 64
    assert "sha256" not in known and not known.get("notes")
    assert hub.verification(known) == "verified"
    unknown = hub.cfg(url="https://example.invalid/b.pth", license="mit", notes=("x",))
    assert unknown["notes"] == ("x", hub.SHA256_UNKNOWN_NOTE) and hub.verification(unknown) == "unverified"
    with pytest.raises(ValueError, match="conflicting"):
        hub.cfg(url="https://example.invalid/a-1.pth", sha256="b" * 64)
    prefixed = hub.cfg(url="https://example.invalid/r-3083328c.pth", hf_hub_id="org/r")
    assert hub.verification(prefixed) == "hash-prefix-checked"
    assert hub.weights_source(prefixed)[0] == "url"  # the checkable source wins over the hub copy
    hf_only = hub.cfg(hf_hub_id="org/x")
    assert hub.weights_source(hf_only) == ("hf-hub", ("org/x", None)) and hub.verification(hf_only) == "unverified"
    assert hub.verification(hub.cfg(license="mit")) == ""


# ----------------------------------------------------------------------------------------------
# create_model(..., pretrained=True) through zoo.models._builder.build_model

@pytest.fixture(scope="module")
def tiny():
    """zoo_test_tinynet registered with tags whose urls point at a module-wide server."""
    s = Server()
    good = _pth_bytes({"state_dict": _tinynet.upstream_state_dict(0), "epoch": 3})
    wrong_keys = _pth_bytes({k + "_renamed": v for k, v in _tinynet.upstream_state_dict(1).items()})
    meta = dict(license="apache-2.0", paper_ids="arXiv:0000.00000", origin_url="https://example.invalid/tiny",
                input_size=(3, 16, 16), pool_size=(1, 1), first_conv="stem", classifier="fc", num_classes=10)
    _tinynet.register({
        "hashed": hub.cfg(url=s.add("/tiny/tiny_hashed.pth", good), sha256=sha(good), **meta),
        "nohash": hub.cfg(url=s.add("/tiny/tiny_nohash.pth", good), **meta),
        "badhash": hub.cfg(url=s.add("/tiny/tiny_badhash.pth", good), sha256=sha(b"other"), **meta),
        "wrongkeys": hub.cfg(url=s.add("/tiny/tiny_wrongkeys.pth", wrong_keys), **meta),
        "zip": hub.cfg(url=s.add("/tiny/tiny_4scale_12ep.zip", _zip_bytes("tiny_4scale_12ep.pth", good)), **meta),
        "prefixed": hub.cfg(url=s.add(f"/tiny/tiny-{sha(good)[:8]}.pth", _pth_bytes({"x": torch.ones(1)})),
                            hf_hub_id="zoo-test/tiny-prefixed", **meta),
        "hf": hub.cfg(hf_hub_id="zoo-test/tiny", **meta),
        "untrained": hub.cfg(**meta),
    })
    s.good = good
    yield s
    s.stop()


def _assert_weights(model, expected):
    sd = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k


def test_tiny_model_is_not_a_zoo_model(tiny):
    assert timm.is_model("zoo_test_tinynet")
    assert not any(n.startswith("zoo_test_tinynet") for n in zoo.list_models())


def test_pretrained_url_download_end_to_end(tiny, tmp_path):
    m = timm.create_model("zoo_test_tinynet.hashed", pretrained=True)
    _assert_weights(m, _tinynet.zoo_state_dict(0))
    assert "file" not in m.pretrained_cfg and m.pretrained_cfg["url"].endswith("tiny_hashed.pth")
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 10)

    hits = tiny.hits["/tiny/tiny_hashed.pth"]
    m2 = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, num_classes=3)  # cache hit, new head
    assert tiny.hits["/tiny/tiny_hashed.pth"] == hits
    assert m2.fc.weight.shape == (3, 8)
    _assert_weights(m2, {k: v for k, v in _tinynet.zoo_state_dict(0).items() if not k.startswith("fc.")})


def test_pretrained_zip_asset(tiny, tmp_path):
    m = timm.create_model("zoo_test_tinynet.zip", pretrained=True, cache_dir=tmp_path)
    _assert_weights(m, _tinynet.zoo_state_dict(0))
    assert [Path(p).name for p in tree(tmp_path)] == ["tiny_4scale_12ep.pth"]


def test_pretrained_hash_prefix_wrong_body_rejected(tiny, tmp_path):
    with pytest.raises(WeightsHashMismatchError):
        timm.create_model("zoo_test_tinynet.prefixed", pretrained=True, cache_dir=tmp_path)
    assert tree(tmp_path) == []


def test_pretrained_hash_mismatch_and_wrong_keys(tiny, tmp_path):
    with pytest.raises(WeightsHashMismatchError):
        timm.create_model("zoo_test_tinynet.badhash", pretrained=True, cache_dir=tmp_path)
    assert tree(tmp_path) == []
    # timm relaxes strict loading when num_classes changes; the hub's check still catches wrong keys
    for kw in ({}, dict(num_classes=3)):
        with pytest.raises(PretrainedMismatchError, match="missing keys: stem.weight"):
            timm.create_model("zoo_test_tinynet.wrongkeys", pretrained=True, cache_dir=tmp_path, **kw)


def test_unknown_tag_and_tag_without_weights(tiny):
    with pytest.raises(PretrainedTagError) as e:
        timm.create_model("zoo_test_tinynet.badtag")
    assert "'badtag'" in str(e.value) and "zoo_test_tinynet.hashed (weights)" in str(e.value)
    with pytest.raises(PretrainedTagError, match="no downloadable weights.*zoo_test_tinynet.hashed"):
        timm.create_model("zoo_test_tinynet.untrained", pretrained=True)
    timm.create_model("zoo_test_tinynet.untrained")  # fine without weights


def test_hf_hub_id_warm_cache_offline_and_cold_cache_offline(tiny, hf_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants
    sd = _tinynet.zoo_state_dict(5)
    hf_hub.add_hf("zoo-test/tiny", "model.safetensors", safetensors.torch.save(sd))
    m = timm.create_model("zoo_test_tinynet.hf", pretrained=True)
    _assert_weights(m, sd)
    assert m.pretrained_cfg["hf_hub_id"] == "zoo-test/tiny" and "file" not in m.pretrained_cfg
    assert any("models--zoo-test--tiny" in p for p in tree(tmp_path / "hf_cache"))
    hf_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_weights(timm.create_model("zoo_test_tinynet.hf", pretrained=True), sd)  # warm: no network needed
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cold"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnreachableError) as e:
        timm.create_model("zoo_test_tinynet.hf", pretrained=True)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "zoo-test/tiny/model.safetensors" in msg and "HF_HUB_OFFLINE" in msg and str(tmp_path / "cold") in msg


def test_hf_hub_bad_file_is_reported_with_its_cache_path(tiny, hf_hub):
    hf_hub.add_hf("zoo-test/tiny", "model.safetensors", HTML)
    with pytest.raises(WeightsFormatError) as e:
        timm.create_model("zoo_test_tinynet.hf", pretrained=True)
    assert "models--zoo-test--tiny" in str(e.value) and UNSAFE_ADVICE not in str(e.value)
    # the bad copy did not stay in the cache: a fixed server is asked again and its file loads
    sd = _tinynet.zoo_state_dict(7)
    hf_hub.add_hf("zoo-test/tiny", "model.safetensors", safetensors.torch.save(sd))
    _assert_weights(timm.create_model("zoo_test_tinynet.hf", pretrained=True), sd)


def test_hf_endpoint_and_offline_env_vars_in_a_fresh_process(tiny, hf_hub, tmp_path):
    """HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE as a user sets them: read by huggingface_hub at import."""
    sd = _tinynet.zoo_state_dict(6)
    hf_hub.add_hf("zoo-test/envtiny", "model.safetensors", safetensors.torch.save(sd))
    out = tmp_path / "out.safetensors"
    code = (
        "import sys, timm, safetensors.torch, zoo.hub as hub\n"
        "sys.path.insert(0, sys.argv[1]); import _tinynet\n"
        "_tinynet.register({'e': hub.cfg(hf_hub_id='zoo-test/envtiny', input_size=(3, 16, 16), num_classes=10,"
        " classifier='fc', first_conv='stem', license='mit')})\n"
        "m = timm.create_model('zoo_test_tinynet.e', pretrained=True)\n"
        "safetensors.torch.save_file(m.state_dict(), sys.argv[2])\n")
    env = dict(os.environ, HF_ENDPOINT=hf_hub.base, HF_HUB_CACHE=str(tmp_path / "hfc"), HF_HUB_OFFLINE="0",
               PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(out)], env=env, check=True, timeout=300)
    got = safetensors.torch.load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert hf_hub.hits["/zoo-test/envtiny/resolve/main/model.safetensors"] >= 1


def test_local_file_overlay_head_must_fit_unless_reset(tiny, tmp_path, caplog):
    upstream = tmp_path / "upstream.pth"
    torch.save({"model": _tinynet.upstream_state_dict(2)}, upstream)
    m = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, pretrained_cfg_overlay=dict(file=str(upstream)))
    _assert_weights(m, _tinynet.zoo_state_dict(2))

    # a fine-tuned 4-class export: its head is kept when the model is built with 4 classes
    four = {k: v for k, v in _tinynet.zoo_state_dict(3).items()}
    four["fc.weight"], four["fc.bias"] = torch.randn(4, 8), torch.randn(4)
    st = tmp_path / "ft4.safetensors"
    safetensors.torch.save_file(four, str(st))
    m = timm.create_model("zoo_test_tinynet", pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=str(st)))
    _assert_weights(m, four)
    # ... and a head that does not fit is an error, not a silent re-initialisation
    with pytest.raises(PretrainedMismatchError, match=r"fc.weight \(4, 8\) vs model \(10, 8\).*pretrained_head='reset'"):
        timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_cfg_overlay=dict(file=str(st)))
    with pytest.raises(PretrainedMismatchError, match="classifier"):
        timm.create_model("zoo_test_tinynet", pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(st)))
    # unless the user asks for a new head: logged with the keys left out
    with caplog.at_level("WARNING", logger="zoo.models._builder"):
        m = timm.create_model("zoo_test_tinynet", pretrained=True, num_classes=7, pretrained_head="reset",
                              pretrained_cfg_overlay=dict(file=str(st)))
    assert m.fc.weight.shape == (7, 8)
    _assert_weights(m, {k: v for k, v in four.items() if not k.startswith("fc.")})
    assert "head swapped" in caplog.text and "fc.bias, fc.weight" in caplog.text

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))
    with pytest.raises(ValueError, match="pretrained_head"):
        timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_head="keep",
                          pretrained_cfg_overlay=dict(file=str(st)))


class NotAWeight:  # a class a weights_only unpickler must refuse
    def __init__(self):
        self.x = 1


def _unsafe_checkpoint(path: Path):
    torch.save({"state_dict": _tinynet.upstream_state_dict(0), "extra": NotAWeight()}, path)


def test_unsafe_pickle_is_refused_by_the_pretrained_path(tiny, tmp_path):
    bad = tmp_path / "unsafe.pth"
    _unsafe_checkpoint(bad)
    with pytest.raises(RuntimeError, match="weights_only"):
        timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))


# ----------------------------------------------------------------------------------------------
# tools/convert_weights.py

@pytest.fixture(scope="module")
def convert_tool():
    from zoo.cli import convert
    return convert


def test_convert_round_trip(tiny, convert_tool, tmp_path):
    upstream = tmp_path / "upstream.pth"
    sd = {"module." + k: v.half() if v.is_floating_point() else v for k, v in _tinynet.upstream_state_dict(4).items()}
    torch.save({"state_dict_ema": sd, "optimizer": {"lr": 0.1}, "epoch": 7}, upstream)
    out_dir = tmp_path / "out"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = convert_tool.main(["zoo_test_tinynet.hashed", str(upstream), str(out_dir)])
    assert rc == 0
    lines = buf.getvalue().strip().splitlines()
    path, digest = Path(lines[-2]), lines[-1].split()[-1]
    assert path.parent == out_dir and path.name == f"zoo_test_tinynet.hashed-{digest[:8]}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert tree(out_dir) == [path.name]  # no temporaries left

    expected = {k: v.half() if v.is_floating_point() else v for k, v in _tinynet.zoo_state_dict(4).items()}
    written = safetensors.torch.load_file(str(path))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    m = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_weights(m, {k: v.float() if v.is_floating_point() else v for k, v in expected.items()})
    again, digest2 = convert_tool.convert("zoo_test_tinynet.hashed", upstream, out_dir, log=lambda *a: None)
    assert (again, digest2) == (path, digest)


def test_convert_refuses_unsafe_pickle(tiny, convert_tool, tmp_path, capsys):
    bad = tmp_path / "unsafe.pth"
    _unsafe_checkpoint(bad)
    with pytest.raises(convert_tool.ConversionError, match="weights_only=True") as e:
        convert_tool.convert("zoo_test_tinynet", bad, tmp_path / "out", log=lambda *a: None)
    assert UNSAFE_ADVICE not in str(e.value)
    assert convert_tool.main(["zoo_test_tinynet", str(bad), str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert tree(tmp_path / "out") == []


def test_convert_rejects_mismatched_checkpoint(tiny, convert_tool, tmp_path):
    sd = _tinynet.upstream_state_dict(0)
    del sd["features.1.running_var"]
    sd["features.0.weight"] = sd["features.0.weight"][:4]
    ckpt = tmp_path / "mismatch.pth"
    torch.save(sd, ckpt)
    with pytest.raises(convert_tool.ConversionError, match=r"missing keys: bn.running_var.*shape mismatches: stem.weight"):
        convert_tool.convert("zoo_test_tinynet", ckpt, tmp_path / "out", log=lambda *a: None)
    assert tree(tmp_path / "out") == []
    with pytest.raises(convert_tool.ConversionError, match="unknown model"):
        convert_tool.convert("no_such_model_xyz", ckpt, tmp_path / "out", log=lambda *a: None)


# ----------------------------------------------------------------------------------------------
# every zoo cfg with weights carries its provenance and an honest verification level

def test_zoo_pretrained_cfgs_carry_provenance():
    problems = []
    for name in zoo.list_models(pretrained=True):
        c = timm.get_pretrained_cfg(name)
        if not c.has_weights:
            continue
        d = c.to_dict()
        missing = [f for f in ("license", "origin_url") if not getattr(c, f)]
        if not (c.paper_ids or c.paper_name):
            missing.append("paper_ids")
        kind, loc = hub.weights_source(d)
        if kind not in ("url", "hf-hub"):
            missing.append(f"a url or hf_hub_id source (got {kind!r})")
        elif kind == "url" and "huggingface.co" in str(loc):
            missing.append("hf_hub_id for a file on the Hugging Face Hub")
        level = hub.verification(d)
        if level == "unverified" and hub.SHA256_UNKNOWN_NOTE not in (c.notes or ()):
            missing.append("note that no sha256 is known")
        if missing:
            problems.append(f"{name}: {', '.join(missing)}")
    assert not problems, "\n".join(problems)


def test_readme_table_shows_each_models_weights_check():
    """The README model table (tools/make_cards.py) states what zoo.hub checks for every model's weights."""
    sys.path.insert(0, str(REPO / "tools"))
    import make_cards
    text = (REPO / "README.md").read_text()
    start, end = make_cards.README_MARKERS
    table = text[text.index(start):text.index(end)]
    assert "| weights check |" in table and "hash-checked" not in text
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and not cells[0].startswith(("model", "---", "`")):
            rows[cells[0]] = cells[5]
    assert set(rows) == set(zoo.list_models())
    for name, shown in rows.items():
        assert shown == make_cards.verification_summary(make_cards.weight_tags(name)), name
    assert make_cards.verification_summary({}) == "–"
    assert make_cards.verification_summary({"a": "verified", "b": "unverified", "c": "unverified"}) \
        == "1 verified, 2 unverified"
