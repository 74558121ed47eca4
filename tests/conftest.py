"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so the Triton
kernels run on the CPU interpreter in CI; HF_HUB_OFFLINE keeps every test off the network."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
