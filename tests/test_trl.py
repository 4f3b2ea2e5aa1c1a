"""Agreement with TRL's chunked divergence (``trl.kernels.chunked_divergence``, TRL 1.16): for every setting it
supports (beta 0, 1 and between; temperature; each side's logit scale and final-logit softcap), promptkd's
per-token losses and student gradients are no further from float64 than TRL's, plus 1e-5.

TRL's beta convention is promptkd's: 0 the forward KL(teacher || student), 1 the reverse KL, between the JSD
with mixture beta * p + (1 - beta) * q (promptkd's ``jsd`` with the same beta). Its own error is checked
too, so the two compute the same thing (else the comparison would say nothing). Skipped where TRL is not
installed (it is not in the test extra: it pulls datasets, pandas and pyarrow).
"""

from __future__ import annotations

import math

import pytest
import torch

import promptkd

chunked_divergence = pytest.importorskip("trl.kernels.chunked_divergence",
                                         reason="TRL is not installed (pip install 'trl==1.16.*')")

N, D, V = 37, 64, 1001
CASES = [(beta, t, forms) for beta in (0.0, 0.3, 0.5, 1.0) for t in (1.0, 2.0)
         for forms in ((1.0, None, 1.0, None), (0.5, 30.0, 2.0, 20.0))]


def inputs():
    """float64 hidden states and heads whose logits have std ~10 (where TRL's JSD gradient error shows)."""
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64) * 10 / D ** 0.5
    wt = torch.randn(V, D, generator=g, dtype=torch.float64) * 10 / D ** 0.5
    upstream = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return hs, ws, ht, wt, upstream


def run(loss_fn, hs, ws, upstream, dtype):
    h, w = (x.detach().to(dtype, copy=True).requires_grad_() for x in (hs, ws))
    per_token = loss_fn(h, w)
    (per_token.double() * upstream).sum().backward()
    return per_token.double().detach(), h.grad.double(), w.grad.double()


def err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("beta,temperature,forms", CASES,
                         ids=[f"beta{b}-T{t}-{'capped' if f[1] else 'plain'}" for b, t, f in CASES])
def test_no_further_from_float64_than_trl(beta, temperature, forms):
    hs, ws, ht, wt, upstream = inputs()
    s_scale, s_cap, t_scale, t_cap = forms
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")

    def ours(impl, dtype):
        def loss(h, w):
            return promptkd.fused_linear_kd_loss(
                h, w, ht.to(dtype), wt.to(dtype), divergence=divergence, beta=beta if divergence == "jsd" else 0.5,
                temperature=temperature, reduction="none", student_logit_scale=s_scale, student_softcap=s_cap,
                teacher_logit_scale=t_scale, teacher_softcap=t_cap, impl=impl)
        return loss

    def trl(h, w):
        return chunked_divergence.ChunkedDivergenceFunction.apply(h, w, None, ht.float(), wt.float(), None, beta,
                                                                  temperature, s_scale, s_cap, t_scale, t_cap)[0]

    truth = run(ours("reference", torch.float64), hs, ws, upstream, torch.float64)
    theirs = run(trl, hs, ws, upstream, torch.float32)
    for impl in ("chunked", "torch"):
        mine = run(ours(impl, torch.float32), hs, ws, upstream, torch.float32)
        for name, t, o, x in zip(("loss", "student_hidden", "student_weight"), truth, mine, theirs, strict=True):
            assert err(x, t) < 1e-3, f"{name}: TRL computes something else ({err(x, t):.2g} from float64)"
            assert err(o, t) <= err(x, t) + 1e-5, f"{impl} {name}: {err(o, t):.3g} vs TRL's {err(x, t):.3g}"


# ---- the drop-in trainer (promptkd.integrations.trl) ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo's tiny Llama teacher and student with their tokenizer (left padding, as TRL asks) and prompts."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from promptkd.demo.run import DemoSettings, prepare

    settings = DemoSettings(n_train=16, n_valid=2, n_test=2, vocab_size=300, teacher=(32, 2, 2, 64),
                            student=(16, 1, 2, 32))
    paths = prepare(str(tmp_path_factory.mktemp("trl")), settings, seed=0, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(paths["student_init"])
    tokenizer.padding_side = "left"
    prompts = Dataset.from_dict({"prompt": ["sort: 3 1 2", "reverse: a b c", "convert 5 km", "add 2 3"] * 2})
    return paths, tokenizer, prompts


def train_losses(tiny, tmp_path, trainer_class, beta, **kwargs) -> list[float]:
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig

    paths, tokenizer, prompts = tiny
    student = AutoModelForCausalLM.from_pretrained(paths["student_init"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher_init"])
    args = DistillationConfig(output_dir=str(tmp_path / trainer_class.__module__), max_steps=2, beta=beta, seed=0,
                              per_device_train_batch_size=4, max_completion_length=8, learning_rate=1e-3,
                              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                            processing_class=tokenizer, **kwargs)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_drop_in_trains_as_trl_does(tiny, tmp_path, beta):
    """TRL's trainer for two steps (on-policy generation, an optimizer step between them) with its own loss and
    with promptkd's: the same losses where the divergences coincide (beta 0, 0.5 and 1)."""
    import trl

    from promptkd.integrations.trl import DistillationTrainer

    theirs = train_losses(tiny, tmp_path, trl.DistillationTrainer, beta)
    ours = train_losses(tiny, tmp_path, DistillationTrainer, beta, loss_impl="chunked")
    assert len(ours) == len(theirs) == 2 and all(x > 0 for x in ours)
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_the_drop_in_takes_every_promptkd_divergence(tiny, tmp_path):
    """divergence= overrides TRL's beta: DistiLLM's skew forward KL trains (finite, another loss than the JSD's);
    bad settings are refused by name; a TRL outside the supported range is an ImportError naming it."""
    from promptkd.integrations import trl as drop_in

    skew = train_losses(tiny, tmp_path, drop_in.DistillationTrainer, 0.5, divergence="skew_forward_kl", alpha=0.3)
    jsd = train_losses(tiny, tmp_path, drop_in.DistillationTrainer, 0.5)
    assert all(math.isfinite(x) for x in skew) and skew[0] != pytest.approx(jsd[0], rel=1e-3)
    with pytest.raises(ValueError, match="divergence must be None"):
        drop_in.DistillationTrainer(model=None, divergence="kl")
    with pytest.raises(ValueError, match="alpha must be a number in"):
        drop_in.DistillationTrainer(model=None, alpha=1.0)


def test_an_unsupported_trl_version_is_refused(monkeypatch):
    from promptkd.integrations import trl as drop_in

    monkeypatch.setattr(drop_in, "version", lambda name: "1.17.0")
    with pytest.raises(ImportError, match=r"supports TRL >= 1.16.0, < 1.17.0 .* found TRL 1.17.0"):
        drop_in._check_trl()
    monkeypatch.setattr(drop_in, "version", lambda name: "1.16.2")
    drop_in._check_trl()
