"""Test-only hook (imported through a test config's custom_imports): after training, every rank
saves its model weights, so the DDP test can check that the ranks ended identical."""
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankWeightsHook(Hook):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def after_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        os.makedirs(self.out_dir, exist_ok=True)
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(dict(state_dict=sd, iter=runner.iter, world_size=runner.world_size),
                   os.path.join(self.out_dir, f"rank{get_rank()}.pt"))
