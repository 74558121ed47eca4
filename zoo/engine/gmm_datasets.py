"""Small-image datasets of the GMM-attention recipe, read from disk in their standard formats.

- ``Cifar10Dataset`` / ``Cifar100Dataset``: the python-pickle release (``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``data_root``), as torchvision downloads it.
- ``SvhnDataset``: ``train_32x32.mat`` / ``test_32x32.mat`` (cropped digits) under ``data_root``.
- ``TinyImageNetDataset``: the ``tiny-imagenet-200`` folder (``train/<wnid>/images/*.JPEG``,
  ``val/images`` + ``val_annotations.txt``), ``data_root`` being that folder or its parent.

Nothing is downloaded: a missing file raises FileNotFoundError saying what is expected where.
Training augmentation follows the reference recipe: horizontal flip, random crop with 4 px
padding, AutoAugment with the dataset's policy (torchvision's CIFAR10 / SVHN / IMAGENET policies). Items are uint8 CHW; the
model's data preprocessor normalises and applies random erasing. ``RepeatAugSampler`` gives the
recipe's repeated augmentation (each index ``repeats`` times per epoch, distinct augmentations).
"""
import math
import os
import pickle
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.registry import DATA_SAMPLERS, DATASETS
from torch.utils.data import Sampler

from .datasets import _ClsDataset, _check_split

__all__ = ["Cifar10Dataset", "Cifar100Dataset", "SvhnDataset", "TinyImageNetDataset", "RepeatAugSampler"]


def _missing(what: str, path: str, hint: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found at {os.path.abspath(path)!r}: {hint}. Nothing is downloaded; set data_root in the "
        "config, e.g. --cfg-options train_dataloader.dataset.data_root=/path val_dataloader.dataset.data_root=/path")


def _train_transform(img_size: int, policy: str, flip: bool):
    from torchvision import transforms as T
    ops = [T.RandomHorizontalFlip()] if flip else []
    ops.append(T.RandomCrop(img_size, padding=4))
    ops.append(T.AutoAugment(getattr(T.AutoAugmentPolicy, policy)))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


class _ArrayDataset(_ClsDataset):
    """Images held as one uint8 (N, H, W, 3) array."""

    policy, flip = "CIFAR10", True

    def _setup(self, images: np.ndarray, labels: np.ndarray, split: str, augment: bool, max_samples: Optional[int]):
        if max_samples is not None:
            images, labels = images[:max_samples], labels[:max_samples]
        self.images, self.labels = np.ascontiguousarray(images), labels.astype(np.int64)
        self.split = split
        self.transform = _train_transform(images.shape[1], self.policy, self.flip) if augment and split == "train" else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        img = self.images[idx]
        if self.transform is not None:
            from PIL import Image
            out = self.transform(Image.fromarray(img))
        else:
            out = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        return self._item(out, int(self.labels[idx]), idx)


class _Cifar(_ArrayDataset):
    folder, files, label_key, meta_file, names_key = "", {}, "", "", ""

    def __init__(self, data_root: str = "data/cifar", split: str = "train", augment: bool = True,
                 max_samples: Optional[int] = None):
        _check_split(split)
        root = os.path.join(os.path.expanduser(str(data_root)), self.folder)
        if not os.path.isdir(root):
            raise _missing(f"{type(self).__name__} folder", root,
                           f"expected {self.folder}/ (the python version of the CIFAR release) under data_root")
        images, labels = [], []
        for name in self.files[split]:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise _missing("CIFAR batch file", path, f"expected the files {self.files[split]} in {self.folder}/")
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")  # the official release is a pickle of plain arrays
            images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(d[self.label_key])
        meta = os.path.join(root, self.meta_file)
        if os.path.isfile(meta):
            with open(meta, "rb") as f:
                self.CLASSES = tuple(pickle.load(f, encoding="latin1")[self.names_key])
        self._setup(np.concatenate(images), np.asarray(labels), split, augment, max_samples)


@DATASETS.register_module()
class Cifar10Dataset(_Cifar):
    folder, label_key, meta_file, names_key = "cifar-10-batches-py", "labels", "batches.meta", "label_names"
    files = dict(train=[f"data_batch_{i}" for i in range(1, 6)], val=["test_batch"])
    CLASSES = tuple(str(i) for i in range(10))


@DATASETS.register_module()
class Cifar100Dataset(_Cifar):
    folder, label_key, meta_file, names_key = "cifar-100-python", "fine_labels", "meta", "fine_label_names"
    files = dict(train=["train"], val=["test"])
    CLASSES = tuple(str(i) for i in range(100))


@DATASETS.register_module()
class SvhnDataset(_ArrayDataset):
    """SVHN cropped digits; label 10 in the .mat files is digit 0."""

    policy, flip = "SVHN", True  # the reference flips SVHN too
    CLASSES = tuple(str(i) for i in range(10))

    def __init__(self, data_root: str = "data/svhn", split: str = "train", augment: bool = True,
                 max_samples: Optional[int] = None):
        _check_split(split)
        path = os.path.join(os.path.expanduser(str(data_root)), "train_32x32.mat" if split == "train" else "test_32x32.mat")
        if not os.path.isfile(path):
            raise _missing("SVHN file", path, "expected train_32x32.mat and test_32x32.mat under data_root")
        from scipy.io import loadmat
        d = loadmat(path)
        labels = d["y"].reshape(-1).astype(np.int64) % 10
        self._setup(np.asarray(d["X"], dtype=np.uint8).transpose(3, 0, 1, 2), labels, split, augment, max_samples)


@DATASETS.register_module()
class TinyImageNetDataset(_ClsDataset):
    """Tiny-ImageNet-200 (64 px, 200 classes, 100k train / 10k val), read lazily from the JPEGs."""

    def __init__(self, data_root: str = "data/tiny-imagenet-200", split: str = "train", augment: bool = True,
                 max_samples: Optional[int] = None):
        _check_split(split)
        root = os.path.expanduser(str(data_root))
        if not os.path.isfile(os.path.join(root, "wnids.txt")) and \
                os.path.isfile(os.path.join(root, "tiny-imagenet-200", "wnids.txt")):
            root = os.path.join(root, "tiny-imagenet-200")
        wnids_path = os.path.join(root, "wnids.txt")
        if not os.path.isfile(wnids_path):
            raise _missing("tiny-imagenet-200/wnids.txt", wnids_path,
                           "expected the unpacked tiny-imagenet-200 folder (wnids.txt, train/, val/)")
        with open(wnids_path) as f:
            wnids = [w.strip() for w in f if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        samples = []
        if split == "train":
            for w in wnids:
                d = os.path.join(root, "train", w, "images")
                if not os.path.isdir(d):
                    raise _missing("Tiny-ImageNet class folder", d, "expected train/<wnid>/images/*.JPEG")
                samples += [(os.path.join(d, n), index[w]) for n in sorted(os.listdir(d))]
        else:
            ann = os.path.join(root, "val", "val_annotations.txt")
            if not os.path.isfile(ann):
                raise _missing("Tiny-ImageNet val annotations", ann, "expected val/val_annotations.txt and val/images/")
            with open(ann) as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        samples.append((os.path.join(root, "val", "images", parts[0]), index[parts[1]]))
        if max_samples is not None:
            samples = samples[:max_samples]
        self.samples, self.split, self.CLASSES = samples, split, tuple(wnids)
        self.transform = _train_transform(64, "IMAGENET", True) if augment and split == "train" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        from PIL import Image
        path, label = self.samples[idx]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            out = self.transform(img)
        else:
            out = torch.from_numpy(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return self._item(out, label, idx)


@DATA_SAMPLERS.register_module()
class RepeatAugSampler(Sampler):
    """Repeated augmentation (Hoffer et al.; DeiT's RASampler): every index appears ``repeats``
    times per epoch (spread over ranks, so each copy gets its own augmentation), and each rank
    keeps ``len(dataset) // world_size`` samples so an epoch costs what a plain one does."""

    def __init__(self, dataset, shuffle: bool = True, repeats: int = 3, seed: Optional[int] = None):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.rank, self.world_size = get_dist_info()
        self.dataset, self.shuffle, self.repeats = dataset, shuffle, int(repeats)
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        self.total = int(math.ceil(len(dataset) * repeats / self.world_size)) * self.world_size
        self.num_selected = len(dataset) // self.world_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        idx = [i for i in order for _ in range(self.repeats)]
        idx += idx[:self.total - len(idx)]
        return iter(idx[self.rank:self.total:self.world_size][:self.num_selected])

    def __len__(self) -> int:
        return self.num_selected

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
