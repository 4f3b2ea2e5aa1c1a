"""Bad input: a ValueError or TypeError naming the argument, raised before any work."""

import math

import pytest
import torch

import promptkd


def inputs(n=6, ds=8, dt=5, vs=11, vt=None):
    vt = vs if vt is None else vt
    return dict(student_hidden=torch.randn(n, ds), student_weight=torch.randn(vs, ds),
                teacher_hidden=torch.randn(n, dt), teacher_weight=torch.randn(vt, dt))


def call(args=None, **kwargs):
    a = inputs() if args is None else args
    return promptkd.fused_linear_kd_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"],
                                         a["teacher_weight"], kwargs.pop("labels", None), **kwargs)


KEYWORD_ERRORS = [
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(divergence="jsd", beta=0.0), ValueError, "beta"),
    (dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    (dict(divergence="skew_forward_kl", alpha=1.0), ValueError, "alpha"),
    (dict(divergence="skew_reverse_kl", alpha=-0.1), ValueError, "alpha"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(soft_weight=math.nan), ValueError, "soft_weight"),
    (dict(hard_weight=-1.0), ValueError, "hard_weight"),
    (dict(beta=torch.tensor(0.5)), TypeError, "beta"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(vocab_size=12), ValueError, "vocab_size"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(hard_weight=0.5), ValueError, "labels"),
]


@pytest.mark.parametrize("kwargs,exc,name", KEYWORD_ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(KEYWORD_ERRORS)])
def test_bad_keywords(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        call(**kwargs)


def _tensor_cases():
    yield "student_weight", dict(inputs(), student_weight=torch.randn(11, 9)), "student_weight"
    yield "teacher_weight", dict(inputs(), teacher_weight=torch.randn(11, 4)), "teacher_weight"
    yield "teacher_hidden lead", dict(inputs(), teacher_hidden=torch.randn(7, 5)), "teacher_hidden"
    yield "dtype", dict(inputs(), teacher_hidden=torch.randn(6, 5, dtype=torch.float64)), "teacher_hidden"
    yield "int hidden", dict(inputs(), student_hidden=torch.ones(6, 8, dtype=torch.int64)), "student_hidden"
    yield "1-d weight", dict(inputs(), student_weight=torch.randn(8)), "student_weight"
    yield "vocab mismatch", inputs(vt=13), "vocab_size"
    yield "not a tensor", dict(inputs(), student_hidden=[[1.0]]), "student_hidden"


@pytest.mark.parametrize("args,name", [c[1:] for c in _tensor_cases()], ids=[c[0] for c in _tensor_cases()])
def test_bad_tensors(args, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(args)


@pytest.mark.parametrize("labels,msg", [
    (torch.tensor([0, 1, 2, 3, 4, 11]), "labels"),          # out of range
    (torch.tensor([0, 1, 2, 3, 4, -5]), "labels"),          # negative, not ignore_index
    (torch.zeros(5, dtype=torch.long), "labels"),           # wrong shape
    (torch.zeros(6), "labels"),                              # floating
])
def test_bad_labels(labels, msg):
    with pytest.raises(ValueError, match=msg):
        call(labels=labels)


def test_bias_checks():
    a = inputs()
    with pytest.raises(ValueError, match="student_bias"):
        promptkd.fused_linear_kd_loss(*a.values(), student_bias=torch.randn(10))
    with pytest.raises(ValueError, match="teacher_bias"):
        promptkd.fused_linear_kd_loss(*a.values(), teacher_bias=torch.randn(11, dtype=torch.float64))


@pytest.mark.interpret  # the dtype message of impl='triton' on CPU tensors
def test_kd_loss_checks():
    with pytest.raises(ValueError, match="teacher_logits"):
        promptkd.kd_loss(torch.randn(4, 10), torch.randn(5, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        promptkd.kd_loss(torch.randn(4, 10), torch.randn(4, 12))
    with pytest.raises(ValueError, match="impl='triton' supports"):
        promptkd.kd_loss(torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64),
                         impl="triton")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="divergence"):
        promptkd.FusedLinearKDLoss(divergence="nope")


def test_checks_come_before_work(monkeypatch):
    """A bad argument never reaches an implementation."""
    import promptkd.kd.api

    def boom(*args):
        raise AssertionError("work started")

    monkeypatch.setattr(promptkd.kd.api, "_apply", boom)
    with pytest.raises(ValueError, match="labels"):
        call(labels=torch.tensor([0, 1, 2, 3, 4, 99]))


def test_checks_come_before_autocast_casts(monkeypatch):
    """Under autocast the checks see the cast dtypes, but the casts (copies) wait until every check passed."""
    import promptkd.attention.api
    import promptkd.kd.api

    def boom(*args):
        raise AssertionError("work started")

    monkeypatch.setattr(promptkd.kd.api, "autocast_inputs", boom)
    monkeypatch.setattr(promptkd.attention.api, "autocast_inputs", boom)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="labels"):
            call(labels=torch.tensor([0, 1, 2, 3, 4, 99]))
        q = torch.randn(1, 2, 3, 8)
        with pytest.raises(ValueError, match="scale"):
            promptkd.prefix_attention(q, q, q, q[:, :, :1], q[:, :, :1], scale=-1.0)


def test_labels_are_range_checked_on_the_host_only_for_cpu():
    """On CUDA a check would synchronise; there an out-of-range counted label makes the loss NaN instead
    (tests/test_kd_loss.py::test_out_of_range_labels_without_host_check)."""
    import promptkd.kd.api

    assert promptkd.kd.api._labels_checked_on_host(torch.device("cpu"))
    assert not promptkd.kd.api._labels_checked_on_host(torch.device("cuda"))
