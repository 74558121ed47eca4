"""zoo.hub (download, cache, hash, build_model) and tools/convert_weights.py, against a real HTTP
server on 127.0.0.1 started here; nothing touches the network."""
import hashlib
import http.server
import importlib.util
import io
import threading
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import zoo
import zoo.hub as hub
from zoo.hub import (PretrainedMismatchError, PretrainedTagError, WeightsHashMismatchError, WeightsHTTPError,
                     WeightsTruncatedError, WeightsUnreachableError, download)

import _tinynet

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# a local server

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.hits[self.path] += 1
        route = srv.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, length = route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class Server:
    """http.server in a thread on an ephemeral port. ``routes[path] = (body, content_length)``;
    a content_length larger than the body makes a truncated response."""

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes = {}
        self.httpd.hits = Counter()
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


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def cache_files(d: Path):
    """Everything in a cache dir, hidden temporaries included."""
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


GOOD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, spans several read chunks
BAD = GOOD[:-4] + b"liat"


# ----------------------------------------------------------------------------------------------
# download()

def test_download_good_then_cache_hit_with_server_down(server, tmp_path):
    url = server.add("/w/good-1234.bin", GOOD)
    cache = tmp_path / "cache"
    path = download(url, sha(GOOD), cache_dir=cache, progress=True)
    assert path == cache / "good-1234.bin"
    assert path.read_bytes() == GOOD
    assert cache_files(cache) == ["good-1234.bin"]
    assert server.hits["/w/good-1234.bin"] == 1

    server.stop()
    again = download(url, sha(GOOD), cache_dir=cache)  # no network: the server is gone
    assert again == path and again.read_bytes() == GOOD
    assert server.hits["/w/good-1234.bin"] == 1
    # an unknown hash also takes the cached file as it is
    assert download(url, None, cache_dir=cache) == path


def test_download_default_cache_is_torch_hub(server, tmp_path):
    url = server.add("/w/in-torch-home.bin", GOOD)
    path = download(url, sha(GOOD), progress=False)
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / "in-torch-home.bin"
    assert path.is_relative_to(tmp_path / "torch_home")
    assert path.read_bytes() == GOOD


def test_download_unknown_hash_still_checks_length(server, tmp_path):
    url = server.add("/w/nohash.bin", GOOD)
    assert download(url, None, cache_dir=tmp_path).read_bytes() == GOOD


def test_wrong_hash_is_rejected_and_removed(server, tmp_path):
    url = server.add("/w/wrong.bin", BAD)
    with pytest.raises(WeightsHashMismatchError) as e:
        download(url, sha(GOOD), cache_dir=tmp_path)
    msg = str(e.value)
    assert sha(GOOD) in msg and sha(BAD) in msg and url in msg
    assert cache_files(tmp_path) == []


def test_truncated_body_is_rejected_and_removed(server, tmp_path):
    url = server.add("/w/trunc.bin", GOOD[:300_000], content_length=len(GOOD))
    with pytest.raises(WeightsTruncatedError) as e:
        download(url, None, cache_dir=tmp_path)  # no hash: Content-Length alone must catch it
    assert str(len(GOOD)) in str(e.value) and url in str(e.value)
    assert cache_files(tmp_path) == []


def test_http_404(server, tmp_path):
    url = server.base + "/w/missing.bin"
    with pytest.raises(WeightsHTTPError) as e:
        download(url, sha(GOOD), cache_dir=tmp_path)
    assert e.value.status == 404 and "404" in str(e.value) and url in str(e.value)
    assert cache_files(tmp_path) == []


def test_server_down_names_url_and_local_file_route(server, tmp_path):
    url = server.add("/w/down.bin", GOOD)
    server.stop()
    with pytest.raises(WeightsUnreachableError) as e:
        download(url, sha(GOOD), cache_dir=tmp_path, model_name="some_model.tag")
    msg = str(e.value)
    assert url in msg and "pretrained_cfg_overlay=dict(file=" in msg and "some_model.tag" in msg
    assert isinstance(e.value, RuntimeError)
    assert cache_files(tmp_path) == []


def test_corrupt_cached_file_is_replaced_or_removed(server, tmp_path):
    url = server.add("/w/corrupt.bin", GOOD)
    (tmp_path / "corrupt.bin").write_bytes(BAD)
    assert download(url, sha(GOOD), cache_dir=tmp_path).read_bytes() == GOOD  # re-fetched
    (tmp_path / "corrupt.bin").write_bytes(BAD)
    server.stop()
    with pytest.raises(WeightsUnreachableError):
        download(url, sha(GOOD), cache_dir=tmp_path)
    assert cache_files(tmp_path) == []  # the bad copy did not survive


def test_file_url(tmp_path):
    src = tmp_path / "src" / "w-abc.bin"
    src.parent.mkdir()
    src.write_bytes(GOOD)
    path = download(src.as_uri(), sha(GOOD), cache_dir=tmp_path / "cache")
    assert path.read_bytes() == GOOD and path.parent == tmp_path / "cache"
    with pytest.raises(WeightsUnreachableError):
        download((tmp_path / "nope.bin").as_uri(), None, cache_dir=tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == ["w-abc.bin"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="64 hex"):
        download("http://127.0.0.1:9/x.bin", "deadbeef")
    with pytest.raises(ValueError, match="http"):
        hub.cfg(url="ftp://example.invalid/x.pth")
    with pytest.raises(ValueError, match="without a url"):
        hub.cfg(sha256="0" * 64)


def test_cfg_records_sha256_or_says_unknown():
    known = hub.cfg(url="https://example.invalid/a-1.pth", sha256="A" * 64, license="mit")
    assert hub.KNOWN_SHA256["https://example.invalid/a-1.pth"] == "a" * 64
    assert "sha256" not in known and not known.get("notes")
    unknown = hub.cfg(url="https://example.invalid/b.pth", license="mit", notes=("x",))
    assert hub.KNOWN_SHA256["https://example.invalid/b.pth"] is None
    assert unknown["notes"] == ("x", hub.SHA256_UNKNOWN_NOTE)
    with pytest.raises(ValueError, match="conflicting"):
        hub.cfg(url="https://example.invalid/a-1.pth", sha256="b" * 64)
    hub.cfg(url=("https://example.invalid/x/a-1.pth", "explicit.pth"))
    with pytest.raises(ValueError, match="cache file name 'explicit.pth'"):
        hub.cfg(url=("https://example.invalid/y/a-1.pth", "explicit.pth"))


def test_shared_or_bare_url_basenames_get_distinct_cache_names(server, tmp_path):
    """Two cfg urls ending in the same name (or onedrive's '.../content') must not share a cache file."""
    bodies = {"/one/model_best.pth": b"first" * 100, "/two/model_best.pth": b"second" * 100,
              "/s/root/content": b"third" * 100}
    urls = {p: server.add(p, b) for p, b in bodies.items()}
    for p, b in bodies.items():
        hub.cfg(url=urls[p], sha256=sha(b))
    paths = {p: download(urls[p], sha(b), cache_dir=tmp_path) for p, b in bodies.items()}
    assert len(set(paths.values())) == 3
    for p, b in bodies.items():
        assert paths[p].read_bytes() == b
        assert paths[p].name.startswith(("model_best-", "content-"))


# ----------------------------------------------------------------------------------------------
# create_model(..., pretrained=True) through zoo.hub.build_model

def _pth_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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
        "untrained": hub.cfg(**meta),
    })
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
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "tiny_hashed.pth"
    assert cached.is_file() and cached.parent.is_relative_to(tmp_path)
    assert "file" not in m.pretrained_cfg and m.pretrained_cfg["url"].endswith("tiny_hashed.pth")
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 10)

    hits = tiny.hits["/tiny/tiny_hashed.pth"]
    m2 = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, num_classes=3)  # cache hit, new head
    assert tiny.hits["/tiny/tiny_hashed.pth"] == hits
    assert m2.fc.weight.shape == (3, 8)
    _assert_weights(m2, {k: v for k, v in _tinynet.zoo_state_dict(0).items() if not k.startswith("fc.")})


def test_pretrained_cache_dir_and_unknown_hash(tiny, tmp_path):
    m = timm.create_model("zoo_test_tinynet.nohash", pretrained=True, cache_dir=tmp_path / "c")
    assert cache_files(tmp_path / "c") == ["tiny_nohash.pth"]
    _assert_weights(m, _tinynet.zoo_state_dict(0))


def test_pretrained_hash_mismatch_through_create_model(tiny, tmp_path):
    with pytest.raises(WeightsHashMismatchError):
        timm.create_model("zoo_test_tinynet.badhash", pretrained=True, cache_dir=tmp_path)
    assert cache_files(tmp_path) == []


def test_unknown_hash_still_checks_keys_even_with_new_head(tiny, tmp_path):
    # timm relaxes strict loading when num_classes changes; the hub's check still catches wrong keys
    for kw in ({}, dict(num_classes=3)):
        with pytest.raises(PretrainedMismatchError, match="missing keys: stem.weight"):
            timm.create_model("zoo_test_tinynet.wrongkeys", pretrained=True, cache_dir=tmp_path, **kw)


def test_unknown_tag_and_tag_without_weights(tiny):
    with pytest.raises(PretrainedTagError) as e:
        timm.create_model("zoo_test_tinynet.badtag")
    assert "'badtag'" in str(e.value) and "zoo_test_tinynet.hashed (weights)" in str(e.value)
    with pytest.raises(PretrainedTagError, match="no pretrained weights.*zoo_test_tinynet.hashed"):
        timm.create_model("zoo_test_tinynet.untrained", pretrained=True)
    timm.create_model("zoo_test_tinynet.untrained")  # fine without weights


def test_server_down_error_through_create_model(tiny, tmp_path):
    s = Server()
    url = s.add("/tiny/gone.pth", b"")
    s.stop()
    with pytest.raises(WeightsUnreachableError) as e:
        timm.create_model("zoo_test_tinynet.hashed", pretrained=True, cache_dir=tmp_path,
                          pretrained_cfg_overlay=dict(url=url, sha256=None))
    assert "timm.create_model('zoo_test_tinynet.hashed', pretrained=True, pretrained_cfg_overlay=dict(file=" \
        in str(e.value)
    assert cache_files(tmp_path) == []


def test_local_file_overlay_and_checkpoint_path(tiny, tmp_path):
    upstream = tmp_path / "upstream.pth"
    torch.save({"model": _tinynet.upstream_state_dict(2)}, upstream)
    m = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, pretrained_cfg_overlay=dict(file=str(upstream)))
    _assert_weights(m, _tinynet.zoo_state_dict(2))
    assert tiny.hits["/tiny/tiny_hashed.pth"] <= 1  # a local file never goes to the server

    st = tmp_path / "zoo.safetensors"
    safetensors.torch.save_file(_tinynet.zoo_state_dict(3), str(st))
    m = timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_cfg_overlay=dict(file=str(st)))
    _assert_weights(m, _tinynet.zoo_state_dict(3))
    m = timm.create_model("zoo_test_tinynet", checkpoint_path=str(st))
    _assert_weights(m, _tinynet.zoo_state_dict(3))

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model("zoo_test_tinynet", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))


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
    with pytest.raises(RuntimeError, match="weights_only"):
        timm.create_model("zoo_test_tinynet", checkpoint_path=str(bad))


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
    assert cache_files(out_dir) == [path.name]  # no temporaries left

    expected = {k: v.half() if v.is_floating_point() else v for k, v in _tinynet.zoo_state_dict(4).items()}
    written = safetensors.torch.load_file(str(path))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    m = timm.create_model("zoo_test_tinynet.hashed", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_weights(m, {k: v.float() if v.is_floating_point() else v for k, v in expected.items()})
    # converting again gives the very same file
    again, digest2 = convert_tool.convert("zoo_test_tinynet.hashed", upstream, out_dir, log=lambda *a: None)
    assert (again, digest2) == (path, digest)


def test_convert_refuses_unsafe_pickle(tiny, convert_tool, tmp_path, capsys):
    bad = tmp_path / "unsafe.pth"
    _unsafe_checkpoint(bad)
    with pytest.raises(convert_tool.ConversionError, match="weights_only=True"):
        convert_tool.convert("zoo_test_tinynet", bad, tmp_path / "out", log=lambda *a: None)
    assert convert_tool.main(["zoo_test_tinynet", str(bad), str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert cache_files(tmp_path / "out") == []


def test_convert_rejects_mismatched_checkpoint(tiny, convert_tool, tmp_path):
    sd = _tinynet.upstream_state_dict(0)
    del sd["features.1.running_var"]
    sd["features.0.weight"] = sd["features.0.weight"][:4]
    ckpt = tmp_path / "mismatch.pth"
    torch.save(sd, ckpt)
    with pytest.raises(convert_tool.ConversionError, match=r"missing keys: bn.running_var.*shape mismatches: stem.weight"):
        convert_tool.convert("zoo_test_tinynet", ckpt, tmp_path / "out", log=lambda *a: None)
    assert cache_files(tmp_path / "out") == []
    with pytest.raises(convert_tool.ConversionError, match="unknown model"):
        convert_tool.convert("no_such_model_xyz", ckpt, tmp_path / "out", log=lambda *a: None)


# ----------------------------------------------------------------------------------------------
# every zoo cfg with weights carries its provenance

def test_zoo_pretrained_cfgs_carry_provenance():
    problems = []
    for name in zoo.list_models(pretrained=True):
        c = timm.get_pretrained_cfg(name)
        if not c.has_weights:
            continue
        url = c.url[0] if isinstance(c.url, (tuple, list)) else c.url
        missing = [f for f in ("license", "origin_url") if not getattr(c, f)]
        if not (c.paper_ids or c.paper_name):
            missing.append("paper_ids")
        if url and url not in hub.KNOWN_SHA256:
            missing.append("cfg made with zoo.hub.cfg (sha256 recorded)")
        if url and hub.KNOWN_SHA256.get(url) is None and hub.SHA256_UNKNOWN_NOTE not in (c.notes or ()):
            missing.append("note that sha256 is unknown")
        if missing:
            problems.append(f"{name}: {', '.join(missing)}")
    assert not problems, "\n".join(problems)
