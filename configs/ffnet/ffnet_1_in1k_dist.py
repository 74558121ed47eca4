# FFNet-1 with DeiT-style hard distillation (README "With Distillation" command): Mixup back at the
# default 0.8, stochastic depth 0.02; loss = 0.5 * CE(student, label) + 0.5 * CE(student,
# argmax teacher(x)), teacher RegNetY-16GF with DeiT's weights (timm 'regnety_160.deit_in1k', the
# file upstream train.py loads), fed the same augmented/mixed batch, frozen, eval mode.

_base_ = ['./ffnet_1_in1k.py']
model = dict(mixup_alpha=0.8, model_kwargs=dict(drop_path_rate=0.02),
             distillation=dict(type='hard', teacher='regnety_160.deit_in1k', alpha=0.5, tau=1.0))
