"""CPU benchmark: zoo FFNet vs the official implementation, both re-parameterised (fused).

    python tools/bench_ffnet.py /path/to/ysj9909/FFNet [--variant ffnet_1] [--img-size 256]
        [--batch-size 16] [--threads 2] [--rounds 5] [--iters 3] [--json out.json]

The checkout path may be a work tree (``models/ffnet.py`` is read from it) or a bare git directory
such as the one the zoo's fetch tool leaves in /work/.mirror (the file is read with ``git show``).
Upstream code is loaded at run time only; nothing of it is kept in this repository.

Before timing, the upstream model's random weights are loaded into the zoo model through
``checkpoint_filter_fn`` and both fused models must agree (max-abs logits difference is reported),
so the two timed networks compute the same function. Timings alternate A/B, B/A, ... in one
process (the machine may be shared) and the medians are reported, with the per-round ratio, the
load average and the minor page faults per forward (large CPU buffers come back from the OS as
fresh pages; a model that allocates fewer of them spends less time faulting).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch

# upstream constructor arguments per variant (from its registered entry points)
UPSTREAM_ARGS = {
    'ffnet_1': dict(depth=[2, 2, 8, 2], embed_dim=[80, 160, 320, 640], kernel_sizes=[3, 3, 3, 3]),
    'ffnet_2': dict(depth=[3, 3, 15, 3], embed_dim=[88, 176, 352, 704], kernel_sizes=[7, 7, 7, 7]),
    'ffnet_3': dict(depth=[4, 4, 22, 5], embed_dim=[96, 192, 384, 768], kernel_sizes=[7, 7, 7, 7],
                    use_layer_scale=True, layer_scale_init_value=1e-6),
    'ffnet_4': dict(depth=[4, 4, 27, 3], embed_dim=[128, 256, 512, 1024], kernel_sizes=[7, 7, 7, 7],
                    use_layer_scale=True, layer_scale_init_value=1e-6),
}


def read_upstream_source(checkout: str) -> str:
    path = os.path.join(checkout, 'models', 'ffnet.py')
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    try:
        return subprocess.run(
            ['git', '--git-dir', checkout, 'show', 'HEAD:models/ffnet.py'],
            check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f'{checkout!r} is neither a FFNet work tree nor a git dir with models/ffnet.py: {e}')


def load_upstream(checkout: str) -> types.ModuleType:
    """Import upstream models/ffnet.py without letting it touch timm's registry."""
    import timm.models
    import timm.models._builder as builder
    src = read_upstream_source(checkout)
    saved_register = timm.models.register_model
    added = not hasattr(builder, '_update_default_kwargs')
    if added:  # removed from timm after 0.9; only its entry points use it
        builder._update_default_kwargs = lambda *a, **k: None
    timm.models.register_model = lambda fn: fn  # upstream registers 'ffnet_*' names the zoo owns
    try:
        mod = types.ModuleType('upstream_ffnet')
        mod.__file__ = os.path.join(checkout, 'models', 'ffnet.py')
        exec(compile(src, mod.__file__, 'exec'), mod.__dict__)
    finally:
        timm.models.register_model = saved_register
        if added:
            del builder._update_default_kwargs
    return mod


def randomize_bn(model: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_model(model, x, iters):
    """(seconds, minor page faults) per forward, averaged over ``iters``."""
    f0 = _minor_faults()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - t0) / iters, (_minor_faults() - f0) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('checkout', help='ysj9909/FFNet work tree or bare git dir')
    ap.add_argument('--variant', default='ffnet_1', choices=sorted(UPSTREAM_ARGS))
    ap.add_argument('--img-size', type=int, default=256)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=5, help='A/B alternations')
    ap.add_argument('--iters', type=int, default=3, help='forward passes per timing')
    ap.add_argument('--channels-last', action='store_true', help='also time both models in channels_last')
    ap.add_argument('--json', default=None, help='write the results here')
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import timm
    import zoo  # noqa: F401  (registers the zoo models)
    from timm.utils.model import reparameterize_model
    from zoo.models.ffnet import checkpoint_filter_fn

    up_mod = load_upstream(args.checkout)
    torch.manual_seed(0)
    ref = up_mod.FFNet(drop_path_rate=0., **UPSTREAM_ARGS[args.variant]).eval()
    randomize_bn(ref)
    ours = timm.create_model(args.variant).eval()
    ours.load_state_dict(checkpoint_filter_fn({'state_dict': ref.state_dict()}, ours))

    ref_fused = reparameterize_model(ref)  # upstream blocks expose fuse(); same walk as its export script
    ours_fused = reparameterize_model(ours)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        diff_unfused = (ref(x[:2]) - ours(x[:2])).abs().max().item()
        diff_fused = (ref_fused(x[:2]) - ours_fused(x[:2])).abs().max().item()
    n_ref = sum(p.numel() for p in ref_fused.parameters())
    n_ours = sum(p.numel() for p in ours_fused.parameters())

    contenders = {'upstream_fused': ref_fused, 'zoo_fused': ours_fused}
    if args.channels_last:
        contenders['upstream_fused_cl'] = ref_fused
        contenders['zoo_fused_cl'] = ours_fused
    inputs = {k: (x.contiguous(memory_format=torch.channels_last) if k.endswith('_cl') else x) for k in contenders}
    times = {k: [] for k in contenders}
    faults = {k: [] for k in contenders}
    for name, model in contenders.items():  # warm-up
        model.to(memory_format=torch.channels_last if name.endswith('_cl') else torch.contiguous_format)
        time_model(model, inputs[name], 1)
    for r in range(args.rounds):
        order = list(contenders.items())
        for name, model in (order if r % 2 == 0 else order[::-1]):  # A/B, then B/A: no fixed position
            model.to(memory_format=torch.channels_last if name.endswith('_cl') else torch.contiguous_format)
            t, f = time_model(model, inputs[name], args.iters)
            times[name].append(t)
            faults[name].append(f)

    res = dict(
        variant=args.variant, img_size=args.img_size, batch_size=args.batch_size, threads=args.threads,
        rounds=args.rounds, iters=args.iters, torch=torch.__version__,
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), loadavg_1min_end=os.getloadavg()[0],
        params_fused=dict(upstream=n_ref, zoo=n_ours),
        max_abs_logit_diff=dict(unfused=diff_unfused, fused=diff_fused),
        img_per_s={k: args.batch_size / statistics.median(v) for k, v in times.items()},
        img_per_s_all={k: [round(args.batch_size / t, 2) for t in v] for k, v in times.items()},
        # page faults show fresh memory being touched (large CPU allocations come back from the OS)
        minor_faults_per_forward={k: statistics.median(v) for k, v in faults.items()},
    )
    res['ratio_zoo_over_upstream'] = res['img_per_s']['zoo_fused'] / res['img_per_s']['upstream_fused']
    res['ratio_per_round_median'] = statistics.median(
        a / b for a, b in zip(times['upstream_fused'], times['zoo_fused']))
    if args.channels_last:
        res['ratio_zoo_over_upstream_cl'] = res['img_per_s']['zoo_fused_cl'] / res['img_per_s']['upstream_fused_cl']
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=2)
    if diff_fused > 1e-3:
        sys.exit(f'fused models disagree (max-abs {diff_fused:.3g}); timings are not comparable')


if __name__ == '__main__':
    main()
