"""Causal attention over a prefix shared by a batch (or by groups of samples) and each sample's own keys.

api.py        prefix_attention: argument checks and dispatch
masks.py      the attention pattern as a boolean mask; masked keys and values zeroed (reference, torch)
reference.py  the oracle: concatenated keys, an explicit mask, plain torch
torch_impl.py CPU and fallback: scaled_dot_product_attention with a boolean mask (memory-lean)
triton_impl.py fused forward/backward kernels (kernels/prefix_attention_*.py)
"""

from .api import prefix_attention

__all__ = ["prefix_attention"]
