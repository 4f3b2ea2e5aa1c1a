"""Hugging Face integration: the ``promptkd_prefix`` attention interface (attention), the teacher with
a soft prompt (prompted), hidden states and output heads without logits and model loading (models),
and FSDP sharding (fsdp)."""
