"""Sparsifiner benchmark: counted MHSA FLOPs at a keep rate, and CPU wall time of the attention.

    python tools/experiments/sparsifiner_sparsity.py [--keep 0.25] [--batch 8] [--rounds 5] [--json out.json]

FLOPs are counted from the shapes and the *measured* masks of sparsifiner_deit_small_patch16_224 at
224 px (1 multiply-add = 2 FLOPs): q k^T and attn @ v over the kept pairs only, with and without
the connectivity predictor's own cost. Times: every variant interleaved in one process by the loop
of tools/benchmark.py (``--rounds`` rounds of ``--iters`` calls, medians), torch.set_num_threads(2):
  core   - the attention op on the model's q, k, v (B, 6, 197, 64; strided views of the packed qkv
           projection), heads merged to (B, 197, 384) as the output projection needs them: dense
           SDPA (zoo.kernels.attention, layout=None) vs the model's key-lists layout built per call
           (logits only at kept pairs, CSR kernels; its output is already in merged order) vs the
           same pattern as a dense mask (from_dense_mask) vs kept-only gather (routed_topk with
           region_size 1); forward, and forward+backward with --train. core_key_lists_contiguous:
           the same op with a prebuilt layout and contiguous (B, H, N, D) inputs;
  module - one whole attention layer (qkv, predictor, attention, proj), dense mode vs sparse mode.
"""
import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

import zoo  # noqa: F401
from zoo.kernels import attention, from_dense_mask, key_lists, routed_topk
from zoo.layers.connectivity import keep_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import measure  # noqa: E402  (the shared timing loop)


def count_flops(N, H, D, keep, mask=None, c=32, n=32, coef_topk=8):
    """FLOPs of one layer's attention (per image). `mask` (1, H, N, N) gives the kept pairs."""
    dense_pairs = H * N * N
    kept = int(mask.sum()) if mask is not None else H * (N + (N - 1) * keep_count(keep, N))
    attn = lambda pairs: 2 * 2 * pairs * D               # q k^T + attn @ v, 2 FLOPs per MAC
    predictor = 2 * (2 * H * N * D * c                   # channel projections of q and k
                     + H * c * N * n                     # token projection of k
                     + H * (N - 1) * c * n               # q' k_low
                     + H * (N - 1) * coef_topk * N)      # sparse coef @ basis
    return dict(dense=attn(dense_pairs), sparse_core=attn(kept), predictor=predictor,
                sparse_total=attn(kept) + predictor, density=kept / dense_pairs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gather", action="store_true", help="skip the (slow) kept-only gather variant")
    ap.add_argument("--train", action="store_true", help="also time forward+backward of the op")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model("sparsifiner_deit_small_patch16_224", keep_rate=args.keep).eval()
    attn_mod = model.blocks[0].attn
    B, H, N, D = args.batch, attn_mod.num_heads, 197, attn_mod.head_dim
    x = torch.randn(B, N, attn_mod.qkv.in_features)
    with torch.no_grad():
        q, k, v = attn_mod._qkv(x)
        approx, conn = attn_mod.predict_connectivity(q, k)
    mask = conn.to_dense_mask()
    flops = count_flops(N, H, D, args.keep, mask[:1])
    scale = attn_mod.scale
    lay = from_dense_mask(mask)
    idx = approx.topk(keep_count(args.keep, N), -1, sorted=False).indices     # (B, H, N-1, K)
    idx = torch.cat([idx[:, :, :1], idx], 2)            # row 0 (cls) filled with any k; dense below

    merge = lambda o: o.transpose(1, 2).reshape(B, N, H * D)      # what the output projection reads

    def core_dense():
        return merge(attention(q, k, v, scale=scale))

    def core_mask():
        return merge(attention(q, k, v, lay, scale=scale))

    def core_lists():      # a fresh layout per call: its CSR pattern is built inside the timing
        return merge(attention(q, k, v, key_lists(conn.index, N, dense_rows=1, validate=False), scale=scale))

    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    lay_lists = key_lists(conn.index, N, dense_rows=1, validate=False)

    def core_lists_contiguous():
        return merge(attention(qc, kc, vc, lay_lists, scale=scale))

    def core_gather():
        o = attention(q, k, v, routed_topk(idx, 1), scale=scale)
        o0 = attention(q[:, :, :1], k, v, scale=scale)
        return merge(torch.cat([o0, o[:, :, 1:]], 2))

    with torch.no_grad():
        torch.testing.assert_close(core_gather(), core_mask(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(core_lists(), core_mask(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(core_lists_contiguous(), core_mask(), rtol=1e-4, atol=1e-5)
    qkv = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    g = torch.randn_like(q)

    def train(layout):
        def run():
            lay_ = None if layout is None else key_lists(layout.index, N, dense_rows=1, validate=False)
            attention(*qkv, lay_, scale=scale).backward(g)
        return run

    def module(mode):
        def run():
            attn_mod.attn_mode = mode
            return attn_mod(x)
        return run

    steps = {"core_dense_sdpa": core_dense, "core_key_lists": core_lists,
             "core_key_lists_contiguous": core_lists_contiguous, "core_mask_layout": core_mask,
             "module_dense": module("dense"), "module_sparse": module("sparse")}
    if not args.no_gather:
        steps["core_gather_routed"] = core_gather
    with torch.no_grad():
        t = measure(steps, "cpu", warmup=1, reps=args.rounds, iters=args.iters)
    if args.train:
        t.update(measure({"train_dense_sdpa": train(None), "train_key_lists": train(conn)}, "cpu", warmup=1,
                         reps=args.rounds, iters=args.iters))
    attn_mod.attn_mode = "sparse"
    med = {k: v.median * 1e3 for k, v in t.items()}
    out = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
        torch=torch.__version__, shape=dict(B=B, H=H, N=N, D=D), keep=args.keep,
        flops_per_image_layer=flops,
        reduction_core=1 - flops["sparse_core"] / flops["dense"],
        reduction_with_predictor=1 - flops["sparse_total"] / flops["dense"],
        time_ms_median=med, time_ms_quartiles={k: [round(v.q1 * 1e3, 3), round(v.q3 * 1e3, 3)] for k, v in t.items()},
        ratio_key_lists_vs_sdpa=med["core_key_lists"] / med["core_dense_sdpa"],
        ratio_key_lists_contiguous_vs_sdpa=med["core_key_lists_contiguous"] / med["core_dense_sdpa"],
        ratio_mask_vs_sdpa=med["core_mask_layout"] / med["core_dense_sdpa"],
        ratio_module_sparse_vs_dense=med["module_sparse"] / med["module_dense"],
    )
    if "train_key_lists" in med:
        out["ratio_train_key_lists_vs_sdpa"] = med["train_key_lists"] / med["train_dense_sdpa"]
    if "core_gather_routed" in med:
        out["ratio_gather_vs_sdpa"] = med["core_gather_routed"] / med["core_dense_sdpa"]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
