"""Data samplers for the Runner (registered in the zoo scope)."""
import math
from typing import Iterator, Optional

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from zoo.registry import DATA_SAMPLERS

__all__ = ["RepeatAugSampler"]


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
