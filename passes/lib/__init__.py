"""The algorithms under the passes: training loop and distillation losses, prunable model families,
MoE routing and MoEfication, CNN channel pruning, node selection, shared training fields and
quantization helpers. Nothing here is registered as a pass; the modules in `compress.passes` are."""
