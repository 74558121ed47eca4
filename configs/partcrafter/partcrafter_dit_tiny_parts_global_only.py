# Ablation of partcrafter_dit_tiny_parts.py: every block global (no part-local attention); the same
# data, objective, schedule and width. Measured numbers side by side in model_cards/partcrafter.md.
_base_ = ['./partcrafter_dit_tiny_parts.py']

model = dict(model_kwargs=dict(global_block_ids=[0, 1, 2, 3, 4]))
