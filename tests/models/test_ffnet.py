"""FFNet / MetaMixer: re-parameterisation exactness, fused parameter counts, upstream checkpoint
mapping (against an upstream-layout reference written here), the attention instance of MetaMixer
against a dense softmax oracle, and the family's configs."""
import glob
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model import reparameterize_model

import zoo  # noqa: F401
from zoo.layers.reparam import BnConv, BnConvSkip, ConvBn, RepDwConv
from zoo.models.ffnet import FFNet, MetaMixer, checkpoint_filter_fn, conv_self_attention

VARIANTS = ['ffnet_1', 'ffnet_2', 'ffnet_3', 'ffnet_4']
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _randomize(model: nn.Module, seed: int = 0):
    """Non-trivial BN statistics/affines and layer scales, so fusing has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.6 + 0.7)
                m.weight.copy_(torch.rand(n, generator=g) * 0.6 + 0.7)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith('gamma') or name.endswith('layer_scale'):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# building blocks

@pytest.mark.parametrize('k,k_small,stride,mult', [(7, 3, 1, 1), (7, 3, 2, 2), (5, 3, 1, 1), (9, 5, 2, 1),
                                                   (11, 3, 1, 2), (3, 1, 2, 1)])
def test_rep_dw_conv_fuses_for_any_kernel(k, k_small, stride, mult):
    torch.manual_seed(0)
    m = _randomize(RepDwConv(6, 6 * mult, k, stride=stride, small_kernel_size=k_small)).eval()
    x = torch.randn(2, 6, 13, 12)
    fused = m.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.kernel_size == (k, k) and fused.groups == 6
    torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=0)


def test_rep_dw_conv_default_small_kernel_and_errors():
    assert RepDwConv(4, 4, 7).small_kernel_size == 3  # the paper's 7x7 + 3x3
    assert RepDwConv(4, 4, 9).small_kernel_size == 5  # k // 2 rounded up to odd
    with pytest.raises(ValueError, match='odd'):
        RepDwConv(4, 4, 6)
    with pytest.raises(ValueError, match='multiple'):
        RepDwConv(4, 6, 7)


@pytest.mark.parametrize('groups', [1, 2])
def test_conv_bn_and_bn_conv_fuse(groups):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    cb = _randomize(ConvBn(8, 12, 3, stride=2, groups=groups)).eval()
    torch.testing.assert_close(cb.fuse()(x), cb(x), atol=1e-5, rtol=0)
    bc = _randomize(BnConv(8, 12, 3, groups=groups)).eval()  # unpadded, so exact
    torch.testing.assert_close(bc.fuse()(x), bc(x), atol=1e-5, rtol=0)
    skip = _randomize(BnConvSkip(8, groups=groups)).eval()
    torch.testing.assert_close(skip.fuse()(x), skip(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# whole models: fused == unfused, fused parameter counts

@pytest.mark.parametrize('variant', VARIANTS)
def test_reparameterize_matches_unfused(variant):
    torch.manual_seed(0)
    model = _randomize(timm.create_model(variant, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64) if variant == 'ffnet_1' else torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fused = [reparameterize_model(model)] if variant == 'ffnet_1' else []  # timm's walk finds fuse()
        fused.append(model.reparameterize())
        outs = [m(x) for m in fused]
    assert ref.abs().max() > 1e-2  # logits are not trivially small
    for m, out in zip(fused, outs):
        kinds = {type(mod) for mod in m.modules()}
        assert not kinds & {ConvBn, BnConv, BnConvSkip, RepDwConv}
        assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 1  # only the head norm
        assert (out - ref).abs().max().item() <= 1e-5
    model.reparameterize()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(x), outs[-1])


@pytest.mark.parametrize('variant,fused_m,unfused_m', [
    ('ffnet_1', 13.66, 13.78), ('ffnet_2', 26.91, 27.21), ('ffnet_3', 48.33, 48.82), ('ffnet_4', 79.20, 79.87)])
def test_param_counts(variant, fused_m, unfused_m):
    with torch.device('meta'):
        model = timm.create_model(variant)
        unfused = sum(p.numel() for p in model.parameters())
        model.reparameterize()
    fused = sum(p.numel() for p in model.parameters())
    assert round(fused / 1e6, 2) == fused_m  # upstream README (fused network)
    assert round(unfused / 1e6, 2) == unfused_m


def test_features_and_intermediates_after_fusing():
    torch.manual_seed(0)
    model = _randomize(timm.create_model('ffnet_1', features_only=True, out_indices=(1, 3))).eval()
    assert model.feature_info.channels() == [160, 640] and model.feature_info.reduction() == [8, 32]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
        fused = reparameterize_model(model)(x)
    assert [f.shape[1:] for f in feats] == [(160, 8, 8), (640, 2, 2)]
    for a, b in zip(feats, fused):
        assert (a - b).abs().max() <= 1e-5

    clf = _randomize(timm.create_model('ffnet_1', num_classes=0)).eval()
    with torch.no_grad():
        final, inter = clf.forward_intermediates(x)
        torch.testing.assert_close(final, clf.forward_features(x))
        torch.testing.assert_close(inter[-1], clf.stages(clf.stem(x)))
        normed = clf.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="'conv' or 'attn'"):
        FFNet(token_mixers='swin')
    with pytest.raises(ValueError, match='one per stage'):
        FFNet(key_kernel_sizes=(3, 7))
    with pytest.raises(ValueError, match='head_dim'):
        conv_self_attention(48, head_dim=32)
    with pytest.raises(ValueError, match='NCHW'):
        FFNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).forward_intermediates(torch.randn(1, 3, 32, 32),
                                                                               output_fmt='NHWC')


# ---------------------------------------------------------------------------------------------
# MetaMixer: the attention instance is dense softmax attention

def _oracle_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head; q/k/v (B, N, C)."""
    B, N, C = q.shape
    q, k, v = (t.reshape(B, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-1, -2)) * (C // heads) ** -0.5
    out = attn.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, N, -1)


def test_metamixer_attention_instance_matches_dense_oracle():
    torch.manual_seed(0)
    mixer = conv_self_attention(32, head_dim=8)
    assert mixer.dynamic and mixer.num_heads == 4
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    out = mixer(x)

    def tokens(conv):  # 1x1 conv on the map == linear on row-major tokens
        return F.linear(x.flatten(2).transpose(1, 2), conv.weight.flatten(1), conv.bias)
    ref = _oracle_attention(tokens(mixer.query), tokens(mixer.key), tokens(mixer.value), 4)
    ref = F.linear(ref, mixer.proj.weight.flatten(1), mixer.proj.bias).transpose(1, 2).reshape(2, 32, 5, 7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())

    # token-sequence layout with linear sub-operations, query from a different width than value
    lin = MetaMixer(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 24), act='softmax', num_heads=2,
                    token_layout='nlc')
    t = torch.randn(3, 11, 16)
    torch.testing.assert_close(lin(t), _oracle_attention(lin.query(t), lin.key(t), lin.value(t), 2),
                               atol=1e-5, rtol=1e-5)


def test_metamixer_static_instance_is_value_act_key_query():
    torch.manual_seed(0)
    q, k, v = nn.Linear(6, 6), nn.Linear(6, 18), nn.Linear(18, 6)
    mixer = MetaMixer(q, k, v, act='gelu')
    x = torch.randn(4, 6)
    torch.testing.assert_close(mixer(x), v(F.gelu(k(q(x)))))


@pytest.mark.parametrize('fused', [False, True])
def test_inference_fast_path_is_bitwise_the_autograd_path(fused):
    """In-place GELU / residual sums under no_grad give exactly the grad-recording values, leave the
    input alone, and every stage output seen by a hook keeps its value."""
    torch.manual_seed(0)
    model = _randomize(FFNet(depths=(1, 2, 1, 1), dims=(16, 32, 64, 128), layer_scale_init_value=0.5,
                             use_se=(False, True, False, False), num_classes=5)).eval()
    if fused:
        model.reparameterize()
    x = torch.randn(2, 3, 64, 64)
    x_copy = x.clone()
    seen = {}
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out, out.clone())))
    ref = model(x.requires_grad_()).detach()  # records a graph: out-of-place path
    x = x.detach()
    with torch.inference_mode():
        out = model(x)
    assert torch.equal(out, ref)
    assert torch.equal(x, x_copy)
    for held, copied in seen.values():
        assert torch.equal(held, copied)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # and the in-place kernels are what ran: every GELU (stem + 2 per block) and every residual sum
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Ops() as ops:
        model(x)
    blocks = sum(len(s.blocks) for s in model.stages)
    assert ops.names.count('gelu_.default') == 1 + 2 * blocks and 'gelu.default' not in ops.names
    assert ops.names.count('add_.Tensor') >= 2 * blocks


def test_gelu_runs_in_place_only_on_fresh_conv_outputs():
    from zoo.models.ffnet import _gelu_mode
    from timm.layers.activations import GELU, GELUTanh
    conv = nn.Conv2d(4, 4, 1)
    assert _gelu_mode(nn.GELU(), conv) == 'none'
    assert _gelu_mode(nn.GELU(approximate='tanh'), conv) == 'tanh'
    assert _gelu_mode(GELU(), ConvBn(4, 4, 3)) == 'none'
    assert _gelu_mode(GELUTanh(), RepDwConv(4, 4, 7)) == 'tanh'
    assert _gelu_mode(nn.GELU(), nn.Identity()) is None  # would overwrite the mixer's input
    assert _gelu_mode(nn.ReLU(), conv) is None
    # an identity key: the mixer input must survive an inference call
    mixer = MetaMixer(nn.Identity(), nn.Identity(), nn.Identity(), act='gelu')
    x = torch.randn(3, 5)
    with torch.inference_mode():
        y = mixer(x)
    assert torch.equal(y, F.gelu(x)) and not torch.equal(x, y)


def test_hybrid_attention_stage_runs_and_fuses():
    torch.manual_seed(0)
    model = FFNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), mlp_kernel_sizes=(3, 3, 7, 7),
                  token_mixers=('conv', 'conv', 'conv', 'attn'), head_dim=32, num_classes=7)
    assert model.stages[3].blocks[0].token_mixer.dynamic
    _randomize(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.reparameterize()(x)
    assert (out - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# upstream checkpoint layout (ysj9909/FFNet models/ffnet.py): a compact reference with the same
# module tree and forward semantics, written for this test

class _UpConvBN(nn.Sequential):
    def __init__(self, a, b, ks=1, stride=1, pad=0, groups=1):
        super().__init__()
        self.add_module('c', nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(b))


class _UpBNConv(nn.Sequential):
    def __init__(self, a, b):
        super().__init__()
        self.add_module('bn', nn.BatchNorm2d(a))
        self.add_module('c', nn.Conv2d(a, b, 1, bias=False))


class _UpRepDW(nn.Module):
    def __init__(self, a, b, ks=7, stride=1):
        super().__init__()
        self.conv = _UpConvBN(a, b, ks, stride, ks // 2, groups=a)
        self.conv1 = _UpConvBN(a, b, ks // 2, stride, ks // 4, groups=a)

    def forward(self, x):
        return self.conv(x) + self.conv1(x)


def _up_dw(dim, ks, bn):
    if ks == 7:
        return _UpRepDW(dim, dim, ks)
    return _UpConvBN(dim, dim, ks, 1, ks // 2, groups=dim) if bn else nn.Conv2d(dim, dim, ks, 1, ks // 2, groups=dim)


class _UpResidual(nn.Module):
    def __init__(self, main, dim, ls):
        super().__init__()
        self.main = main
        self.ls = ls
        if ls:
            self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        y = self.main(x)
        return x + (y * self.layer_scale if self.ls else y)


class _UpTokenMixer(nn.Module):
    def __init__(self, dim, ks):
        super().__init__()
        self.fc = _UpConvBN(dim, dim)
        self.conv1 = _up_dw(dim, ks, bn=False)
        self.conv2 = _up_dw(dim, ks, bn=False)

    def forward(self, x):
        return self.conv2(F.gelu(self.conv1(self.fc(x))))


class _UpChannelMixer(nn.Module):
    def __init__(self, dim, ks):
        super().__init__()
        self.conv = _up_dw(dim, ks, bn=True)
        self.fc1 = nn.Conv2d(dim, 3 * dim, 1)
        self.fc2 = nn.Conv2d(3 * dim, dim, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class _UpBlock(nn.Module):
    def __init__(self, dim, ks_mlp, ks_tok, ls, se):
        super().__init__()
        self.token_mixer = nn.Sequential(
            _UpResidual(_UpTokenMixer(dim, ks_tok), dim, ls),
            timm.layers.SEModule(dim, rd_ratio=0.25) if se else nn.Identity())
        self.channel_mixer = _UpResidual(_UpChannelMixer(dim, ks_mlp), dim, ls)

    def forward(self, x):
        return self.channel_mixer(self.token_mixer(x))


class _UpSkip(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = _UpBNConv(dim, dim)

    def forward(self, x):
        return self.conv(x) + x


class _UpMerge(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.proj = nn.Sequential(_UpRepDW(a, b, 7, 2), _UpSkip(b))

    def forward(self, x):
        return self.proj(x)


class _UpFFNet(nn.Module):
    def __init__(self, depth, embed_dim, kernel_sizes, ls=False, se=False, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Sequential(_UpConvBN(3, 64, 3, 2, 1), nn.GELU(), _UpConvBN(64, embed_dim[0], 3, 2, 1))
        self.stages = nn.ModuleList()
        for i, (dim, d) in enumerate(zip(embed_dim, depth)):
            blocks = [_UpMerge(embed_dim[i - 1], dim)] if i else []
            blocks += [_UpBlock(dim, kernel_sizes[i], (3, 3, 7, 7)[i], ls, se and j % 2 == 0) for j in range(d)]
            self.stages.append(nn.Sequential(*blocks))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for s in self.stages:
            x = s(x)
        return self.head(self.norm(x).mean((2, 3)))


_UP_VARIANTS = {
    'ffnet_1': dict(depth=[2, 2, 8, 2], embed_dim=[80, 160, 320, 640], kernel_sizes=[3, 3, 3, 3]),
    'ffnet_2': dict(depth=[3, 3, 15, 3], embed_dim=[88, 176, 352, 704], kernel_sizes=[7, 7, 7, 7]),
    'ffnet_3': dict(depth=[4, 4, 22, 5], embed_dim=[96, 192, 384, 768], kernel_sizes=[7, 7, 7, 7], ls=True),
    'ffnet_4': dict(depth=[4, 4, 27, 3], embed_dim=[128, 256, 512, 1024], kernel_sizes=[7, 7, 7, 7], ls=True),
}


@pytest.mark.parametrize('variant', VARIANTS)
def test_checkpoint_filter_maps_every_upstream_key(variant):
    with torch.device('meta'):
        up = _UpFFNet(**_UP_VARIANTS[variant])
        ours = timm.create_model(variant)
    sd = {'module.' + k: v for k, v in up.state_dict().items()}  # DDP-saved checkpoints carry module.
    mapped = checkpoint_filter_fn({'state_dict': sd, 'epoch': 300}, ours)
    expected = ours.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in mapped)
    if variant == 'ffnet_3':
        assert len(sd) == 1593  # upstream's tensor count for FFNet-3


@pytest.mark.parametrize('mlp_ks,ls,se', [(3, False, False), (7, True, True)])
def test_checkpoint_filter_reproduces_upstream_outputs(tmp_path, mlp_ks, ls, se):
    torch.manual_seed(0)
    depths, dims = [1, 2, 2, 1], [16, 32, 64, 128]
    up = _randomize(_UpFFNet(depths, dims, [mlp_ks] * 4, ls=ls, se=se, num_classes=5)).eval()
    kwargs = dict(depths=depths, dims=dims, mlp_kernel_sizes=mlp_ks, use_se=se, num_classes=5,
                  layer_scale_init_value=1e-6 if ls else None)
    path = tmp_path / 'ffnet_upstream.pth.tar'
    torch.save({'state_dict': up.state_dict(), 'epoch': 1}, path)
    # the pretrained path a user takes with a downloaded release file
    overlay = dict(file=str(path), num_classes=5)  # same head size, so timm keeps the classifier weights
    ours = timm.create_model('ffnet_1', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = up(x)
        torch.testing.assert_close(ours(x), ref, atol=1e-6, rtol=1e-6)
        assert (ours.reparameterize()(x) - ref).abs().max() <= 1e-5
    # 'model'-wrapped and already-converted state dicts load too
    again = FFNet(**kwargs).eval()
    again.load_state_dict(checkpoint_filter_fn(checkpoint_filter_fn({'model': up.state_dict()}, again), again))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, atol=1e-6, rtol=1e-6)


def test_pretrained_cfgs():
    names = timm.list_models('ffnet_*', pretrained=True)
    assert set(names) == {'ffnet_1.in1k_256', 'ffnet_1.dist_in1k_256', 'ffnet_2.in1k_256', 'ffnet_2.dist_in1k_256',
                          'ffnet_3.in1k_256', 'ffnet_3.dist_in1k_256', 'ffnet_3.in1k_384', 'ffnet_4.in1k_384'}
    for n in names:
        c = timm.get_pretrained_cfg(n).to_dict()
        res = 384 if n.endswith('384') else 256
        assert c['url'].startswith('https://github.com/ysj9909/FFNet/releases/download/v1.0/ffnet_')
        assert c['input_size'] == (3, res, res) and c['pool_size'] == (res // 32, res // 32)
        assert c['license'] == 'apache-2.0' and c['classifier'] == 'head.fc'
    assert timm.get_pretrained_cfg('ffnet_1').to_dict()['url'].endswith('/ffnet_1.pth.tar')  # default tag


# ---------------------------------------------------------------------------------------------
# configs

CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', 'ffnet', '*.py')))


def test_configs_exist():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds(path):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    model_cfg = cfg.model
    assert model_cfg.type == 'TimmClassifier'
    kwargs = dict(model_cfg.get('model_kwargs') or {})
    with torch.device('meta'):
        model = timm.create_model(model_cfg.model_name, num_classes=model_cfg.num_classes, **kwargs)
    assert isinstance(model, FFNet) and model.num_classes == model_cfg.num_classes
    if 'distillation' in cfg:
        assert cfg.distillation.type == 'hard' and cfg.distillation.teacher == 'regnety_160.deit_in1k'
