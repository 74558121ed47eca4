"""The small-image datasets read from disk: a missing release is a clear error naming what is
expected where."""
import pytest

from zoo.engine.datasets import Cifar100Dataset, TinyImageNetDataset


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        Cifar100Dataset(data_root=str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match="tiny-imagenet"):
        TinyImageNetDataset(data_root=str(tmp_path), split="val")
