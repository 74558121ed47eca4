"""Classification datasets for the Runner: items are ``dict(inputs=CHW uint8 tensor, data_samples=...)``.

Normalisation (and random erasing) happens later, on the device, in
:class:`zoo.engine.model.ClsDataPreprocessor`.

- ``DigitsDataset``: scikit-learn's embedded 8x8 digits (no download).
- ``ImageFolderDataset``: ImageNet-style ``<split>/<class>/<image>`` folders.
- ``Cifar10Dataset`` / ``Cifar100Dataset``: the python-pickle release (``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``data_root``), as torchvision downloads it.
- ``SvhnDataset``: ``train_32x32.mat`` / ``test_32x32.mat`` (cropped digits) under ``data_root``.
- ``TinyImageNetDataset``: the ``tiny-imagenet-200`` folder (``train/<wnid>/images/*.JPEG``,
  ``val/images`` + ``val_annotations.txt``), ``data_root`` being that folder or its parent.

Nothing is downloaded: a missing file raises FileNotFoundError saying what is expected where. The
small-image datasets train with horizontal flip, a random crop with 4 px padding and AutoAugment
with the dataset's policy (torchvision's CIFAR10 / SVHN / IMAGENET policies).
"""
import os
import pickle
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.structures import BaseDataElement
from torch.utils.data import Dataset

from zoo.registry import DATASETS

__all__ = ["ClsDataset", "check_split", "DigitsDataset", "ImageFolderDataset", "Cifar10Dataset",
           "Cifar100Dataset", "SvhnDataset", "TinyImageNetDataset"]

_SPLITS = ("train", "val")


def check_split(split: str, accepted: Sequence[str] = _SPLITS) -> None:
    if split not in accepted:
        raise ValueError(f"split must be one of {tuple(accepted)}, got {split!r}")


class ClsDataset(Dataset):
    """Base of the classification datasets: ``CLASSES`` gives the metainfo, ``_item`` the Runner's item."""

    CLASSES: Tuple[str, ...] = ()

    @property
    def metainfo(self) -> dict:
        return dict(classes=tuple(self.CLASSES))

    def _item(self, img: torch.Tensor, label: int, idx: int) -> dict:
        return dict(inputs=img, data_samples=BaseDataElement(gt_label=int(label), sample_idx=idx))


@DATASETS.register_module()
class DigitsDataset(ClsDataset):
    """scikit-learn's 1,797 real 8×8 handwritten digits, shipped inside its wheel (no download).

    The split is stratified and deterministic (``seed``); ``val_fraction`` of each class goes to
    'val'. Images are upsampled once (bilinear) to ``img_size`` and stored as uint8.
    ``augment`` adds a random shift of up to ``img_size // 8`` pixels (train only).
    """

    CLASSES = tuple(str(i) for i in range(10))

    def __init__(self, split: str = "train", img_size: int = 32, in_chans: int = 3,
                 val_fraction: float = 0.2, seed: int = 0, augment: bool = False,
                 max_samples: Optional[int] = None):
        check_split(split)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grey) or 3 (grey repeated to RGB), got {in_chans}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if int(img_size) < 8:
            raise ValueError(f"img_size must be >= 8 (the source digits are 8x8), got {img_size}")
        from zoo._extras import requires_extra
        with requires_extra("train", "DigitsDataset"):
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
class ImageFolderDataset(ClsDataset):
    """ImageNet-style folders (``data_root/<split>/<class>/*.jpg``) with timm's transforms.

    ``data_root/<split>`` must exist: a missing split is an error naming the folders found (never
    a silent fallback to another folder). ``transform_kwargs`` go to ``timm.data.create_transform`` (e.g.
    ``auto_augment='rand-m9-mstd0.5-inc1'``, ``crop_pct``, ``interpolation``); normalisation and
    random erasing are left to the data preprocessor, so images come out as uint8.
    """

    def __init__(self, data_root: str, split: str = "train", img_size: Union[int, Tuple[int, int]] = 224,
                 transform_kwargs: Optional[dict] = None, class_map: Optional[str] = None):
        check_split(split, ("train", "val", "test"))
        data_root = os.path.expanduser(str(data_root))
        if not os.path.isdir(data_root):
            raise FileNotFoundError(
                f"image folder dataset root {data_root!r} does not exist (absolute: "
                f"{os.path.abspath(data_root)!r}); expected {data_root}/{split}/<class>/<images>. "
                f"Set data_root in the config, e.g. --cfg-options train_dataloader.dataset.data_root=/path")
        root = os.path.join(data_root, split)
        if not os.path.isdir(root):
            found = sorted(d for d in os.listdir(data_root) if os.path.isdir(os.path.join(data_root, d)))
            raise FileNotFoundError(
                f"split {split!r} not found: {root!r} does not exist. Folders in {data_root!r}: "
                f"{found or 'none'}; expected {data_root}/{split}/<class>/<images>. Give the folder that holds "
                f"{split}/ as data_root, or point the dataloader's split at one of those folders.")
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


class _ArrayDataset(ClsDataset):
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
        check_split(split)
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
        check_split(split)
        path = os.path.join(os.path.expanduser(str(data_root)), "train_32x32.mat" if split == "train" else "test_32x32.mat")
        if not os.path.isfile(path):
            raise _missing("SVHN file", path, "expected train_32x32.mat and test_32x32.mat under data_root")
        from zoo._extras import requires_extra
        with requires_extra("train", "SvhnDataset (.mat files)"):
            from scipy.io import loadmat
        d = loadmat(path)
        labels = d["y"].reshape(-1).astype(np.int64) % 10
        self._setup(np.asarray(d["X"], dtype=np.uint8).transpose(3, 0, 1, 2), labels, split, augment, max_samples)


@DATASETS.register_module()
class TinyImageNetDataset(ClsDataset):
    """Tiny-ImageNet-200 (64 px, 200 classes, 100k train / 10k val), read lazily from the JPEGs."""

    def __init__(self, data_root: str = "data/tiny-imagenet-200", split: str = "train", augment: bool = True,
                 max_samples: Optional[int] = None):
        check_split(split)
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
