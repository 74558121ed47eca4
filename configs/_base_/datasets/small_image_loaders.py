# Loaders shared by the small labelled-image datasets (CIFAR-10/100, SVHN, Tiny-ImageNet): the
# dataset files set `dataset`, `num_classes` and `normalization` (mean/std, 0..1 scale); a model takes
# them as `num_classes={{_base_.num_classes}}`, `data_preprocessor={{_base_.normalization}}`.
_loader = dict(num_workers=4, persistent_workers=True, collate_fn=dict(type='default_collate'))
train_dataloader = dict(batch_size=128, sampler=dict(type='DefaultSampler', shuffle=True), **_loader)
val_dataloader = dict(batch_size=256, sampler=dict(type='DefaultSampler', shuffle=False), **_loader)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator
