"""The trainer's cross-entropy from hidden states (promptkd.hf.models): both paths against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptkd.hf import models
from promptkd.hf.models import LMOutput, linear_cross_entropy, recompute_cross_entropy

TORCH_CHUNKED = hasattr(torch.nn, "LinearCrossEntropyOptions")


def inputs(dtype, bias: bool, ignored: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 13, 24, generator=g).to(dtype).requires_grad_()  # 39 tokens
    weight = (torch.randn(301, 24, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(301, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, 301, (3, 13), generator=g)
    if ignored == "some":
        labels[torch.rand(3, 13, generator=g) < 0.3] = -100
    elif ignored == "all":
        labels[:] = -100
    return hidden, weight, b, labels


def grads(fn, dtype, bias, ignored):
    hidden, weight, b, labels = inputs(dtype, bias, ignored)
    loss = fn(hidden, weight, b, labels)
    leaves = [hidden, weight] + ([b] if bias else [])
    return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss * 1.7, leaves)]


def eager(hidden, weight, b, labels):
    logits = hidden @ weight.T + (0 if b is None else b)
    counted = (labels != -100).sum().clamp(min=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / counted


WAYS = {
    "linear_cross_entropy": lambda h, w, b, y: linear_cross_entropy(LMOutput(h, w, b), y, chunk_elements=301 * 8),
    "recompute_cross_entropy": lambda h, w, b, y: recompute_cross_entropy(LMOutput(h, w, b), y,
                                                                          chunk_elements=301 * 8),
}


@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("way", list(WAYS))
def test_cross_entropy_against_float64(way, bias, ignored):
    """Loss and every gradient (upstream gradient 1.7, chunks of 8 tokens over 39): error no larger than
    eager float32's plus 1e-6; with every token ignored, loss and gradients are exactly 0."""
    truth = grads(eager, torch.float64, bias, ignored)
    ours = grads(WAYS[way], torch.float32, bias, ignored)
    plain = grads(eager, torch.float32, bias, ignored)
    names = ["loss", "hidden", "weight", "bias"][:len(truth)]
    for name, t, o, e in zip(names, truth, ours, plain, strict=True):
        scale = t.abs().max().clamp(min=1e-30)
        assert ((o - t).abs().max() / scale) <= ((e - t).abs().max() / scale) + 1e-6, name
        if ignored == "all":
            assert torch.equal(o, torch.zeros_like(o)), name


@pytest.mark.skipif(not TORCH_CHUNKED, reason="torch < 2.13 has no torch.nn.functional.linear_cross_entropy")
def test_float32_with_a_gradient_uses_torch_chunked_path(monkeypatch):
    """float32 inputs that want a gradient go to torch's linear_cross_entropy with promptkd's chunk size;
    other dtypes and no-grad calls to the recomputing path."""
    calls = []
    original = F.linear_cross_entropy

    def counting(*args, options=None, **kwargs):
        calls.append(options.batch_chunk_size)
        return original(*args, options=options, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", counting)
    hidden, weight, b, labels = inputs(torch.float32, True, "some")
    linear_cross_entropy(LMOutput(hidden, weight, b), labels, chunk_elements=301 * 8)
    assert calls == [8]
    with torch.no_grad():
        linear_cross_entropy(LMOutput(hidden, weight, b), labels)
    h64, w64, b64, _ = inputs(torch.float64, True, "some")
    linear_cross_entropy(LMOutput(h64, w64, b64), labels)
    assert calls == [8]
    assert models._torch_chunked_applies(hidden, weight, None)
    assert not models._torch_chunked_applies(hidden.detach(), weight.detach(), None)


def _llama(**changes):
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      vocab_size=50, max_position_embeddings=32, **changes)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("field, value, transform", [
    ("final_logit_softcapping", 30.0, (1.0, 30.0)), ("logit_scale", 0.0625, (0.0625, None)),
    ("logits_scaling", 2.0, (0.5, None)), ("lm_head_multiplier", 0.5, (0.5, None)),
    ("output_multiplier", 3.0, (3.0, None))])
def test_logit_transforms_are_read_from_the_config(field, value, transform):
    """Each config field that transforms the logits (Gemma's softcap, Cohere's scale, Granite's divisor,
    Falcon-H1's multiplier) becomes the losses' (scale, softcap); a path that applies none refuses it by name;
    a value that is not a positive number is refused."""
    pytest.importorskip("transformers")
    model = _llama()
    assert models.logit_transform("student", model.config) == models.LINEAR
    setattr(model.config, field, value)
    assert models.logit_transform("student", model.config) == transform
    with pytest.raises(models.InputError, match=f"student: its config sets {field}={value}, .* and PromptedTeacher"):
        models.check_linear_logits("student", model.config, "PromptedTeacher")
    if field == "logits_scaling":
        model.config.model_type = "hyperclovax"  # which multiplies where Granite divides
        assert models.logit_transform("student", model.config) == (2.0, None)
    setattr(model.config, field, "inv_sqrt_d_model")
    with pytest.raises(models.InputError, match=f"student: its config sets {field}='inv_sqrt_d_model'"):
        models.logit_transform("student", model.config)


def _transformed(model, scale, softcap):
    """``model`` whose forward transforms its logits as a family with that config would."""
    from promptkd.kd.reference import transform_logits

    forward = model.forward

    def transformed(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = transform_logits(out.logits, scale, softcap)
        return out

    model.forward = transformed
    return model


def test_the_probe_checks_the_transform_against_the_models_own_logits():
    """probe_logits (the trainer's and cache-teacher's load check) returns the config's transform where the
    model's own logits are its head's, transformed so, and refuses a model whose forward changes its logits in
    a way its config does not say (here: halved, or capped without the field); it keeps the model's mode."""
    pytest.importorskip("transformers")
    model = _llama(initializer_range=0.5)
    model.train()
    assert models.probe_logits("teacher", model) == models.LINEAR
    assert model.training
    capped = _transformed(_llama(initializer_range=0.5, final_logit_softcapping=0.5), 1.0, 0.5)
    assert models.probe_logits("teacher", capped) == (1.0, 0.5)
    for scale, softcap in ((0.5, None), (1.0, 0.5)):
        with pytest.raises(models.InputError, match="teacher: the model's own logits are not its final hidden states"):
            models.probe_logits("teacher", _transformed(_llama(initializer_range=0.5), scale, softcap))
    assert model.training
