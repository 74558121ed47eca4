"""Classification datasets for the Runner: items are ``dict(inputs=CHW uint8 tensor, data_samples=...)``.

Normalisation happens later, on the device, in :class:`zoo.engine.model.ClsDataPreprocessor`.
"""
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.registry import DATASETS
from mmengine.structures import BaseDataElement
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "ImageFolderDataset"]

_SPLITS = ("train", "val")


def _check_split(split: str, accepted: Sequence[str] = _SPLITS) -> None:
    if split not in accepted:
        raise ValueError(f"split must be one of {tuple(accepted)}, got {split!r}")


class _ClsDataset(Dataset):
    CLASSES: Tuple[str, ...] = ()

    @property
    def metainfo(self) -> dict:
        return dict(classes=tuple(self.CLASSES))

    def _item(self, img: torch.Tensor, label: int, idx: int) -> dict:
        return dict(inputs=img, data_samples=BaseDataElement(gt_label=int(label), sample_idx=idx))


@DATASETS.register_module()
class DigitsDataset(_ClsDataset):
    """scikit-learn's 1,797 real 8×8 handwritten digits, shipped inside its wheel (no download).

    The split is stratified and deterministic (``seed``); ``val_fraction`` of each class goes to
    'val'. Images are upsampled once (bilinear) to ``img_size`` and stored as uint8.
    ``augment`` adds a random shift of up to ``img_size // 8`` pixels (train only).
    """

    CLASSES = tuple(str(i) for i in range(10))

    def __init__(self, split: str = "train", img_size: int = 32, in_chans: int = 3,
                 val_fraction: float = 0.2, seed: int = 0, augment: bool = False,
                 max_samples: Optional[int] = None):
        _check_split(split)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grey) or 3 (grey repeated to RGB), got {in_chans}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if int(img_size) < 8:
            raise ValueError(f"img_size must be >= 8 (the source digits are 8x8), got {img_size}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                              stratify=digits.target)
        sel = np.sort(train_idx if split == "train" else val_idx)
        if max_samples is not None:
            sel = sel[:max_samples]
        imgs = torch.from_numpy(digits.images[sel].astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in 0..1
        if img_size != 8:
            imgs = F.interpolate(imgs, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.images = (imgs.clamp(0, 1) * 255).round().to(torch.uint8)
        self.labels = torch.from_numpy(digits.target[sel].astype(np.int64))
        self.split, self.img_size, self.in_chans = split, int(img_size), int(in_chans)
        self.augment = bool(augment) and split == "train"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        img = self.images[idx]
        if self.augment:
            m = max(1, self.img_size // 8)
            dy, dx = np.random.randint(-m, m + 1, size=2)
            img = torch.roll(F.pad(img, (m, m, m, m)), shifts=(int(dy), int(dx)), dims=(1, 2))[:, m:-m, m:-m]
        if self.in_chans == 3:
            img = img.expand(3, -1, -1).contiguous()
        return self._item(img, int(self.labels[idx]), idx)


@DATASETS.register_module()
class ImageFolderDataset(_ClsDataset):
    """ImageNet-style folders (``data_root/<split>/<class>/*.jpg``) with timm's transforms.

    If ``data_root/<split>`` does not exist but ``data_root`` itself holds class folders, it is
    used directly. ``transform_kwargs`` go to ``timm.data.create_transform`` (e.g.
    ``auto_augment='rand-m9-mstd0.5-inc1'``, ``crop_pct``, ``interpolation``); normalisation and
    random erasing are left to the data preprocessor, so images come out as uint8.
    """

    def __init__(self, data_root: str, split: str = "train", img_size: Union[int, Tuple[int, int]] = 224,
                 transform_kwargs: Optional[dict] = None, class_map: Optional[str] = None):
        _check_split(split, ("train", "val", "test"))
        data_root = os.path.expanduser(str(data_root))
        if not os.path.isdir(data_root):
            raise FileNotFoundError(
                f"image folder dataset root {data_root!r} does not exist (absolute: "
                f"{os.path.abspath(data_root)!r}); expected {data_root}/{split}/<class>/<images>. "
                f"Set data_root in the config, e.g. --cfg-options train_dataloader.dataset.data_root=/path")
        root = os.path.join(data_root, split)
        if not os.path.isdir(root):
            root = data_root
        from timm.data import ImageDataset, create_transform

        tkw = dict(transform_kwargs or {})
        tkw.pop("normalize", None)
        transform = create_transform(input_size=img_size, is_training=(split == "train"), normalize=False, **tkw)
        try:
            self.dataset = ImageDataset(root, transform=transform, class_map=class_map)
        except RuntimeError as e:
            raise RuntimeError(f"no images found under {root!r}: {e}") from e
        if len(self.dataset) == 0:
            raise RuntimeError(f"no images found under {root!r} (expected <class>/<image> files)")
        c2i = self.dataset.reader.class_to_idx
        self.CLASSES = tuple(sorted(c2i, key=c2i.get))
        self.root, self.split = root, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        img, label = self.dataset[idx]
        return self._item(img, int(label), idx)
