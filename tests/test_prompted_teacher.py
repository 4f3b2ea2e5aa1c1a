"""PromptedTeacher on small randomly initialised GPT-2, Llama (GQA, RoPE), Mistral, Qwen2, Qwen3 (q/k norms),
Phi-3 (fused qkv), Gemma 2 (without its softcaps, which are refused), Gemma 3 (q/k norms, query_pre_attn_scalar,
sliding and global layers) and OPT models.

The central check: logits at the input positions and the soft prompt's gradient equal PEFT's prompt
tuning (the prompt concatenated to every sample) on the same model and prompt, to float32 precision.
"""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_models import NEWER_FAMILIES, tiny_decoder  # noqa: E402

from promptkd import PromptedTeacher, fused_linear_kd_loss  # noqa: E402
from promptkd.hf.attention import SUPPORTED_MODEL_TYPES  # noqa: E402

VOCAB, P = 97, 7
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    t = transformers
    if family == "gpt2":
        config = t.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **SMALL)
        return t.GPT2LMHeadModel(config).eval()
    if family in ("llama", "mistral", "qwen2"):
        kw = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **SMALL)
        cls = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
               "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM)}[family]
        return cls[1](cls[0](**kw)).eval()
    if family in NEWER_FAMILIES:
        return tiny_decoder(family, **SMALL)
    if family == "opt":
        config = t.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32, **SMALL)
        return t.OPTForCausalLM(config).eval()
    raise KeyError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "opt", *NEWER_FAMILIES]


def batch(padding: str, b=3, n=11, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padding == "right":
        mask[1, 8:] = 0
        mask[2, 4:] = 0
    elif padding == "left":
        mask[1, :3] = 0
        mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, SMALL["pad_token_id"])
    return ids, (None if padding == "none" else mask)


def peft_twin(family: str):
    """PEFT prompt tuning on an identical copy of the model; returns (peft model, its prompt parameter)."""
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=P)
    model = peft.get_peft_model(build(family), config).eval()
    return model, model.prompt_encoder["default"].embedding.weight


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compare_with_peft(family, padding, loss, logits_tol, grad_tol, device="cpu", **teacher_kwargs):
    """Our teacher and PEFT's prompt tuning on identical models and prompts: logits at the real input
    positions within ``logits_tol``, the soft prompt's gradient of ``loss(real logits)`` within ``grad_tol``."""
    twin, twin_prompt = peft_twin(family)
    twin = twin.to(device)
    teacher = PromptedTeacher(build(family).to(device), P, init_embeddings=twin_prompt.detach(), **teacher_kwargs)
    ids, mask = batch(padding)
    ids, mask = ids.to(device), None if mask is None else mask.to(device)
    out = teacher(ids, mask, return_logits=True).logits
    ref = twin(input_ids=ids, attention_mask=mask).logits[:, P:]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert rel(out[real], ref[real]) < logits_tol
    loss(out[real]).backward()
    loss(ref[real]).backward()
    assert teacher.soft_prompt.grad is not None and twin_prompt.grad is not None
    assert rel(teacher.soft_prompt.grad, twin_prompt.grad) < grad_tol


# PEFT runs Llama-style models and GPT-2 at positions 0..P+N-1 whatever the mask, OPT from the mask:
# with right padding both agree with ours; left padding is compared with PEFT only where PEFT uses the mask.
PEFT_CASES = [(f, pad) for f in FAMILIES for pad in ("none", "right")] + [("opt", "left")]


@pytest.mark.parametrize("family,padding", PEFT_CASES, ids=[f"{f}-{p}" for f, p in PEFT_CASES])
def test_matches_peft_prompt_tuning(family, padding):
    weights = torch.linspace(0.5, 1.5, VOCAB)  # a loss that is not symmetric in the logits
    compare_with_peft(family, padding, lambda logits: (logits.log_softmax(-1) * weights).sum(), 1e-5, 1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_triton_kernels_inside_the_model_match_peft(family):
    """The fused kernels (Triton's interpreter here) behind the transformers attention interface:
    strided q/k/v views, GQA, the padding mask and the shared prefix, against PEFT's concatenation."""
    compare_with_peft(family, "right", lambda logits: logits.logsumexp(-1).sum(), 1e-5, 1e-4, attention_impl="triton")


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_gives_each_sample_its_unpadded_result(family):
    teacher = PromptedTeacher(build(family), P, init="random")
    ids, mask = batch("left")
    out = teacher(ids, mask).hidden_states
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = teacher(ids[b:b + 1, real]).hidden_states[0]
        assert rel(out[b, real], alone) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_without_prompt_is_the_plain_model(family):
    plain = build(family)
    teacher = PromptedTeacher(copy.deepcopy(plain), P, init="random")
    ids, mask = batch("right")
    real = mask.bool()
    ref = plain(input_ids=ids, attention_mask=mask).logits
    with teacher.without_prompt():
        out = teacher(ids, mask, return_logits=True)
    assert teacher.use_prompt
    assert rel(out.logits[real], ref[real]) < 1e-5
    assert rel(teacher(ids, mask, use_prompt=False, return_logits=True).logits[real], ref[real]) < 1e-5
    prompted = teacher(ids, mask, return_logits=True).logits
    assert rel(prompted[real], ref[real]) > 1e-3  # the prompt does change the teacher


def test_outputs_feed_the_fused_loss():
    teacher = PromptedTeacher(build("llama"), P, init="random")
    ids, mask = batch("right")
    out = teacher(ids, mask, return_logits=True)
    assert out.hidden_states.shape == (3, 11, 32) and out.output_weight.shape == (VOCAB, 32)
    assert out.output_bias is None
    torch.testing.assert_close(out.hidden_states @ out.output_weight.T, out.logits)
    student_hidden = torch.randn(3, 11, 16, requires_grad=True)
    student_weight = torch.randn(VOCAB, 16, requires_grad=True)
    labels = torch.where(mask.bool(), ids, -100)
    loss = fused_linear_kd_loss(student_hidden, student_weight, out.hidden_states, out.output_weight, labels,
                                divergence="reverse_kl")
    loss.backward()
    assert teacher.soft_prompt.grad.abs().sum() > 0 and student_hidden.grad.abs().sum() > 0


def test_only_the_prompt_trains_and_the_model_stays_frozen_in_eval():
    teacher = PromptedTeacher(build("gpt2"), P, init="random")
    teacher.train()
    assert [name for name, p in teacher.named_parameters() if p.requires_grad] == ["soft_prompt"]
    assert not any(m.training for m in teacher.model.modules())
    assert teacher.soft_prompt.dtype == torch.float32 and teacher.soft_prompt.shape == (P, 32)


def test_prefix_keys_wait_for_the_pass_output(monkeypatch):
    """For a sharded model the prompt pass's recorded keys/values hand the pass's output a zero
    gradient (FSDP gathers a layer for backward from its output's gradient): the prompt pass's last
    layer then gets a gradient, which it otherwise never does, and the prompt's gradient is unchanged."""
    import promptkd.hf.fsdp

    init = torch.randn(P, 32)
    ids, mask = batch("right")
    grads, fired = [], []
    for sharded in (False, True):
        monkeypatch.setattr(promptkd.hf.fsdp, "managed_by_fsdp", lambda module, sharded=sharded: sharded)
        teacher = PromptedTeacher(build("llama"), P, init_embeddings=init)
        outputs, calls = [], []
        fired.append(calls)

        def keep(module, args, out, outputs=outputs):
            outputs.append(out[0] if isinstance(out, tuple) else out)

        handle = teacher.model.model.layers[-1].register_forward_hook(keep)
        out = teacher(ids, mask, return_logits=True)
        handle.remove()
        prompt_pass = outputs[0]  # [1, P, H]: the first call is the prompt's
        assert prompt_pass.shape[:2] == (1, P)
        prompt_pass.register_hook(calls.append)
        out.logits.float().logsumexp(-1)[mask.bool()].sum().backward()
        grads.append(teacher.soft_prompt.grad.clone())
    assert fired[0] == []
    assert len(fired[1]) == 1 and not fired[1][0].any()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_gradient_checkpointing_recomputes_identically(family):
    init = torch.randn(P, 32)
    ids, mask = batch("left")
    grads, calls = [], []
    for checkpointing in (False, True):
        teacher = PromptedTeacher(build(family), P, init_embeddings=init, gradient_checkpointing=checkpointing)
        teacher.train()
        count = [0]
        attention = [m for m in teacher.model.modules() if type(m).__name__.endswith("Attention")][0]
        attention.register_forward_hook(lambda *args, c=count: c.__setitem__(0, c[0] + 1))
        out = teacher(ids, mask)
        (out.hidden_states[mask.bool()] ** 2).sum().backward()
        grads.append(teacher.soft_prompt.grad)
        calls.append(count[0])
    assert calls == [2, 4]  # prompt pass + batch pass, each recomputed in backward when checkpointing
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


SHARED_CASES = [(f, "torch", False) for f in FAMILIES] + [("llama", "torch", True), ("gpt2", "torch", True),
                                                           ("llama", "triton", False)]


@pytest.mark.parametrize("family,impl,checkpointing", SHARED_CASES,
                         ids=[f"{f}-{i}{'-ckpt' if c else ''}" for f, i, c in SHARED_CASES])
def test_shared_prefix_equals_full_sequences(family, impl, checkpointing):
    """Several responses per instruction with the instruction run once as a shared prefix (after the
    soft prompt, or alone): hidden states and every gradient equal running each full sequence."""
    from promptkd.hf.attention import register
    from promptkd.hf.models import lm_hidden
    from promptkd.train.data import collate, collate_shared

    g = torch.Generator().manual_seed(11)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompts = [tokens(1), tokens(6), tokens(13)]  # the first has an empty shared part
    group = [0, 0, 1, 1, 1, 2]
    responses = [tokens(n) for n in (3, 0, 5, 1, 8, 4)]
    closed = [True, True, False, True, False, True]
    full = collate([prompts[i] for i in group], responses, 0, 2, closed)
    shared = collate_shared(prompts, responses, group, 0, 2, closed)
    assert torch.equal(full["labels"][full["labels"] != -100], shared["labels"][shared["labels"] != -100])
    prefix = (shared["prefix_ids"], shared["prefix_mask"], shared["group_index"])
    weights = torch.randn(8, 32, 32, generator=g)

    def loss(hidden, labels):  # a fixed, non-symmetric function of the states at the labelled positions
        picked = hidden[labels != -100]
        return (picked @ weights[: picked.shape[0]].sum(0)).tanh().sum() + (picked ** 2).sum()

    init = torch.randn(P, 32, generator=g)
    results = []
    for share in (False, True):
        teacher = PromptedTeacher(build(family), P, init_embeddings=init, gradient_checkpointing=checkpointing,
                                  attention_impl=impl)
        teacher.train()
        rows = shared if share else full
        out = teacher(rows["input_ids"], rows["attention_mask"], shared_prefix=prefix if share else None)
        plain = teacher(rows["input_ids"], rows["attention_mask"], use_prompt=False,
                        shared_prefix=prefix if share else None).hidden_states
        (prompt_grad,) = torch.autograd.grad(loss(out.hidden_states, rows["labels"]), teacher.soft_prompt)
        student = build(family)  # the student's path: a plain model, gradients to its weights
        student.set_attn_implementation(register())
        hidden = lm_hidden(student, rows["input_ids"], rows["attention_mask"], prefix if share else None,
                           attention_impl=impl).hidden
        loss(hidden, rows["labels"]).backward()
        results.append(dict(prompted=out.hidden_states[rows["labels"] != -100],
                            plain=plain[rows["labels"] != -100], prompt_grad=prompt_grad,
                            student=hidden[rows["labels"] != -100].detach(),
                            **{n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    assert results[0].keys() == results[1].keys() and len(results[0]) > 6
    largest = max(float(v.abs().max()) for v in results[0].values())
    for name, expected in results[0].items():
        # Relative to the tensor's largest entry; a key bias's gradient is zero up to rounding (softmax
        # ignores a shift shared by all keys), so that floor is a thousandth of the largest gradient.
        error = float((results[1][name] - expected).abs().max())
        assert error <= 2e-5 * max(float(expected.abs().max()), 1e-3 * largest), (name, error)


def test_shared_prefix_arguments():
    teacher = PromptedTeacher(build("llama"), P, init="random")
    ids, mask = batch("right")
    prefix = (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="attention_mask"):
        teacher(ids, None, shared_prefix=prefix)
    with pytest.raises(TypeError, match="shared_prefix must be a tuple"):
        teacher(ids, mask, shared_prefix=prefix[:2])
    with pytest.raises(ValueError, match="group_index must be"):
        teacher(ids, mask, shared_prefix=(*prefix[:2], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="prefix_ids and prefix_mask"):
        teacher(ids, mask, shared_prefix=(prefix[0], prefix[1][:, :2], prefix[2]))


def test_cached_generation_still_works_on_the_wrapped_model():
    plain = build("llama")
    teacher = PromptedTeacher(copy.deepcopy(plain), P, init="random")
    ids, mask = batch("left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(teacher.model.generate(ids, attention_mask=mask, **kw),
                       plain.generate(ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_after_the_prompt_continues_the_forward(family):
    """PromptedTeacher.generate (greedy, KV cache, left padding): each new token is the argmax of forward() on the
    row's tokens so far after the soft prompt, and each step's logits are forward()'s at that position."""
    teacher = PromptedTeacher(build(family), P, init="random")
    ids, mask = batch("left")
    steps = 4
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    out = teacher.generate(ids, attention_mask=mask, **kw)
    assert out.shape == (ids.shape[0], ids.shape[1] + steps) and torch.equal(out[:, :ids.shape[1]], ids)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], steps, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = teacher(out, full_mask, return_logits=True).logits
    n = ids.shape[1]
    assert torch.equal(logits[:, n - 1:-1].argmax(-1), out[:, n:])
    plain_logits = teacher(out, full_mask, use_prompt=False, return_logits=True).logits
    assert not torch.equal(plain_logits[:, n - 1:-1].argmax(-1), out[:, n:])  # the prompt changes the tokens
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        teacher.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)


def test_cached_generation_with_an_attention_softcap():
    """Gemma 2's attention softcap (tight) in decoding with a KV cache through the wrapped model's attention
    (explicit capped scores) gives the plain model's greedy tokens and step logits."""
    plain = tiny_decoder("gemma2", attn_logit_softcapping=0.5, initializer_range=0.5, **SMALL)
    teacher = PromptedTeacher(copy.deepcopy(plain), P, init="random")
    ids, mask = batch("left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ours, theirs = (m.generate(ids, attention_mask=mask, **kw) for m in (teacher.model, plain))
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cached_decoding_ignores_what_padded_positions_hold():
    """Decoding with a KV cache (queries are the last N of K keys): NaN and inf in padded keys/values and
    in the queries of rows that see no key change nothing, and those rows return 0."""
    from promptkd.hf.attention import _cached_decode

    g = torch.Generator().manual_seed(0)
    b, h, n, k, d = 3, 2, 2, 6, 8
    q, key, value = (torch.randn(b, h, m, d, generator=g) for m in (n, k, k))
    padding = torch.ones(b, k, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    padding[2, :] = False  # a row of nothing but padding: its queries see no key
    clean = _cached_decode(q, key.masked_fill(~padding[:, None, :, None], 0),
                           value.masked_fill(~padding[:, None, :, None], 0), padding, d ** -0.5)
    dirty_k, dirty_v, dirty_q = key.clone(), value.clone(), q.clone()
    dirty_k.masked_fill_(~padding[:, None, :, None], float("nan"))
    dirty_v.masked_fill_(~padding[:, None, :, None], float("inf"))
    dirty_q[2] = float("nan")
    out = _cached_decode(dirty_q, dirty_k, dirty_v, padding, d ** -0.5)
    assert torch.isfinite(out).all() and torch.equal(out, clean)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


class _Tokenizer:
    pad_token_id = 5

    def __call__(self, text):
        return {"input_ids": [10 + ord(c) % 50 for c in text.split()[0]]}  # one id per letter of the first word


def test_text_and_pad_initialisation():
    model = build("gpt2")
    embed = model.get_input_embeddings().weight.detach()
    teacher = PromptedTeacher(model, 7, init_text="Suppose you", tokenizer=_Tokenizer())
    ids = [10 + ord(c) % 50 for c in "Suppose"]
    torch.testing.assert_close(teacher.soft_prompt.detach(), embed[ids])
    teacher = PromptedTeacher(build("gpt2"), 10, init_text="abc", tokenizer=_Tokenizer())  # repeated to length
    torch.testing.assert_close(teacher.soft_prompt.detach(), embed[[10 + ord(c) % 50 for c in "abcabcabca"]])
    teacher = PromptedTeacher(build("gpt2"), 3, init="pad", tokenizer=_Tokenizer())
    torch.testing.assert_close(teacher.soft_prompt.detach(), embed[[5, 5, 5]])
    teacher = PromptedTeacher(build("gpt2"), 3, init="pad")  # from the config's pad_token_id
    torch.testing.assert_close(teacher.soft_prompt.detach(), embed[[0, 0, 0]])


def test_prompt_round_trips_through_peft(tmp_path):
    teacher = PromptedTeacher(build("opt"), P, init="random")
    teacher.save_prompt(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    loaded = peft.PeftModel.from_pretrained(build("opt"), str(tmp_path / "ours")).eval()
    ids, mask = batch("left")
    real = mask.bool()
    ref = loaded(input_ids=ids, attention_mask=mask).logits[:, P:]
    assert rel(teacher(ids, mask, return_logits=True).logits[real], ref[real]) < 1e-5

    twin, twin_prompt = peft_twin("opt")
    twin.save_pretrained(str(tmp_path / "peft"))
    other = PromptedTeacher(build("opt"), P, init="random")
    other.load_prompt(str(tmp_path / "peft"))
    assert torch.equal(other.soft_prompt.detach(), twin_prompt.detach())
    with pytest.raises(ValueError, match="prompt_embeddings"):
        PromptedTeacher(build("opt"), P + 1, init="random").load_prompt(str(tmp_path / "peft"))
    with pytest.raises(ValueError, match="directory"):
        other.load_prompt(str(tmp_path))


def test_bad_arguments():
    with pytest.raises(ValueError, match="gpt2, llama"):
        PromptedTeacher(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB)))
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        PromptedTeacher(build("gpt2"), 0, init="random")
    with pytest.raises(ValueError, match="init"):
        PromptedTeacher(build("gpt2"), P, init="zeros")
    with pytest.raises(ValueError, match="tokenizer"):
        PromptedTeacher(build("gpt2"), P)
    with pytest.raises(ValueError, match="init_embeddings"):
        PromptedTeacher(build("gpt2"), P, init_embeddings=torch.zeros(P, 31))
    with pytest.raises(ValueError, match="attention_impl"):
        PromptedTeacher(build("gpt2"), P, init="random", attention_impl="flash")
    teacher = PromptedTeacher(build("gpt2"), P, init="random")
    ids, mask = batch("right")
    with pytest.raises(ValueError, match="attention_mask"):
        teacher(ids, mask[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        teacher(ids[0])


@pytest.mark.parametrize("padding", ["none", "right"])
def test_gemma2_attention_softcap_matches_peft(padding):
    """Gemma 2's attention-score softcap (tight, so it matters) through prefix attention (auto: the torch path
    computes capped scores), against PEFT's prompt tuning on the model's own attention; the cap changes the
    logits (the comparison could fail)."""
    changes = dict(attn_logit_softcapping=0.5, initializer_range=0.5)
    twin_model = tiny_decoder("gemma2", **SMALL, **changes)
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=P)
    twin = peft.get_peft_model(twin_model, config).eval()
    twin_prompt = twin.prompt_encoder["default"].embedding.weight
    teacher = PromptedTeacher(tiny_decoder("gemma2", **SMALL, **changes), P, init_embeddings=twin_prompt.detach())
    ids, mask = batch(padding)
    out = teacher(ids, mask, return_logits=True).logits
    ref = twin(input_ids=ids, attention_mask=mask).logits[:, P:]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert rel(out[real], ref[real]) < 1e-5
    out[real].logsumexp(-1).sum().backward()
    ref[real].logsumexp(-1).sum().backward()
    assert rel(teacher.soft_prompt.grad, twin_prompt.grad) < 1e-4
    uncapped = PromptedTeacher(tiny_decoder("gemma2", **SMALL, initializer_range=0.5), P,
                               init_embeddings=twin_prompt.detach())
    assert rel(uncapped(ids, mask, return_logits=True).logits[real], ref[real]) > 1e-3


def test_final_softcaps_and_short_sliding_windows_are_refused():
    """What the prompted teacher does not implement is refused by name, never computed without: a final-logit
    softcap (its outputs are hidden states and a head), and a sliding window shorter than the keys a query
    sees (prompt included); a window that covers them runs (the PEFT comparison above)."""
    with pytest.raises(ValueError, match="final_logit_softcapping=30"):
        PromptedTeacher(tiny_decoder("gemma2", final_logit_softcapping=30.0, **SMALL), P, init="random")
    teacher = PromptedTeacher(tiny_decoder("gemma3_text", sliding_window=17, **SMALL), P, init="random")
    ids, mask = batch("right", n=10)
    teacher(ids, mask)  # 7 prompt tokens + 10 = 17 keys: the window covers them all
    with pytest.raises(ValueError, match="sliding window"):
        teacher(*batch("right", n=11))
    with teacher.without_prompt():
        teacher(*batch("right", n=11))  # 11 keys without the prompt


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_gpu_matches_peft_through_the_triton_kernels(family):
    """On CUDA the teacher's attention runs the Triton kernels (impl='auto'); float32 without tf32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    compare_with_peft(family, "right", lambda logits: logits.logsumexp(-1).sum(), 1e-4, 1e-3, device="cuda")
