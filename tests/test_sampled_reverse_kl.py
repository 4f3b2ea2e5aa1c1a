"""The on-policy reverse KL from sampled tokens (promptkd.sampled_reverse_kl_loss): for given samples, value and
gradients equal a float64 evaluation of the estimator; over many samples from the student, the mean value and
the mean gradient are the exact reverse KL's (full logits, float64) within five standard errors."""

import pytest
import torch

import promptkd
from promptkd.kd.reference import transform_logits

IMPLS = ("chunked", "torch")


def _estimator_reference(h, w, b, ids, teacher_lp, scale=1.0, softcap=None, reduction="mean"):
    """The estimator by its formula in float64: r = log q(y) - log p(y), loss r + sg(r) log q - sg(r log q)."""
    z = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
    log_q_all = torch.log_softmax(transform_logits(z, scale, softcap), -1)
    counted = ids != -100
    log_q = log_q_all.gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    r = torch.where(counted, log_q.detach() - teacher_lp.double(), torch.zeros((), dtype=torch.float64))
    per = r + r * log_q - (r * log_q).detach()
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / counted.sum().clamp(min=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("transform", ((1.0, None), (0.7, 3.0)))
def test_equals_the_formula(impl, reduction, transform):
    torch.manual_seed(0)
    n, d, v = 37, 24, 101
    h = torch.randn(3, n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.3).requires_grad_()
    b = (torch.randn(v) * 0.1).requires_grad_()
    ids = torch.randint(0, v, (3, n))
    ids[0, :5] = -100
    ids[2, -3:] = -100
    teacher_lp = torch.log_softmax(torch.randn(3, n, v), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    teacher_lp[ids == -100] = float("nan")  # ignored positions are never read
    scale, softcap = transform
    loss = promptkd.sampled_reverse_kl_loss(h, w, ids, teacher_lp, student_bias=b, reduction=reduction,
                                            student_logit_scale=scale, student_softcap=softcap, impl=impl)
    upstream = torch.randn(loss.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    grads = torch.autograd.grad(loss, (h, w, b), upstream.to(loss.dtype))
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = _estimator_reference(hd, wd, bd, ids, teacher_lp, scale, softcap, reduction)
    ref_grads = torch.autograd.grad(ref, (hd, wd, bd), upstream.double())
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, f"{name}: {err}"


@pytest.mark.parametrize("impl", IMPLS)
def test_unbiased_for_the_exact_reverse_kl(impl):
    """Weight = identity, so the hidden states are the logits; at each of N positions, S tokens drawn from q."""
    torch.manual_seed(0)
    n, v, s = 5, 13, 20000
    logits = (torch.randn(n, v, dtype=torch.float64) * 1.5).requires_grad_()
    teacher = torch.log_softmax(torch.randn(n, v, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(logits.detach(), -1)
    y = torch.multinomial(q, s, replacement=True, generator=torch.Generator().manual_seed(1))
    rows = logits[:, None, :].expand(n, s, v)
    loss = promptkd.sampled_reverse_kl_loss(rows, torch.eye(v, dtype=torch.float64), y, teacher.gather(1, y),
                                            impl=impl)
    (grad,) = torch.autograd.grad(loss, logits)

    exact_logits = logits.detach().clone().requires_grad_()
    log_q = torch.log_softmax(exact_logits, -1)
    exact = (log_q.exp() * (log_q - teacher)).sum(-1).mean()
    (exact_grad,) = torch.autograd.grad(exact, exact_logits)

    # Standard errors from the samples themselves: the value's r(y), the gradient's r(y) (e_y - q) / N.
    lq = torch.log_softmax(logits.detach(), -1)
    r = lq.gather(1, y) - teacher.gather(1, y)                                   # [N, S]
    value_se = (r.var(1) / s).sum().sqrt() / n
    onehot = torch.nn.functional.one_hot(y, v).double()
    per_sample = r[..., None] * (onehot - q[:, None, :]) / n                      # [N, S, V]
    grad_se = per_sample.std(1) / s ** 0.5
    assert abs(loss.item() - exact.item()) < 5 * value_se.item()
    assert ((grad - exact_grad).abs() <= 5 * grad_se + 1e-12).all(), (grad - exact_grad).abs().max()
    # And the estimator is not the exact value at a few samples: the test can tell them apart.
    few = promptkd.sampled_reverse_kl_loss(rows[:, :3], torch.eye(v, dtype=torch.float64), y[:, :3],
                                           teacher.gather(1, y[:, :3]), impl=impl)
    assert abs(few.item() - exact.item()) > 1e-3


def test_nothing_counted_and_refusals():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    ids = torch.full((4,), -100)
    lp = torch.zeros(4)
    loss = promptkd.sampled_reverse_kl_loss(h, w, ids, lp)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()
    good = torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="sampled_ids must be an integer"):
        promptkd.sampled_reverse_kl_loss(h, w, good.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be a floating"):
        promptkd.sampled_reverse_kl_loss(h, w, good, good)
    with pytest.raises(ValueError, match="teacher_logprobs requires grad"):
        promptkd.sampled_reverse_kl_loss(h, w, good, lp.clone().requires_grad_())
    with pytest.raises(ValueError, match="sampled_ids must have student_hidden's leading shape"):
        promptkd.sampled_reverse_kl_loss(h, w, good[:3], lp[:3])
    with pytest.raises(ValueError, match="teacher_logprobs must have sampled_ids' shape"):
        promptkd.sampled_reverse_kl_loss(h, w, good, lp[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        promptkd.sampled_reverse_kl_loss(h, w, good, lp, reduction="avg")
    with pytest.raises(ValueError, match="labels|out of range|outside"):
        promptkd.sampled_reverse_kl_loss(h, w, torch.tensor([1, 2, 3, 10]), lp)
