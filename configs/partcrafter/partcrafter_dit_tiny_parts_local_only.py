# Ablation of partcrafter_dit_tiny_parts.py: no global block (parts never see each other; only the
# part-ID embedding and the shared condition tell them apart). Numbers in model_cards/partcrafter.md.
_base_ = ['./partcrafter_dit_tiny_parts.py']

model = dict(model_kwargs=dict(global_block_ids=[]))
