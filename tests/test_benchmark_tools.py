"""tools/benchmark.py (the shared timing / memory loop, JSON fields, references, --compile, attention FLOP
formula), tools/bench_ops.py and tools/make_cards.py (marked regions only).

No timing assertions: speeds are benchmark output, not test conditions.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo
import zoo.kernels
from zoo.kernels import attention, from_dense_mask, routed_topk, window_2d

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_ops  # noqa: E402
import benchmark  # noqa: E402
import make_cards  # noqa: E402


class _Attn(torch.nn.Module):
    def __init__(self, layout, Dv):
        super().__init__()
        self.layout, self.Dv = layout, Dv

    def forward(self, q):
        return attention(q, q, q[..., : self.Dv], self.layout)


def _flops(layout, B, H, L, D, Dv, train=False):
    q = torch.randn(B, H, L, D, requires_grad=train)
    return benchmark.count_flops(_Attn(layout, Dv), q, train=train)


def test_attention_flops_dense_match_torch_matmul_count():
    B, H, L, D = 2, 3, 20, 8
    got = _flops(None, B, H, L, D, D)
    q = torch.randn(B, H, L, D)
    fc = FlopCounterMode(display=False)
    with fc:  # explicit matmuls: torch's own count for softmax(q k^T) v
        torch.softmax(q @ q.transpose(-1, -2), -1) @ q
    assert got["attention"] == got["total"] == fc.get_total_flops() == 4 * B * H * L * L * D


def test_attention_flops_window_counts_virtual_keys_and_masks():
    B, H, D, Dv = 2, 2, 8, 4
    lay = window_2d(8, 8, 4, 1)                    # zero border: every query sees a full 6x6 window
    got = _flops(lay, B, H, 64, D, Dv)
    assert got["attention"] == 2 * (D + Dv) * B * H * 64 * 36
    kv = torch.ones(B, 64, dtype=torch.bool)
    kv[:, -8:] = False                             # last row padded: masked keys do not count
    lay = window_2d(8, 8, 4, 1, kv_valid=kv)
    kept = int(lay.to_dense_mask(include_virtual=True).sum()) * H
    assert kept < B * H * 64 * 36
    assert _flops(lay, B, H, 64, D, Dv)["attention"] == 2 * (D + Dv) * kept
    # backward counted as twice the forward
    tr = _flops(window_2d(8, 8, 4, 1, border="clamp"), 1, H, 64, D, D, train=True)
    assert tr["attention"] == 3 * 2 * 2 * D * H * 64 * 36


def test_attention_flops_routed_dedup_and_dense_mask():
    idx = torch.tensor([[[0, 1], [1, 1], [2, 0], [3, 3]]])        # duplicates attended once
    lay = routed_topk(idx, 4)
    got = _flops(lay, 1, 2, 16, 8, 8)["attention"]
    assert got == 2 * 16 * 2 * int(lay.to_dense_mask().sum()) == 2 * 16 * 2 * (2 + 1 + 2 + 1) * 16
    m = torch.rand(1, 1, 16, 16) > 0.5
    m[..., 0] = True
    assert _flops(from_dense_mask(m), 2, 2, 16, 8, 8)["attention"] == 2 * 16 * 2 * 2 * int(m.sum())


def test_benchmark_cli_writes_json_with_reference(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), "zoo_test_toynet", "--import",
           str(REPO / "tests" / "_toy_models.py"), "--batch", "2", "--warmup", "0", "--iters", "1", "--rounds", "2",
           "--threads", "1", "--reference", "_toy_models:ToyNet", "--reference-path", str(REPO / "tests"),
           "--out", str(out), "--markdown"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| zoo_test_toynet |" in p.stdout and "infer ratio" in p.stdout
    recs = json.loads(out.read_text())
    assert isinstance(recs, list) and len(recs) == 1
    r = recs[0]
    for k in ("model", "params_m", "gmacs", "attention_gmacs", "input_size", "batch", "dtype", "infer_img_s",
              "train_img_s", "infer_mem_mb", "train_mem_mb", "device", "device_name", "torch", "threads", "date"):
        assert k in r, k
    assert r["model"] == "zoo_test_toynet" and r["batch"] == 2 and r["input_size"] == [3, 64, 64]
    assert r["threads"] == 1 and r["torch"] == torch.__version__ and r["device"] == "cpu"
    assert r["params_m"] > 0 and r["gmacs"] > 0 and r["attention_gmacs"] == 0
    assert r["infer_img_s"] > 0 and r["train_img_s"] > 0 and r["train_mem_mb"] > 0
    ref = r["reference"]
    assert ref["name"] == "_toy_models:ToyNet" and ref["params_m"] == r["params_m"]
    for k in ("infer_img_s", "infer_ratio", "train_img_s", "train_ratio", "gmacs"):
        assert ref[k] > 0, k
    assert ref["gmacs"] == r["gmacs"]          # same network: same count


def test_benchmark_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["x", "--batch", "0"])
    assert "--batch must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown model"):
        benchmark.resolve_models(benchmark.parse_args(["no_such_model_xyz"]))
    with pytest.raises(ValueError, match="neither a timm model name"):
        benchmark.load_reference("no_such_model_xyz", None)


def test_merge_and_markdown():
    a = dict(model="m", input_size=[3, 8, 8], batch=2, dtype="float32", device="cpu", infer_img_s=1.0)
    b = dict(a, infer_img_s=2.0)
    c = dict(a, batch=4)
    assert benchmark.merge_records([a, c], [b]) == [c, b]
    assert "| m |" in benchmark.markdown_table([b])


def test_replace_region():
    m = ("<!-- a -->", "<!-- b -->")
    assert make_cards.replace_region("x\n", m, "new") == "x\n\n<!-- a -->\nnew\n<!-- b -->\n"
    t = "pre\n<!-- a -->\nold\n<!-- b -->\npost\n"
    assert make_cards.replace_region(t, m, "new") == "pre\n<!-- a -->\nnew\n<!-- b -->\npost\n"
    with pytest.raises(ValueError, match="markers"):
        make_cards.replace_region("<!-- b -->\n<!-- a -->", m, "x")


def test_make_cards_rewrites_only_marked_regions(tmp_path):
    fam = "sparsifiner"
    cards, results = tmp_path / "model_cards", tmp_path / "model_cards" / "results"
    results.mkdir(parents=True)
    prose = "# Card\n\nAuthor prose | with a table |\n\nUpstream claims: 79.9 top-1 (upstream's).\n"
    (cards / f"{fam}.md").write_text(prose)
    other = "# Other card\n<!-- measured:start -->\nkeep?\n<!-- measured:end -->\ntail\n"
    readme_pre = "# Title\n\nintro\n\n<!-- model-table:start -->\nold table\n<!-- model-table:end -->\n\n## After\ntext\n"
    (tmp_path / "README.md").write_text(readme_pre)
    name = zoo.list_models(family=fam)[0]
    rec = dict(model=name, family=fam, params_m=5.9, gmacs=1.0, attention_gmacs=0.1, input_size=[3, 224, 224],
               batch=8, dtype="float32", infer_img_s=12.5, train_img_s=4.0, infer_mem_mb=10.0, train_mem_mb=50.0,
               device="cpu", device_name="CPU test", threads=2, torch="t", date="2026-01-01 00:00 UTC")
    (results / f"{fam}.json").write_text(json.dumps([rec, dict(model="broken", family=fam, error="X")]))
    argv = ["--cards-dir", str(cards), "--readme", str(tmp_path / "README.md"), "--families", fam]
    assert make_cards.main(argv) == 0
    card = (cards / f"{fam}.md").read_text()
    assert card.startswith(prose)                              # prose untouched, markers appended
    region = card[card.index("<!-- measured:start -->"):card.index("<!-- measured:end -->")]
    assert f"| {name} | 5.90 |" in region and "CPU test" in region and "2026-01-01" in region
    assert "broken" not in region and "plots/sparsifiner_speed.png" in region
    assert (cards / "plots" / "sparsifiner_speed.png").stat().st_size > 0
    readme = (tmp_path / "README.md").read_text()
    head, rest = readme.split("<!-- model-table:start -->")
    table, tail = rest.split("<!-- model-table:end -->")
    assert head == "# Title\n\nintro\n\n" and tail == "\n\n## After\ntext\n"
    assert "old table" not in table and f"| {name} | [{fam}](model_cards/{fam}.md) |" in table
    assert "12.5 img/s" in table
    assert (cards / "README.md").exists()
    # idempotent: a second run changes nothing
    assert make_cards.main(argv) == 0
    assert (cards / f"{fam}.md").read_text() == card and (tmp_path / "README.md").read_text() == readme


# ------------------------------------------------------------------------------------------------
# models that do not take an image: example_inputs, samples/s
# ------------------------------------------------------------------------------------------------

def test_benchmark_non_image_model_example_inputs(tmp_path):
    """A registered non-image model (skeleton decoder: condition tokens + token ids) is fed through its
    example_inputs, reported in samples/s with one sample's input shapes, FLOPs counted."""
    name, out = "puppeteer_skeleton_small", tmp_path / "p.json"
    argv = [name, "--batch", "2", "--warmup", "0", "--iters", "1", "--rounds", "1", "--input-kw", "num_tokens=9",
            "--out", str(out)]
    assert benchmark.main(argv) == 0
    (r,) = json.loads(out.read_text())
    assert r["model"] == name and r["family"] == "puppeteer" and r["batch"] == 2 and r["input_size"] is None
    assert r["rate_unit"] == "samples/s" and r["input_kw"] == {"num_tokens": 9}
    assert r["sample_inputs"] == {"cond": {"shape": [1, 9, 32], "dtype": "float32"},
                                  "input_ids": {"shape": [1, 9], "dtype": "int64"}}
    assert r["infer_samples_s"] > 0 and r["train_samples_s"] > 0 and r["train_mem_mb"] > 0
    assert "infer_img_s" not in r and "train_img_s" not in r          # no image, no img/s
    assert r["gmacs"] > 0 and r["attention_gmacs"] >= 0
    # attention FLOPs, known answer: causal over 9 condition + 9 generated tokens, 4 heads x 16, 2 layers
    model = timm.create_model(name)
    f = benchmark.count_flops(model, model.example_inputs(1, num_tokens=9))
    L = 18
    assert f["attention"] == 2 * (16 + 16) * (L * (L + 1) // 2) * 4 * 2
    assert f["total"] > f["attention"]
    table = benchmark.markdown_table([r])
    assert "infer samples/s" in table and "img/s" not in table and "cond 1×9×32, input_ids 1×9" in table
    # a --flops-only record: parameters and GMACs, nothing timed
    assert benchmark.main([name, "--flops-only", "--input-kw", "num_tokens=4", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert len(recs) == 2                                  # different inputs: a separate record
    fo = recs[1]
    assert fo["gmacs"] > 0 and "infer_samples_s" not in fo and "timing" in fo


def test_benchmark_non_image_bad_input(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["x", "--input-kw", "num_parts"])
    assert "NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["x", "--input-kw", "n=abc"])
    assert "not a Python literal" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--img-size"):
        benchmark.main(["puppeteer_skeleton_small", "--img-size", "64", "--no-flops"])
    with pytest.raises(TypeError, match="rejected --input-kw"):
        benchmark.main(["puppeteer_skeleton_small", "--input-kw", "bogus=1", "--no-flops"])


def test_make_cards_samples_records(tmp_path):
    """Non-image records render in samples/s with their inputs; --flops-only ones as untimed; the
    README row of a non-image model shows its example inputs, not an inherited image size."""
    fam = "puppeteer"
    cards, results = tmp_path / "model_cards", tmp_path / "model_cards" / "results"
    results.mkdir(parents=True)
    (cards / f"{fam}.md").write_text("# Card\n")
    (tmp_path / "README.md").write_text("<!-- model-table:start -->\n<!-- model-table:end -->\n")
    common = dict(family=fam, input_size=None, batch=1, dtype="float32", device="cpu", device_name="CPU test",
                  threads=2, torch="t", date="2026-01-01 00:00 UTC", rate_unit="samples/s")
    timed = dict(common, model="puppeteer_skeleton_small", params_m=0.086, gmacs=0.006, attention_gmacs=0.001,
                 sample_inputs={"cond": {"shape": [1, 9, 32], "dtype": "float32"},
                                "input_ids": {"shape": [1, 65], "dtype": "int64"}},
                 infer_samples_s=271.5, train_samples_s=123.2, infer_mem_mb=0.8, train_mem_mb=1.8)
    untimed = dict(common, model="puppeteer_skeleton_opt350m", params_m=304.8, gmacs=201.0, attention_gmacs=2.0,
                   sample_inputs={"cond": {"shape": [1, 257, 768], "dtype": "float32"}}, timing="skipped")
    (results / f"{fam}.json").write_text(json.dumps([timed, untimed]))
    argv = ["--cards-dir", str(cards), "--readme", str(tmp_path / "README.md"), "--families", fam, "--no-index"]
    assert make_cards.main(argv) == 0
    card = (cards / f"{fam}.md").read_text()
    assert "| infer samples/s | train samples/s |" in card and "img/s" not in card
    assert "| puppeteer_skeleton_small | 0.09 | 0.006 | 0.001 | cond 1×9×32, input_ids 1×65 | 1 |" in card
    assert "| 271.50 | 123.20 |" in card
    assert ("| puppeteer_skeleton_opt350m | 304.80 | 201.000 | 2.000 | cond 1×257×768 | 1 | float32 | – | – |"
            in card)
    assert "Not timed here" in card and "is one batch element of the model's `example_inputs`" in card
    readme = (tmp_path / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| puppeteer_skeleton_small |"))
    assert "271.5 samples/s (cpu, batch 1, cond 1×9×32," in row and "img/s" not in row
    assert "| cond 1×9×32 |" in row                         # default input from example_inputs (floats only)
    row = next(ln for ln in readme.splitlines() if ln.startswith("| puppeteer_skeleton_opt350m |"))
    assert row.endswith("| – |")                           # GMACs-only record: no measured speed


# ------------------------------------------------------------------------------------------------
# the shared loop: timing statistics, interleaving, memory
# ------------------------------------------------------------------------------------------------

def test_timing_statistics_known_answers():
    t = benchmark.timing_of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median, t.q1, t.q3, t.min, t.iqr) == (3.0, 2.0, 4.0, 1.0, 2.0)
    assert t.samples == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert t.ms() == {"median": 3000.0, "q1": 2000.0, "q3": 4000.0}
    one = benchmark.timing_of([0.5])
    assert (one.median, one.q1, one.q3) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one sample"):
        benchmark.timing_of([])


def test_measure_interleaves_counts_calls_and_times_them():
    log = []
    steps = {"a": lambda: log.append("a"), "b": lambda: (log.append("b"), time.sleep(0.002))}
    t = benchmark.measure(steps, "cpu", warmup=2, reps=4, iters=3)
    # warm-up (2 each), then rounds of 3 calls each, the order reversed every other round
    assert log == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3) * 2
    assert set(t) == {"a", "b"} and all(len(v.samples) == 4 for v in t.values())
    for v in t.values():
        assert 0 <= v.min <= v.q1 <= v.median <= v.q3
    assert t["b"].min >= 0.002                 # a call that sleeps 2 ms takes at least 2 ms
    with pytest.raises(ValueError, match="reps and iters must be >= 1"):
        benchmark.measure(steps, "cpu", reps=0)


def test_cpu_peak_memory_known_answer_and_key_lists_path():
    """The CPU allocator's events: two buffers alive together, then one freed before a third."""
    n = 1 << 20

    def step():
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty(2 * n, dtype=torch.uint8)
        del a
        c = torch.empty(n // 2, dtype=torch.uint8)
        return b, c

    assert benchmark.peak_memory_mb(step, "cpu") == 3.0       # a + b live together: 3 MiB
    # the key_lists CSR path (sparse tensors, custom op internals) is seen too
    from zoo.kernels import key_lists
    q = torch.randn(1, 2, 17, 8)
    idx = torch.rand(1, 2, 17, 17).topk(5, -1).indices
    out = {}
    peak = benchmark.peak_memory_mb(lambda: out.setdefault("o", attention(q, q, q, key_lists(idx, 17, dense_rows=1))),
                                    "cpu")
    assert out["o"].shape == (1, 2, 17, 8)
    assert peak * 2 ** 20 >= out["o"].numel() * out["o"].element_size()


# ------------------------------------------------------------------------------------------------
# references declared per family, --compile, eager and compiled rows
# ------------------------------------------------------------------------------------------------

def test_declared_references_resolve():
    """Every declared zoo model and timm reference exists; upstream specs name a known loader."""
    for fam, decl in benchmark.REFERENCES.items():
        assert fam in zoo.list_families(), fam
        for name, ref in decl.models.items():
            assert zoo.model_family(name) == fam, name
            if ref.startswith("upstream:"):
                assert ref.split(":")[1] in benchmark.UPSTREAM, ref
            else:
                assert timm.is_model(ref), ref
    with pytest.raises(ValueError, match="needs --reference-path"):
        benchmark.load_reference("upstream:ffnet:ffnet_1", None)
    with pytest.raises(ValueError, match="upstream:<family>:<variant>"):
        benchmark.load_reference("upstream:nope:x", "/tmp")


def test_reference_auto_shares_weights_and_compares_outputs():
    """A family declared with weights=True: the reference's weights go into the zoo model through its
    checkpoint_filter_fn, so both compute the same function (timm's TNT vs the zoo's)."""
    name = "tnt_s_patch16_224_zoo"
    model = timm.create_model(name)
    x1 = torch.randn(1, 3, 224, 224)
    label = benchmark.reference_for(name, "transformer_in_transformer", "auto")
    ref = benchmark.prepare_reference(name, "transformer_in_transformer", model, label, None, x1)
    assert ref.label == "tnt_s_patch16_224" and ref.info["max_abs_diff"] < 1e-4
    assert "checkpoint_filter_fn" in ref.info["weights"] and not ref.fuse
    assert benchmark.reference_for("pyramid_tnt_ti", "transformer_in_transformer", "auto") is None
    assert benchmark.reference_for("pyramid_tnt_ti", "transformer_in_transformer", "deit_tiny_patch16_224") \
        == "deit_tiny_patch16_224"
    with pytest.raises(ValueError, match="declares no reference for pyramid_tnt_ti"):
        benchmark.main(["pyramid_tnt_ti", "--reference", "auto", "--no-flops"])


def test_benchmark_compile_rows_beside_eager(tmp_path):
    """--compile: the zoo model and its reference, eager and compiled, timed in one run; the compiled
    outputs equal eager's; the markdown shows a row per mode. (aot_eager: the same tracing as
    inductor without its C++ build, which would take minutes here.)"""
    out = tmp_path / "c.json"
    argv = ["zoo_test_toynet", "--import", str(REPO / "tests" / "_toy_models.py"), "--batch", "2", "--warmup", "0",
            "--iters", "1", "--rounds", "2", "--no-flops", "--reference", "_toy_models:ToyNet",
            "--compile", "--compile-backend", "aot_eager", "--out", str(out)]
    assert benchmark.main(argv) == 0
    (r,) = json.loads(out.read_text())
    for block in (r["compiled"], r["reference"]["compiled"]):
        assert block["backend"] == "aot_eager" and "error" not in block
        assert block["graph_breaks"] == 0 and block["max_abs_diff"] <= 1e-5
        assert block["infer_img_s"] > 0 and block["train_img_s"] > 0 and block["infer_speedup"] > 0
        assert block["train_mem_mb"] > 0 and set(block["compile_s"]) == {"infer", "train"}
        assert block["step_ms"]["infer"]["q1"] <= block["step_ms"]["infer"]["median"] <= block["step_ms"]["infer"]["q3"]
    assert r["reference"]["compiled"]["infer_ratio"] > 0
    assert r["infer_img_s"] > 0 and r["reference"]["infer_ratio"] > 0         # the eager numbers stay as they were
    eager, compiled = benchmark.mode_records(r)
    assert eager["mode"] == "eager" and eager["infer_img_s"] == r["infer_img_s"]
    assert compiled["mode"] == "compiled" and compiled["infer_img_s"] == r["compiled"]["infer_img_s"]
    assert compiled["reference"]["infer_ratio"] == r["reference"]["compiled"]["infer_ratio"]
    table = benchmark.markdown_table([r])
    assert "| mode |" in table and "| zoo_test_toynet | eager |" in table and "| zoo_test_toynet | compiled |" in table
    # a model that fails to compile keeps its eager row; its compiled row says why
    bad = dict(r, compiled=dict(backend="inductor", error="InductorError: x"))
    rows = benchmark.mode_records(bad)
    assert rows[1]["compile_error"] == "InductorError: x" and benchmark.rate(rows[1], "infer") is None
    assert "compile error" in benchmark.markdown_table([bad])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["x", "--compile", "--compile-backend", "no_such_backend"])


def test_make_cards_reads_records_with_compiled_blocks(tmp_path):
    fam = "sparsifiner"
    results = tmp_path / "results"
    results.mkdir()
    name = zoo.list_models(family=fam)[0]
    rec = dict(model=name, family=fam, params_m=5.9, input_size=[3, 224, 224], batch=2, dtype="float32",
               infer_img_s=10.0, device="cpu", date="2026-01-01 00:00 UTC",
               compiled=dict(backend="inductor", infer_img_s=12.0, infer_speedup=1.2))
    (results / f"{fam}.json").write_text(json.dumps([rec]))
    (got,) = make_cards.load_results(results)[fam]
    assert benchmark.rate(got, "infer") == 10.0 and got["compiled"]["infer_img_s"] == 12.0


def test_make_cards_renders_eager_and_compiled_rows(tmp_path):
    """A record with compiled blocks gives the card an eager and a compiled row, zoo model and reference
    side by side; a model that failed to compile shows the error and keeps its eager row."""
    fam = "sparsifiner"
    cards, results = tmp_path / "model_cards", tmp_path / "model_cards" / "results"
    results.mkdir(parents=True)
    (cards / f"{fam}.md").write_text("# Card\n")
    a, b = zoo.list_models(family=fam)[:2]
    common = dict(family=fam, input_size=[3, 224, 224], batch=2, dtype="float32", device="cpu",
                  device_name="CPU test", threads=1, date="2026-01-01 00:00 UTC")
    ok = dict(common, model=a, params_m=5.9, infer_img_s=10.0, infer_mem_mb=7.0,
              reference=dict(name="deit_tiny_patch16_224", infer_img_s=8.0, infer_ratio=1.25, infer_mem_mb=5.0,
                             compiled=dict(backend="inductor", infer_img_s=16.0, infer_speedup=2.0, graph_breaks=0,
                                           max_abs_diff=2e-6, infer_ratio=0.75, infer_mem_mb=4.0)),
              compiled=dict(backend="inductor", infer_img_s=12.0, infer_speedup=1.2, graph_breaks=0,
                            max_abs_diff=1e-6, infer_mem_mb=6.0))
    bad = dict(common, model=b, params_m=22.0, infer_img_s=3.0,
               compiled=dict(backend="inductor", error="InductorError: boom\n  details"))
    (results / f"{fam}.json").write_text(json.dumps([ok, bad]))
    argv = ["--cards-dir", str(cards), "--families", fam, "--no-readme", "--no-index", "--no-plots"]
    assert make_cards.main(argv) == 0
    card = (cards / f"{fam}.md").read_text()
    assert "| infer img/s (zoo / ref) | zoo / ref |" in card
    assert (f"| {a} | deit_tiny_patch16_224 | eager | 10.00 / 8.00 | 1.250 | – / – | – | – | – | 7.0 / 5.0 | "
            "CPU test | 2026-01-01 00:00 UTC |") in card
    assert (f"| {a} | deit_tiny_patch16_224 | compiled | 12.00 / 16.00 | 0.750 | – / – | 1.20 / 2.00 | 0 / 0 | "
            "1e-06 / 2e-06 | 6.0 / 4.0 | CPU test | 2026-01-01 00:00 UTC |") in card
    assert f"| {b} | – | eager | 3.00 / – |" in card and f"| {b} | – | compiled | compile error / – |" in card
    assert f"Compiling failed for {b} (zoo model): `InductorError: boom`" in card and "details" not in card
    assert f"`python tools/benchmark.py {a} --reference auto --compile --batch 2 --img-size 224" in card
    assert make_cards.main(argv) == 0 and (cards / f"{fam}.md").read_text() == card     # idempotent


# ------------------------------------------------------------------------------------------------
# tools/bench_ops.py
# ------------------------------------------------------------------------------------------------

def test_bench_ops_tiny_run_writes_json_card_and_plot(tmp_path):
    """Attention (packed sequences) and deformable attention at tiny shapes: JSON rows with times and
    memory, the zoo op matching the formulations it is compared with, the card region and a plot."""
    j, card, png = tmp_path / "k.json", tmp_path / "kernels.md", tmp_path / "k.png"
    card.write_text("# Kernels\n\nprose\n")
    rep = bench_ops.main(["--device", "cpu", "--quick", "--workloads", "varlen", "--reps", "2", "--warmup", "0",
                          "--img", "64", "64", "--batch", "1", "--decoder-queries", "8", "--heads", "2",
                          "--points", "2", "--dim", "8", "--cases", "decoder", "--json", str(j), "--card", str(card),
                          "--plot", str(png)])
    data = json.loads(j.read_text())
    assert data["meta"]["ops"] == ["attention", "msda"] and data == json.loads(json.dumps(rep))
    rows = {(r["op"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {("attention", "zoo reference"), ("attention", "padded SDPA"),
                         ("attention", "per-sequence loop"), ("attention", "dense SDPA"),
                         ("ms_deform_attn", "zoo"), ("ms_deform_attn", "grid_sample")}
    for r in rows.values():
        assert "error" not in r, r
        assert 0 < r["fwd_ms"] and r["fwd_ms_iqr"][0] <= r["fwd_ms"] <= r["fwd_ms_iqr"][1]
        assert r["peak_mib_fwdbwd"] >= 0
    assert rows[("attention", "zoo reference")]["fwd_tflops"] > 0
    assert max(rows[("ms_deform_attn", "zoo")]["max_abs_diff"].values()) < 1e-5
    text = card.read_text()
    assert text.startswith("# Kernels\n\nprose\n") and "<!-- BENCH:cpu -->" in text and "msda decoder 8 queries" in text
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        bench_ops.parse_args(["--img", "32", "32"])


def test_bench_ops_formulations_match_the_zoo_ops():
    """The comparison formulations compute what the zoo ops compute (else the timings compare
    different things): packed-sequence loop and padding, the grid_sample deformable attention."""
    cu = torch.tensor([0, 5, 12, 20])
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    want = attention(q, k, v, zoo.kernels.varlen(cu))
    torch.testing.assert_close(bench_ops.segments_loop(q, k, v, cu), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bench_ops.segments_padded_sdpa(q, k, v, cu), want, rtol=1e-5, atol=1e-5)
    shapes = bench_ops.level_shapes(64, 96)
    value, spatial, starts, loc, attn = bench_ops.msda_inputs(shapes, 2, 7, 2, 3, 4, torch.float32, "cpu")
    torch.testing.assert_close(bench_ops.msda_grid_sample(value, shapes, loc, attn),
                               zoo.kernels.ms_deform_attn(value, spatial, starts, loc, attn), rtol=1e-5, atol=1e-5)
