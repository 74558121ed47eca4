"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so the Triton
kernels run on the CPU interpreter in CI; HF_HUB_OFFLINE keeps every test off the network."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Compiled-mode Triton tests need a GPU; .ci/gpu_check.sh runs them there. Without CUDA they are
# not collected at all (rather than reported as skipped on every CPU run).
collect_ignore_glob = [] if torch.cuda.is_available() else ["kernels/test_attention_gpu.py"]
