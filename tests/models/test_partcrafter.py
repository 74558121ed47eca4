"""PartCrafter DiT: local/global part attention on packed segment layouts, upstream-layout weights.

The reference below (``RefPartCrafter``) follows the published architecture with the diffusers key
layout of the released weights and upstream's computation order: per-part batched attention in
local blocks, one dense attention per object over its concatenated parts in global blocks (a Python
loop, like upstream's training path), head-major q/k/v packing, plain SDPA. It is a test oracle,
written for this file.
"""
import math
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from _compile_check import assert_compiled_matches_eager
import zoo  # noqa: F401
from zoo.errors import UnsupportedError
from zoo.layers.dit_blocks import CrossAttention, DiTBlock
from zoo.models.partcrafter import (PackedParts, PartCrafterDiT, checkpoint_filter_fn, part_ids_for, resplit_rows,
                                    unresplit_rows)

torch.backends.mha.set_fastpath_enabled(False)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "partcrafter"
TINY = dict(in_chans=8, embed_dim=64, depth=5, num_heads=4, context_dim=16, max_num_parts=32)
T, M = 6, 7


# ------------------------------------------------------------------------------------------------
# reference (diffusers key layout, upstream math)
# ------------------------------------------------------------------------------------------------
class _RefAttn(nn.Module):
    def __init__(self, dim, heads, ctx_dim=None):
        super().__init__()
        self.heads, self.hd, self.cross = heads, dim // heads, ctx_dim is not None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(self.hd, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.hd, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def qkv(self, x, ctx=None):
        b, L, _ = x.shape
        H, hd = self.heads, self.hd
        if not self.cross:
            cat = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], -1).view(b, L, H, 3 * hd)
            q, k, v = cat.split(hd, -1)
        else:
            q = self.to_q(x).view(b, L, H, hd)
            cat = torch.cat([self.to_k(ctx), self.to_v(ctx)], -1).view(b, ctx.shape[1], H, 2 * hd)
            k, v = cat.split(hd, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.norm_q(q), self.norm_k(k), v

    def out(self, o):
        b, H, L, hd = o.shape
        return self.to_out[0](o.transpose(1, 2).reshape(b, L, H * hd))


class _RefFF(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x)))


class _RefBlock(nn.Module):
    def __init__(self, dim, heads, ctx_dim, skip):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _RefAttn(dim, heads)
        self.attn2 = _RefAttn(dim, heads, ctx_dim)
        self.ff = _RefFF(dim, 4 * dim)
        if skip:
            self.skip_linear = nn.Linear(2 * dim, dim)
            self.skip_norm = nn.LayerNorm(dim)


class RefPartCrafter(nn.Module):
    """Upstream math; ``counts`` list of parts per object, ``ctx`` (N, M, C) one row per part."""

    def __init__(self, in_chans, embed_dim, depth, num_heads, context_dim, max_num_parts, global_ids=None):
        super().__init__()
        D = embed_dim
        self.D, self.depth = D, depth
        self.global_ids = list(range(0, depth, 2)) if global_ids is None else list(global_ids)
        self.time_proj = nn.Module()
        self.time_proj.linear_1, self.time_proj.linear_2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.part_embedding = nn.Embedding(max_num_parts, D)
        self.proj_in = nn.Linear(in_chans, D)
        self.blocks = nn.ModuleList([_RefBlock(D, num_heads, context_dim, i > depth // 2) for i in range(depth)])
        self.norm_out = nn.LayerNorm(D)
        self.proj_out = nn.Linear(D, in_chans)
        for p in self.parameters():  # non-trivial norms and biases
            nn.init.normal_(p, std=0.3 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1]))
        with torch.no_grad():
            for n, p in self.named_parameters():
                if "norm" in n and n.endswith("weight"):
                    p.add_(1.0)

    def forward(self, x, t, ctx, counts, ids):
        N, Tt, _ = x.shape
        half = self.D // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        ang = t.float()[:, None] * freqs[None]
        temb = self.time_proj.linear_2(F.gelu(self.time_proj.linear_1(torch.cat([ang.sin(), ang.cos()], -1))))
        h = torch.cat([temb[:, None], self.proj_in(x)], 1) + self.part_embedding(ids)[:, None]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        skips = []
        for i, blk in enumerate(self.blocks):
            if i > self.depth // 2:
                h = blk.skip_norm(blk.skip_linear(torch.cat([skips.pop(), h], -1)))
            g = i in self.global_ids
            q, k, v = blk.attn1.qkv(blk.norm1(h))
            if g:  # per object: concatenate its parts' tokens (upstream's training loop)
                outs = []
                for s, n in zip(starts, counts):
                    qo, ko, vo = (z[s:s + n].transpose(0, 1).reshape(1, z.shape[1], n * (Tt + 1), -1)
                                  for z in (q, k, v))
                    oo = F.scaled_dot_product_attention(qo, ko, vo)
                    outs.append(oo.reshape(q.shape[1], n, Tt + 1, -1).transpose(0, 1))
                o = torch.cat(outs)
            else:
                o = F.scaled_dot_product_attention(q, k, v)
            h = h + blk.attn1.out(o)
            hn = blk.norm2(h)
            if g:  # first part's condition, queries of all parts of the object
                outs = []
                for s, n in zip(starts, counts):
                    q, k, v = blk.attn2.qkv(hn[s:s + n].reshape(1, n * (Tt + 1), -1), ctx[s:s + 1])
                    outs.append(blk.attn2.out(F.scaled_dot_product_attention(q, k, v)).reshape(n, Tt + 1, -1))
                h = h + torch.cat(outs)
            else:
                q, k, v = blk.attn2.qkv(hn, ctx)
                h = h + blk.attn2.out(F.scaled_dot_product_attention(q, k, v))
            h = h + blk.ff(blk.norm3(h))
            if i < self.depth // 2:
                skips.append(h)
        return self.proj_out(self.norm_out(h)[:, 1:])


def _zoo(**kw):
    return PartCrafterDiT(**dict(TINY, **kw)).eval()


def _loaded(ref, **kw):
    m = _zoo(**kw)
    m.load_state_dict(checkpoint_filter_fn(ref.state_dict(), m))
    return m


def _inputs(counts, seed=0, per_part_ctx=False):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts)
    x = torch.randn(N, T, TINY["in_chans"], generator=g)
    t = torch.rand(len(counts), generator=g) * 1000
    ctx = torch.randn(len(counts), M, TINY["context_dim"], generator=g)
    return x, t, ctx


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return RefPartCrafter(**TINY).eval()


# ------------------------------------------------------------------------------------------------
# against the reference
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_matches_reference_varlen_batch(ref):
    counts = [2, 3, 1]
    x, t, ctx = _inputs(counts)
    c = torch.tensor(counts)
    m = _loaded(ref)
    out = m(x, t, ctx, c)
    ctx_pp = ctx.repeat_interleave(c, 0)  # upstream feeds one condition row per part
    ids = part_ids_for(c, c, "reference")
    expect = ref(x, t.repeat_interleave(c), ctx_pp, counts, ids)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, t, ctx_pp, c), expect, atol=1e-5, rtol=1e-5)  # per-part condition form


@torch.no_grad()
def test_resplit_naive_layout_differs(ref):
    counts = [2, 2]
    x, t, ctx = _inputs(counts, seed=1)
    c = torch.tensor(counts)
    expect = ref(x, t.repeat_interleave(c), ctx.repeat_interleave(c, 0), counts, part_ids_for(c, c))
    m = _loaded(ref)
    torch.testing.assert_close(m(x, t, ctx, c), expect, atol=1e-5, rtol=1e-5)
    naive = _zoo()
    sd = checkpoint_filter_fn(ref.state_dict(), naive)
    sd_ref = ref.state_dict()
    for i in range(TINY["depth"]):  # plain concatenation, no head-major re-split
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd_ref[f"blocks.{i}.attn1.to_{p}.weight"] for p in "qkv"])
        sd[f"blocks.{i}.cross_attn.kv.weight"] = torch.cat([sd_ref[f"blocks.{i}.attn2.to_{p}.weight"] for p in "kv"])
    naive.load_state_dict(sd)
    assert (naive(x, t, ctx, c) - expect).abs().max() > 1e-2


def test_resplit_rows_known_answer_and_fused_form(ref):
    H, hd = 2, 3
    w = torch.arange(3 * H * hd, dtype=torch.float32)[:, None]  # row r holds r: cat([Wq, Wk, Wv]) rows
    out = resplit_rows(w, H, 3).flatten().long().tolist()
    # head-major packing: head 0 uses concat rows 0-2 (q), 3-5 (k), 6-8 (v); head 1 rows 9-11, ...
    assert out == [0, 1, 2, 9, 10, 11, 3, 4, 5, 12, 13, 14, 6, 7, 8, 15, 16, 17]
    torch.testing.assert_close(unresplit_rows(resplit_rows(w, H, 3), H, 3), w)
    sd = ref.state_dict()
    fused = {}
    for k, v in sd.items():
        if ".attn1.to_q." in k:
            fused[k.replace("to_q", "to_qkv")] = torch.cat([v, sd[k.replace("to_q", "to_k")],
                                                             sd[k.replace("to_q", "to_v")]])
        elif ".attn2.to_k." in k:
            fused[k.replace("to_k", "to_kv")] = torch.cat([v, sd[k.replace("to_k", "to_v")]])
        elif not (".attn1.to_k." in k or ".attn1.to_v." in k or ".attn2.to_v." in k):
            fused[k] = v
    a, b = checkpoint_filter_fn(sd, None), checkpoint_filter_fn(fused, None)
    assert a.keys() == b.keys() == _zoo().state_dict().keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    again = checkpoint_filter_fn(a, None)  # already converted: passes through unchanged
    assert again.keys() == a.keys() and all(again[k] is a[k] for k in a)


@torch.no_grad()
def test_reference_part_ids_under_cfg(ref):
    # upstream inference: int num_parts, rows [uncond parts, cond parts] -> ids 0..2n-1
    n = 3
    x, t, ctx = _inputs([n, n], seed=2)
    ctx[0] = 0
    m = _loaded(ref)
    assert part_ids_for(n, torch.tensor([n, n]), "reference").tolist() == [0, 1, 2, 3, 4, 5]
    assert part_ids_for(n, torch.tensor([n, n]), "fixed").tolist() == [0, 1, 2, 0, 1, 2]
    assert part_ids_for(torch.tensor([2, 3]), torch.tensor([2, 3]), "reference").tolist() == [0, 1, 0, 1, 2]
    tt = t[:1].expand(2 * n)
    expect = ref(x, tt, ctx.repeat_interleave(n, 0), [n, n], torch.arange(2 * n))
    torch.testing.assert_close(m(x, tt, ctx, n), expect, atol=1e-5, rtol=1e-5)
    fixed = _loaded(ref, part_id_mode="fixed")
    torch.testing.assert_close(fixed(x, tt, ctx, n), m(x, tt, ctx, torch.tensor([n, n])), atol=1e-6, rtol=1e-6)
    assert (fixed(x, tt, ctx, n) - expect).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# known answers of the hierarchical attention
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_single_part_global_equals_local():
    torch.manual_seed(1)
    g = _zoo()
    loc = _zoo(global_block_ids=())
    loc.load_state_dict(g.state_dict())
    x, t, ctx = _inputs([1, 1, 1], seed=3)
    c = torch.tensor([1, 1, 1])
    torch.testing.assert_close(g(x, t, ctx, c), loc(x, t, ctx, c), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_all_local_no_leakage():
    torch.manual_seed(2)
    m = _zoo(global_block_ids=())
    counts = torch.tensor([2, 1])
    x, t, ctx = _inputs([2, 1], seed=4)
    ids = part_ids_for(counts, counts)
    out = m(x, t, ctx, counts)
    tp, cp = t.repeat_interleave(counts), ctx.repeat_interleave(counts, 0)
    for i in range(3):  # each part alone, as its own object, with the same id and condition
        alone = m(x[i:i + 1], tp[i:i + 1], cp[i:i + 1], torch.tensor([1]), part_ids=ids[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # and a global model does leak: changing part 0 changes part 1's output
    gm = _zoo()
    x2 = x.clone()
    x2[0] += 1
    assert (gm(x, t, ctx, counts)[1] - gm(x2, t, ctx, counts)[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], m(x2, t, ctx, counts)[1])


@torch.no_grad()
def test_global_cross_attention_equals_local():
    torch.manual_seed(3)
    attn = CrossAttention(64, 16, 4).eval()
    counts = torch.tensor([2, 3])
    packed = PackedParts(counts, T + 1)
    x = torch.randn(1, 5 * (T + 1), 64)
    ctx = torch.randn(2, M, 16)
    per_object = attn(x, ctx.reshape(1, -1, 16), packed.cross_layout(M, "object"))
    per_part = attn(x, ctx.repeat_interleave(counts, 0).reshape(1, -1, 16), packed.cross_layout(M, "part"))
    torch.testing.assert_close(per_object, per_part, atol=1e-6, rtol=1e-6)
    # and the same as each part attending its own copy densely, one part at a time
    for p in range(5):
        o = int(packed.part_object[p])
        alone = attn(x[:, p * (T + 1):(p + 1) * (T + 1)], ctx[o:o + 1])
        torch.testing.assert_close(per_object[:, p * (T + 1):(p + 1) * (T + 1)], alone, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_varlen_batch_equals_per_object():
    torch.manual_seed(4)
    m = _zoo()
    counts = torch.tensor([2, 3])
    x, t, ctx = _inputs([2, 3], seed=5)
    out = m(x, t, ctx, counts)
    torch.testing.assert_close(out[:2], m(x[:2], t[:1], ctx[:1], torch.tensor([2])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], m(x[2:], t[1:], ctx[1:], torch.tensor([3])), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_permuting_parts_with_ids_permutes_outputs():
    torch.manual_seed(5)
    m = _zoo()
    counts = torch.tensor([3, 2])
    x, t, ctx = _inputs([3, 2], seed=6)
    ids = part_ids_for(counts, counts)
    perm = torch.tensor([2, 0, 1, 4, 3])  # within each object
    out = m(x, t, ctx, counts, part_ids=ids)
    out_p = m(x[perm], t, ctx, counts, part_ids=ids[perm])
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)
    # permuting parts but not their ids changes the result (the ids matter)
    assert (m(x[perm], t, ctx, counts, part_ids=ids) - out[perm]).abs().max() > 1e-4


@torch.no_grad()
def test_skip_wiring_known_answer():
    torch.manual_seed(6)
    D = 32
    blk = DiTBlock(D, 4, 16, skip=True).eval()
    plain = DiTBlock(D, 4, 16, skip=False).eval()
    plain.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("skip_")})
    with torch.no_grad():
        blk.skip_norm.weight.normal_().add_(1.0)
        blk.skip_norm.bias.normal_()
    h, s, ctx = torch.randn(1, 10, D), torch.randn(1, 10, D), torch.randn(1, 4, 16)
    eye, zero = torch.eye(D), torch.zeros(D, D)

    def fused(w):  # skip fusion with Linear weight w and zero bias
        with torch.no_grad():
            blk.skip_linear.weight.copy_(w)
            blk.skip_linear.bias.zero_()
        return blk(h, ctx, skip=s)

    ln = lambda z: F.layer_norm(z, (D,), blk.skip_norm.weight, blk.skip_norm.bias, 1e-5)  # noqa: E731
    # [skip, h] order, Linear then LayerNorm
    torch.testing.assert_close(fused(torch.cat([zero, eye], 1)), plain(ln(h), ctx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused(torch.cat([eye, zero], 1)), plain(ln(s), ctx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused(torch.cat([eye, eye], 1)), plain(ln(s + h), ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="skip"):
        blk(h, ctx)


# ------------------------------------------------------------------------------------------------
# model conventions
# ------------------------------------------------------------------------------------------------
def test_backward_all_params_and_grad_checkpointing():
    torch.manual_seed(7)
    m = _zoo()
    counts = torch.tensor([2, 1])
    x, t, ctx = _inputs([2, 1], seed=7)
    out = m(x, t, ctx, counts)
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    m.set_grad_checkpointing(True)
    torch.testing.assert_close(m(x, t, ctx, counts), out, atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    m = _zoo()
    x, t, ctx = _inputs([2, 3])
    with pytest.raises(ValueError, match="sum to"):
        m(x, t, ctx, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="must divide"):
        m(x, t, ctx, 2)
    with pytest.raises(ValueError, match="one per object"):
        m(x, t, torch.randn(3, M, 16), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="max_num_parts"):
        m(torch.randn(40, T, 8), torch.zeros(()), torch.randn(1, M, 16), 40)
    with pytest.raises(ValueError, match="part_id_mode"):
        _zoo(part_id_mode="shifted")


def test_registered_models_and_meta_param_count():
    assert {"partcrafter_dit", "partcrafter_dit_small", "partcrafter_dit_tiny"} <= set(timm.list_models("partcrafter*"))
    with torch.device("meta"):
        full = timm.create_model("partcrafter_dit")
    assert sum(p.numel() for p in full.parameters()) == 1_439_621_696
    assert full.global_block_ids == tuple(range(0, 21, 2))
    assert sum(b.skip_linear is not None for b in full.blocks) == 10
    m = timm.create_model("partcrafter_dit_tiny")
    assert m(torch.randn(3, 4, 8), torch.tensor(10.0), torch.randn(1, 5, 16), 3).shape == (3, 4, 8)


# ------------------------------------------------------------------------------------------------
# timm generic calls, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------
def test_cfg_describes_inputs_and_generic_calls_raise_documented_error():
    """No ImageNet fields or 1000 classes in the cfg; timm's image / classifier calls raise the
    documented error naming what to use instead."""
    from timm.data import resolve_data_config

    cfg = timm.get_pretrained_cfg("partcrafter_dit_tiny").to_dict()
    assert not {"input_size", "mean", "std", "interpolation", "crop_pct", "num_classes"} & set(cfg)
    assert cfg["first_conv"] is None and cfg["classifier"] is None
    assert any("example_inputs" in n for n in cfg["notes"])
    m = timm.create_model("partcrafter_dit_tiny")
    assert m.num_classes == 0
    calls = dict(data_config=lambda: resolve_data_config({}, model=m), reset=lambda: m.reset_classifier(10),
                 get=m.get_classifier, inter=lambda: m.forward_intermediates(torch.randn(2, 4, 8)),
                 prune=lambda: m.prune_intermediate_layers(1),
                 features=lambda: timm.create_model("partcrafter_dit_tiny", features_only=True),
                 classes=lambda: timm.create_model("partcrafter_dit_tiny", num_classes=5),
                 script=lambda: torch.jit.script(m))
    for name, call in calls.items():
        with pytest.raises(UnsupportedError, match="example_inputs|torch.compile|part_generation"):
            call()


def test_python_part_counts_equal_tensor_counts():
    """num_parts as Python ints (static packing, what example_inputs gives) computes exactly what
    the tensor form does, for per-object counts and for an int under both part-id rules."""
    m = _zoo().eval()
    counts = [2, 3, 1]
    x, t, ctx = _inputs(counts)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, ctx, counts), m(x, t, ctx, torch.tensor(counts)), rtol=0, atol=0)
        x2, t2, ctx2 = _inputs([2, 2])
        assert part_ids_for(2, [2, 2]).tolist() == part_ids_for(2, torch.tensor([2, 2])).tolist() == [0, 1, 2, 3]
        c2 = torch.tensor([2, 2])
        assert part_ids_for([2, 2], [2, 2]).tolist() == part_ids_for(c2, c2).tolist() == [0, 1, 0, 1]
        torch.testing.assert_close(m(x2, t2, ctx2, 2), m(x2, t2, ctx2, torch.tensor([2, 2]), part_ids=torch.arange(4)),
                                   rtol=0, atol=0)
        fixed = _zoo(part_id_mode="fixed")
        fixed.load_state_dict(m.state_dict())
        torch.testing.assert_close(fixed(x2, t2, ctx2, 2), fixed(x2, t2, ctx2, torch.tensor([2, 2])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sum to the number of part rows"):
        m(x, t, ctx, [2, 3])
    ex = m.example_inputs(2, num_parts=3, tokens_per_part=4, context_tokens=5)
    assert ex["num_parts"] == [3, 3] and m(**ex).shape == (6, 4, TINY["in_chans"])


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True (0 graph breaks) on example_inputs, eval and train with a backward: output and
    parameter gradients equal eager's."""
    m = _zoo()
    assert_compiled_matches_eager(m, m.example_inputs(2, num_parts=2, tokens_per_part=6, context_tokens=5), min_grads=20)


def test_torch_export_matches_eager():
    m = _zoo().eval()
    ex = m.example_inputs(2, num_parts=2, tokens_per_part=6, context_tokens=5)
    ep = torch.export.export(m, (), ex)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**ex), m(**ex), rtol=1e-4, atol=1e-5)
