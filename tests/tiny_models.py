"""Tiny randomly initialised decoders of the families added after the first five (Qwen3, Phi-3, Gemma 2,
Gemma 3 text), shared by the prompted-teacher, layer-dropping and trainer tests.

Each exercises what sets its family apart: Qwen3's and Gemma 3's q/k norms (head_dim apart from
hidden / heads), Phi-3's fused qkv and gate/up projections, Gemma's scaled embeddings, its
``query_pre_attn_scalar`` (not head_dim, so the attention scale is the family's own) and Gemma 3's
sliding and global layers (``layer_types`` alternate, sliding first). Gemma 2's two softcaps are
off by default here (promptkd refuses them; tests that check the refusal turn them on).
"""

from __future__ import annotations

NEWER_FAMILIES = ("qwen3", "phi3", "gemma2", "gemma3_text")


def tiny_decoder(family: str, layers: int = 2, hidden: int = 32, seed: int = 0, **changes):
    """A ``*ForCausalLM`` of ``family`` in eval mode; ``changes`` (vocab and special tokens among them)
    go to its config."""
    import torch
    import transformers as t

    torch.manual_seed(seed)
    kw = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen3":
        kw.update(head_dim=12)
        config, model = t.Qwen3Config, t.Qwen3ForCausalLM
    elif family == "phi3":
        config, model = t.Phi3Config, t.Phi3ForCausalLM
    elif family == "gemma2":
        kw.update(head_dim=12, query_pre_attn_scalar=20, sliding_window=64, attn_logit_softcapping=None,
                  final_logit_softcapping=None)
        config, model = t.Gemma2Config, t.Gemma2ForCausalLM
    elif family == "gemma3_text":
        kw.update(head_dim=12, query_pre_attn_scalar=20, sliding_window=64,
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
        config, model = t.Gemma3TextConfig, t.Gemma3ForCausalLM
    else:
        raise KeyError(family)
    kw.update(changes)
    return model(config(**kw)).eval()
