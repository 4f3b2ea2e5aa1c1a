"""The fused KD loss: checks and dispatch (api), the validated settings (settings), the reference
(reference), the per-row formulas (math), the torch and Triton implementations, the modules."""
