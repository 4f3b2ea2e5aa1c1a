"""The fused KD loss: checks and dispatch (api), the validated settings (settings), the reference
(reference), the per-row formulas (math), the per-token bookkeeping both fused paths share (tokens:
counted tokens, bad labels, reduction), the torch and Triton implementations, the modules."""
