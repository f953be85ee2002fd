"""LoRA and checkpoint tools (networks/merge_lora.py, svd_merge_lora.py, resize_lora.py,
extract_lora_from_models.py, check_lora_weights.py, tools/merge_models.py) as functions.

- `factors`: a LoRA file's modules (every key style) as (down, up, alpha), their ΔW, exact low-rank SVDs,
  rank rules, re-factoring with a kept effective weight, concatenation.
- `files`: reading LoRA files, minimum metadata, writing with sshs_* hashes (atomic).
- `merge`: LoRAs into a model (LDM file or diffusers folder); LoRAs into one LoRA (concat or SVD).
- `resize`: fixed or dynamic rank, retained energy per module.
- `extract`: a LoRA from (tuned − original) by SVD.
- `checkpoints`: weighted average of LDM checkpoints, tensor by tensor.
"""
