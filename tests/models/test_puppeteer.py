"""Puppeteer: hop distances, TAJA on the kernel vs upstream's dense math, the skinning network vs a
reference module with upstream's key layout, PointEmbed, the joint tokenizer, the OPT decoder's
KV cache, generation validity, checkpoint filtering, and the rigging engine glue."""
import math
import os.path as osp

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from _compile_check import assert_compiled_matches_eager
import zoo  # noqa: F401
import zoo.kernels as K
from zoo.errors import UnsupportedError
from zoo.layers.joint_attention import (PointEmbed, TopologyBias, hop_bias_index, joint_hop_distance)
from zoo.models._builder import check_state_dict
from zoo.models.puppeteer import (BOS, EOS, PuppeteerSkeletonGPT, PuppeteerSkinNet, checkpoint_filter_fn,
                                  detokenize_skeleton, skeleton_input, tokenize_skeleton)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TREE5 = [-1, 0, 1, 1, 3]
TREE5_DIST = [[0, 1, 2, 2, 3], [1, 0, 1, 1, 2], [2, 1, 0, 2, 3], [2, 1, 2, 0, 1], [3, 2, 3, 1, 0]]


def _scipy_dist(parents, n):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path
    a = np.zeros((n, n))
    for c, p in enumerate(parents):
        if p >= 0:
            a[c, p] = a[p, c] = 1
    return shortest_path(csr_matrix(a), unweighted=True, directed=False)


# ------------------------------------------------------------------------------------------------
# hop distances and TAJA
# ------------------------------------------------------------------------------------------------
def test_hop_distance_five_joint_tree_and_padding():
    par = torch.tensor(TREE5)
    torch.testing.assert_close(joint_hop_distance(par), torch.tensor(TREE5_DIST, dtype=torch.float32))
    assert joint_hop_distance(par)[2, 4] == 3
    # batch: padded to 7, second item a forest (two roots) with a padded tail
    parents = torch.tensor([TREE5 + [-1, -1], [-1, 0, 0, -1, 3, -1, -1]])
    valid = torch.tensor([[1] * 5 + [0] * 2, [1] * 5 + [0] * 2]).bool()
    d = joint_hop_distance(parents, valid)
    torch.testing.assert_close(d[0, :5, :5], torch.tensor(TREE5_DIST, dtype=torch.float32))
    assert torch.isinf(d[0, 5, :5]).all() and d[0, 5, 5] == 0
    ref = _scipy_dist([-1, 0, 0, -1, 3], 5)
    np.testing.assert_array_equal(d[1, :5, :5].numpy(), ref.astype(np.float32))
    idx = hop_bias_index(d, valid)
    assert idx[1, 0, 3] == 9 and idx[1, 0, 4] == 9  # unreachable -> 9
    assert (idx[0, 5:, :] == 10).all() and (idx[0, :, 5:] == 10).all()  # pairs with a padded joint -> zero column
    assert torch.equal(idx, idx.transpose(1, 2))


def test_hop_distance_long_chain_clamps_and_matches_scipy():
    n = 80  # no 70-joint limit
    rng = np.random.RandomState(0)
    parents = [-1] + [int(rng.randint(0, i)) for i in range(1, n)]
    d = joint_hop_distance(torch.tensor(parents))
    np.testing.assert_array_equal(d.numpy(), _scipy_dist(parents, n).astype(np.float32))
    chain = torch.tensor([-1] + list(range(14)))
    idx = hop_bias_index(joint_hop_distance(chain[None], max_hops=9), None)
    assert idx[0, 0, 14] == 9 and idx[0, 0, 9] == 9 and idx[0, 0, 8] == 8
    with pytest.raises(ValueError, match="parent indices"):
        joint_hop_distance(torch.tensor([-1, 5]))


def _ref_attention(x, ctx, wq, wkv, wo, bo, heads, query_mask=None, context_mask=None, rel_pos=None):
    """Upstream Attention math: (b h) einsum, scale dim_head^-0.5, bias after scaling, -finfo.max fills."""
    B, L, _ = x.shape
    q = x @ wq.t()
    k, v = (ctx @ wkv.t()).chunk(2, dim=-1)
    q, k, v = (t.reshape(B, t.shape[1], heads, -1).permute(0, 2, 1, 3).reshape(B * heads, t.shape[1], -1)
               for t in (q, k, v))
    sim = torch.einsum("bid,bjd->bij", q, k) * q.shape[-1] ** -0.5
    if rel_pos is not None:  # (b, i, j, h) -> (b h, i, j)
        sim = sim + rel_pos.permute(0, 3, 1, 2).reshape(B * heads, L, -1)
    fill = -torch.finfo(sim.dtype).max
    if query_mask is not None:
        sim = sim.masked_fill(~query_mask.repeat_interleave(heads, 0)[:, :, None], fill)
    if context_mask is not None:
        sim = sim.masked_fill(~context_mask.repeat_interleave(heads, 0)[:, None, :], fill)
    out = torch.einsum("bij,bjd->bid", sim.softmax(-1), v)
    out = out.reshape(B, heads, L, -1).permute(0, 2, 1, 3).reshape(B, L, -1)
    return out @ wo.t() + bo


def _ref_rel_pos(emb, proj_w, proj_b, scale, graph_dist, valid):
    pair = valid[:, None, :] & valid[:, :, None]
    d = torch.where(pair, graph_dist, torch.zeros_like(graph_dist)).clamp(0, 9).long()
    r = (emb[d] @ proj_w.t() + proj_b) * scale
    return torch.where(pair[..., None], r, torch.zeros_like(r))


def test_taja_indexed_bias_matches_dense_reference():
    torch.manual_seed(0)
    B, N, dim, heads, dh = 2, 7, 32, 2, 8
    parents = torch.tensor([TREE5 + [-1, -1], [-1, 0, 1, -1, -1, -1, -1]])
    valid = torch.tensor([[1] * 5 + [0] * 2, [1] * 3 + [0] * 4]).bool()
    dist = joint_hop_distance(parents, valid)
    topo = TopologyBias(dim, heads).double()
    with torch.no_grad():
        topo.rel_pos_scale.fill_(0.7)
    q, k, v = (torch.randn(B, heads, N, dh, dtype=torch.float64) for _ in range(3))
    bias = K.IndexedBias(topo.table(), hop_bias_index(dist, valid))
    layout = K.segments(torch.zeros(B, N, dtype=torch.long), torch.where(valid, 0, -1).long())
    out = K.attention(q, k, v, layout, scale=1 / 8 ** 0.5, bias=bias)
    # dense reference: logits * dh^-0.5 + bias, then -finfo.max on invalid keys
    rel = _ref_rel_pos(topo.rel_pos_embedding.weight, topo.rel_pos_proj.weight, topo.rel_pos_proj.bias,
                       topo.rel_pos_scale, dist.double(), valid)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * dh ** -0.5 + rel.permute(0, 3, 1, 2)
    logits = logits.masked_fill(~valid[:, None, None, :], -torch.finfo(logits.dtype).max)
    ref = logits.softmax(-1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)  # every row, padded queries included
    assert torch.equal(rel, rel.transpose(1, 2))  # symmetric bias
    # gradient reaches the table's parameters through the op
    out.sum().backward()
    assert topo.rel_pos_embedding.weight.grad.abs().sum() > 0 and topo.rel_pos_scale.grad is not None


# ------------------------------------------------------------------------------------------------
# reference skinning network with upstream's key layout (for the oracle and checkpoint filter)
# ------------------------------------------------------------------------------------------------
class _RefPointEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        basis = torch.zeros(6, 24)
        for i in range(6):
            basis[i, 4 * i:4 * i + 4] = torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi
        self.register_buffer("basis", basis)
        self.mlp = nn.Linear(54, dim)

    def forward(self, x):
        e = torch.einsum("bnd,de->bne", x, self.basis)
        return self.mlp(torch.cat([e.sin(), e.cos(), x], dim=2))


class _RefAttn(nn.Module):
    def __init__(self, dim, heads, dh):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * dh, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dh, bias=False)
        self.to_out = nn.Linear(heads * dh, dim)

    def forward(self, x, context, **kw):
        return _ref_attention(x, context, self.to_q.weight, self.to_kv.weight, self.to_out.weight, self.to_out.bias,
                              self.heads, **kw)


class _RefPreNorm(nn.Module):
    def __init__(self, dim, fn, ctx=False):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if ctx else None

    def forward(self, x, context=None, **kw):
        if self.norm_context is not None:
            return self.fn(self.norm(x), self.norm_context(context), **kw)
        return self.fn(self.norm(x))


class _RefFF(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        a, g = self.net[0](x).chunk(2, dim=-1)
        return self.net[2](a * F.gelu(g))


class _RefBlock(nn.Module):
    def __init__(self, dim, heads, dh, mult):
        super().__init__()
        for n in ("self_attn_j", "cross_attn_ps", "cross_attn_js", "cross_attn_jp", "cross_attn_pj"):
            setattr(self, n, _RefPreNorm(dim, _RefAttn(dim, heads, dh), ctx=True))
        for n in ("ff_j", "ff_ps", "ff_js", "ff_jp", "ff_pj"):
            setattr(self, n, _RefPreNorm(dim, _RefFF(dim, mult)))
        self.rel_pos_embedding = nn.Embedding(10, dim // 4)
        self.rel_pos_proj = nn.Linear(dim // 4, heads)
        self.rel_pos_scale = nn.Parameter(torch.ones(1) * 0.1)

    def forward(self, p, j, s, valid, dist):
        rel = _ref_rel_pos(self.rel_pos_embedding.weight, self.rel_pos_proj.weight, self.rel_pos_proj.bias,
                           self.rel_pos_scale, dist, valid)
        j = self.self_attn_j(j, context=j, context_mask=valid, rel_pos=rel) + j
        j = self.ff_j(j) + j
        p = self.cross_attn_ps(p, context=s) + p
        p = self.ff_ps(p) + p
        j = self.cross_attn_js(j, context=s, query_mask=valid) + j
        j = self.ff_js(j) + j
        j = self.cross_attn_jp(j, context=p, query_mask=valid) + j
        j = self.ff_jp(j) + j
        p = self.cross_attn_pj(p, context=j, context_mask=valid) + p
        p = self.ff_pj(p) + p
        return p, j


class _RefSkinNet(nn.Module):
    def __init__(self, dim=32, depth=2, heads=2, dh=8, mult=4, part_dim=12):
        super().__init__()
        self.skeleton_condition = _RefPointEmbed(dim)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.point_embed_pe = _RefPointEmbed(dim)
        self.proj = nn.Sequential(nn.Linear(part_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_RefBlock(dim, heads, dh, mult) for _ in range(depth))

    def forward(self, points, feats, skel, shape, dist, valid):
        p = self.proj(feats) + self.point_embed_pe(points)
        j = self.skeleton_condition(skel)
        for blk in self.blocks:
            p, j = blk(p, j, shape, valid, dist)
        score = (self.scale.abs() + 1e-9) * torch.einsum("bid,bjd->bij", F.normalize(p, dim=-1), F.normalize(j, dim=-1))
        return score.softmax(-1)


def _skin_inputs(B=2, Np=16, N=7, Ns=9, dim=32, part_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(B, Np, 6, generator=g) - 0.5
    feats = torch.randn(B, Np, part_dim, generator=g)
    joints = torch.rand(B, N, 3, generator=g) - 0.5
    parents = torch.tensor([TREE5 + [-1, -1], [-1, 0, 0, 2, -1, -1, -1]])
    valid = torch.tensor([[1] * 5 + [0] * 2, [1] * 4 + [0] * 3]).bool()
    joints = joints * valid[..., None]
    shape = torch.randn(B, Ns, dim, generator=g)
    return points, feats, skeleton_input(joints, parents), shape, parents, valid


def _upstream_state_dict(ref):
    sd = dict(ref.state_dict())
    sd["point_encoder.encoder.weight"] = torch.zeros(3)  # frozen Michelangelo, PartField: dropped by the filter
    sd["point_embed.triplane.weight"] = torch.zeros(3)
    return {"model": sd}


def test_skinning_network_matches_reference_and_loads_upstream_keys():
    torch.manual_seed(0)
    ref = _RefSkinNet().eval()
    for p in ref.parameters():  # non-trivial norms / scales
        p.data.add_(0.05 * torch.randn_like(p))
    model = PuppeteerSkinNet(dim=32, depth=2, heads=2, dim_head=8, ff_mult=4, part_dim=12).eval()
    sd = checkpoint_filter_fn(_upstream_state_dict(ref), model)
    check_state_dict(sd, model)
    model.load_state_dict(sd)
    points, feats, skel, shape, parents, valid = _skin_inputs()
    dist = torch.from_numpy(np.stack([_scipy_dist(p.tolist(), 7) for p in parents])).float()
    with torch.no_grad():
        want = ref(points, feats, skel, shape, dist, valid)
        got = model(points, skel, shape, valid, parents=parents, point_feats=feats)
        got_dist = model(points, skel, shape, valid, hop_dist=dist, point_feats=feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # padded columns too (reference padding)
    torch.testing.assert_close(got_dist, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 16))
    assert (got[0, :, 5:] > 0).all()  # upstream's softmax leaves mass on padded joints
    # without reference padding: padded columns are 0 and the valid columns equal the renormalised reference
    model.reference_padding = False
    with torch.no_grad():
        masked = model(points, skel, shape, valid, parents=parents, point_feats=feats)
    torch.testing.assert_close(masked.sum(-1), torch.ones(2, 16))
    assert (masked[0, :, 5:] == 0).all() and (masked[1, :, 4:] == 0).all()
    for b, n in ((0, 5), (1, 4)):
        torch.testing.assert_close(masked[b, :, :n], want[b, :, :n] / want[b, :, :n].sum(-1, keepdim=True),
                                   rtol=1e-5, atol=1e-6)


def test_skinning_gradients_and_checkpointing():
    model = timm.create_model("puppeteer_skin_small").train()
    points, _, skel, _, parents, valid = _skin_inputs(dim=64)
    shape = torch.rand(2, 9, 6) - 0.5
    w = model(points, skel, shape, valid, parents=parents)
    (w[..., 0].sum() + w.std()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        a = model(points, skel, shape, valid, parents=parents)
        model.set_grad_checkpointing(True)
        b = model(points, skel, shape, valid, parents=parents)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="shape must be"):
        model(points, skel, torch.randn(2, 9, 64), valid, parents=parents)
    with pytest.raises(ValueError, match="parents"):
        model(points, skel, shape, valid)
    with pytest.raises(UnsupportedError, match="not an image classifier"):
        timm.create_model("puppeteer_skin_small", num_classes=10)


def test_point_embed_known_answer():
    pe = PointEmbed(48, 16)
    for i in range(6):
        row = pe.basis[i]
        torch.testing.assert_close(row[4 * i:4 * i + 4], torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi)
        assert row.count_nonzero() == 4
    out = pe(torch.zeros(1, 1, 6))
    feat = torch.cat([torch.zeros(24), torch.ones(24), torch.zeros(6)])
    torch.testing.assert_close(out[0, 0], pe.mlp(feat))
    x = torch.tensor([[[0.25, 0, 0, 0, 0, 0]]])
    z = pe.mlp.weight.new_zeros(54)
    z[0:4] = torch.sin(torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi * 0.25)
    z[24:48] = 1.0
    z[24:28] = torch.cos(torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi * 0.25)
    z[48] = 0.25
    torch.testing.assert_close(pe(x)[0, 0], pe.mlp(z))


# ------------------------------------------------------------------------------------------------
# skeleton tokenizer and decoder
# ------------------------------------------------------------------------------------------------
def test_tokenizer_round_trip():
    g = torch.Generator().manual_seed(0)
    n = 20
    joints = torch.rand(n, 3, generator=g) - 0.5
    joints[0] = torch.tensor([-0.5, 0.5, 0.0])  # the edges
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
    tok = tokenize_skeleton(joints, parents)
    assert tok[0] == BOS and tok[-1] == EOS and tok.numel() == 4 * n + 2
    assert int(tok[1:-1].max()) < 131 and int(tok[1:-1].min()) >= 3
    assert tok[4] == 3  # root parent token
    back_j, back_p = detokenize_skeleton(tok)
    assert torch.equal(back_p, parents)
    err = joints - back_j  # lower bin edges: 0 <= err <= 1/128
    assert float(err.min()) >= 0 and float(err.max()) <= 1 / 128 + 1e-7
    bones = {(int(p), c) for c, p in enumerate(back_p) if p >= 0}
    assert bones == {(int(parents[c]), c) for c in range(1, n)}
    assert detokenize_skeleton(tok[:-2]) is None  # body not a multiple of 4
    bad = tok.clone()
    bad[4 + 4] = 3 + 1 + 50  # parent index beyond the joints
    assert detokenize_skeleton(bad) is None
    with pytest.raises(ValueError, match="parent"):
        tokenize_skeleton(joints[:3], torch.tensor([-1, 2, 0]))


def _tiny_gpt(**kw):
    torch.manual_seed(0)
    args = dict(dim=32, depth=2, num_heads=4, ffn_dim=64, max_joints=8, cond_len=5, cond_dim=12, dropout=0.0)
    args.update(kw)
    m = PuppeteerSkeletonGPT(**args).eval()
    with torch.no_grad():  # make the slot / type / target rows matter
        m.decoder.token_embed_positions.weight.normal_()
        m.decoder.cond_embed.weight.normal_()
        m.target_aware_pos_embed.normal_()
    return m


def test_slot_and_target_rows():
    m = _tiny_gpt()
    ids = torch.tensor([[BOS, 10, 11, 12, 3, 20, 21, 22, 4, EOS]])
    x = m.embed_generated(ids)
    slots = [0, 3, 4, 5, 6, 3, 4, 5, 6, 1]
    rows = [None, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    d = m.decoder
    for t, (s, r) in enumerate(zip(slots, rows)):
        want = d.embed_tokens.weight[ids[0, t]] + d.token_embed_positions.weight[s] + d.cond_embed.weight[1]
        if r is not None:
            want = want + m.target_aware_pos_embed[0, r]
        torch.testing.assert_close(x[0, t], want)


def test_full_sequence_equals_cached_decoding():
    m = _tiny_gpt()
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 5, 12, generator=g)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, 131, (2, 12), generator=g)], 1)
    with torch.no_grad():
        full = m(cond, ids)  # (2, 5 + 13, vocab)
        last, cache = m.prefill(cond)
        steps = [last]
        for t in range(ids.shape[1]):
            lg, cache = m.step(ids[:, t:t + 1], t, cache)
            steps.append(lg[:, -1])
        chunk_a, cache2 = m.prefill(cond)
        two, cache2 = m.step(ids[:, :7], 0, cache2)  # several tokens per step
        rest, _ = m.step(ids[:, 7:], 7, cache2)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([two, rest], 1), full[:, 5:], rtol=1e-5, atol=1e-5)
    # the attention is causal: a later token never changes earlier logits
    with torch.no_grad():
        ids2 = ids.clone()
        ids2[:, -1] = 7
        torch.testing.assert_close(m(cond, ids2)[:, :-1], full[:, :-1])
        # a key-padding mask hides a padded token from everything after it
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 3] = False
        assert not torch.allclose(m(cond, ids, attention_mask=mask)[:, 9:], full[:, 9:])


def test_generation_gives_valid_trees():
    m = _tiny_gpt(max_joints=3)
    cond = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    greedy = m.generate(cond)
    assert (greedy[:, 0] == BOS).all()
    # greedy decoding with the cache equals argmax of the masked full-sequence logits
    with torch.no_grad():
        full = m(cond, greedy[:, :-1])[:, 4:]
    for t in range(greedy.shape[1]):
        lg = full[:, t].masked_fill(~m._allowed(t, 2, cond.device, 1), float("-inf"))
        live = torch.ones(2, dtype=torch.bool) if t == 0 else ~(greedy[:, :t] == EOS).any(1)
        assert torch.equal(lg.argmax(-1)[live], greedy[live, t])
    sampled = m.generate(cond, do_sample=True, top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(0))
    for row in list(greedy) + list(sampled):
        dec = detokenize_skeleton(row)
        assert dec is not None
        joints, parents = dec
        assert 1 <= len(parents) <= m.max_joints
        assert parents[0] == -1 and all(0 <= int(p) < i for i, p in enumerate(parents.tolist()) if i > 0)
        assert float(joints.min()) >= -0.5 and float(joints.max()) < 0.5


def test_skeleton_checkpoint_filter_and_pretrained_file(tmp_path):
    m = _tiny_gpt()
    up = {}
    for k, v in m.state_dict().items():  # upstream layout: transformer.model.decoder.*, transformer.lm_head
        if k.startswith("decoder."):
            k = "transformer.model." + k
        elif k.startswith("lm_head."):
            k = "transformer." + k
        up[k] = v.clone()
    up["point_encoder.model.weight"] = torch.zeros(2)
    sd = checkpoint_filter_fn({"model": up}, m)
    check_state_dict(sd, m)
    path = tmp_path / "puppeteer_skeleton.pth"
    torch.save({"model": up}, path)
    m2 = timm.create_model("puppeteer_skeleton_small", pretrained=True, dim=32, depth=2, num_heads=4, ffn_dim=64,
                           max_joints=8, cond_len=5, cond_dim=12, pretrained_cfg_overlay=dict(file=str(path)))
    cond = torch.randn(1, 5, 12)
    ids = torch.tensor([[BOS, 50, 60, 70, 3]])
    with torch.no_grad():
        torch.testing.assert_close(m2.eval()(cond, ids), m(cond, ids))
    assert m2.lm_head.weight is m2.decoder.embed_tokens.weight


def test_registered_models_and_meta_sizes():
    names = set(zoo.list_models(family="puppeteer"))
    assert names == {"puppeteer_skin_d1", "puppeteer_skin_d2", "puppeteer_skin_small", "puppeteer_skeleton_opt350m",
                     "puppeteer_skeleton_small"}
    with torch.device("meta"):
        big = timm.create_model("puppeteer_skeleton_opt350m")
        skin = timm.create_model("puppeteer_skin_d1")
    assert big.max_length == 663 and big.vocab_size == 131 and big.decoder.embed_positions.weight.shape[0] == 665
    assert big.decoder.token_embed_positions.weight.shape[0] == 7 and big.target_aware_pos_embed.shape == (1, 101, 1024)
    assert len(big.decoder.layers) == 24 and big.decoder.layers[0].fc1.out_features == 4096
    attn = skin.blocks[0].cross_attn_ps.fn
    assert attn.to_q.out_features == 512 and attn.to_out.out_features == 768
    assert skin.blocks[0].taja.rel_pos_embedding.weight.shape == (10, 192)
    small = timm.create_model("puppeteer_skeleton_small").train()
    cond = torch.randn(2, 9, 32)
    ids = torch.tensor([[BOS, 5, 6, 7, 3, EOS], [BOS, 9, 9, 9, 3, EOS]])
    small.loss(cond, ids).backward()
    assert all(p.grad is not None for p in small.parameters())


# ------------------------------------------------------------------------------------------------
# engine glue
# ------------------------------------------------------------------------------------------------
_SMALL_INPUTS = dict(puppeteer_skin_small=dict(num_points=32, num_joints=6, shape_tokens=16),
                     puppeteer_skeleton_small=dict(num_tokens=9))


@pytest.mark.parametrize("name", list(_SMALL_INPUTS))
def test_cfg_and_generic_calls_raise_documented_error(name):
    """No ImageNet fields in the cfg; timm's image / classifier calls raise the documented error
    naming what to use instead (never ImageNet defaults or AttributeError)."""
    from timm.data import resolve_data_config

    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert not {"input_size", "mean", "std", "interpolation", "crop_pct", "num_classes"} & set(cfg)
    m = timm.create_model(name)
    calls = [lambda: resolve_data_config({}, model=m), lambda: m.reset_classifier(3), m.get_classifier,
             lambda: m.forward_intermediates(torch.randn(1, 4, 6)), lambda: m.prune_intermediate_layers(1),
             lambda: timm.create_model(name, features_only=True), lambda: torch.jit.script(m)]
    for call in calls:
        with pytest.raises(UnsupportedError, match="example_inputs|torch.compile|rigging"):
            call()


def test_traced_hop_distance_equals_eager():
    """The hop-distance BFS has no data-dependent control flow left for a tracer: compiled with
    fullgraph it gives eager's distances (padded joints included)."""
    parents = torch.tensor([[-1, 0, 1, 1, 3, 0], [-1, 0, 0, 2, -1, -1]])
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    fn = torch.compile(joint_hop_distance, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(parents, valid, max_hops=9), joint_hop_distance(parents, valid, max_hops=9))
    torch.testing.assert_close(joint_hop_distance(parents[0, :5]), torch.tensor(TREE5_DIST, dtype=torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_SMALL_INPUTS))
def test_torch_compile_fullgraph_matches_eager(name):
    """fullgraph=True (0 graph breaks) on example_inputs, eval and train with a backward: output and
    parameter gradients equal eager's."""
    torch.manual_seed(0)
    m = timm.create_model(name)
    assert_compiled_matches_eager(m, m.example_inputs(2, **_SMALL_INPUTS[name]), min_grads=10)


@pytest.mark.parametrize("name", list(_SMALL_INPUTS))
def test_torch_export_matches_eager(name):
    torch.manual_seed(0)
    m = timm.create_model(name).eval()
    ex = m.example_inputs(1, **_SMALL_INPUTS[name])
    ep = torch.export.export(m, (), ex)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**ex), m(**ex), rtol=1e-4, atol=1e-5)
