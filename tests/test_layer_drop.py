"""``promptkd init-student``: a student made from the teacher by dropping decoder layers, on tiny random
4-layer models of every family it supports (GPT-2, Llama, Mistral, Qwen2 with sliding-window layers, Qwen3,
Phi-3, Gemma 2 and Gemma 3 with alternating sliding and global layers, OPT) and on a GGUF teacher.

Checks: the student's tensors are the teacher's (kept layers renumbered, nothing else added or lost),
keeping every layer gives the teacher's logits exactly, a 2-of-4 student loads back and decodes with its
KV cache as without it (the layers' indices renumbered), the tokenizer is copied, and bad arguments are
input errors raised before the teacher's weights are read.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import NEWER_FAMILIES, tiny_decoder  # noqa: E402

from promptkd.cli import main  # noqa: E402
from promptkd.demo.tokenizer import train_tokenizer  # noqa: E402
from promptkd.errors import InputError  # noqa: E402
from promptkd.hf import layer_drop  # noqa: E402
from promptkd.hf.layer_drop import LAYER_LISTS, drop_layers, init_student, spread  # noqa: E402

VOCAB = 300
FAMILIES = list(LAYER_LISTS)
SMALL = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build(family: str, layers: int = 4, seed: int = 0, **changes):
    torch.manual_seed(seed)
    t = transformers
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_layer=layers, n_embd=32, n_head=4, n_positions=64, **SMALL,
                                              **changes)).eval()
    if family == "opt":
        return t.OPTForCausalLM(t.OPTConfig(num_hidden_layers=layers, hidden_size=32, ffn_dim=64,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            word_embed_proj_dim=32, **SMALL, **changes)).eval()
    if family in NEWER_FAMILIES:  # Gemma's sliding layers see 4 keys: their layer_types must follow the drop
        window = dict(sliding_window=4) if family.startswith("gemma") else {}
        return tiny_decoder(family, layers=layers, seed=seed, tie_word_embeddings=False, **SMALL,
                            **{**window, **changes})
    kw = dict(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **SMALL)
    if family == "qwen2":  # the last two layers use sliding-window attention: layer_types must follow the drop
        kw.update(use_sliding_window=True, sliding_window=4, max_window_layers=layers // 2)
    kw.update(changes)
    config, model = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
                     "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM)}[family]
    return model(config(**kw)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["hello world, the cat sat on the mat"] * 4, vocab_size=VOCAB)


@pytest.fixture(scope="module", params=FAMILIES)
def teacher(request, tmp_path_factory, tokenizer):
    """(family, the teacher model, its directory with a tokenizer)."""
    model = build(request.param)
    path = str(tmp_path_factory.mktemp(request.param) / "teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return request.param, model, path


def ids(seed=3, shape=(2, 11)):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def teacher_key(family: str, key: str, keep: list[int]) -> str:
    """The teacher's name for a student tensor: layer i of the student is layer keep[i] of the teacher."""
    prefix = LAYER_LISTS[family] + "."
    match = re.match(re.escape(prefix) + r"(\d+)\.", key)
    return key if match is None else f"{prefix}{keep[int(match.group(1))]}.{key[match.end():]}"


def load(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_kept_layers_are_the_teachers(teacher, tmp_path):
    family, model, path = teacher
    keep = [1, 3]
    assert init_student(path, str(tmp_path / "student"), layers=keep) == keep
    student = load(str(tmp_path / "student"))
    assert student.config.num_hidden_layers == 2 and student.config.model_type == family
    source = model.state_dict()
    kept = {teacher_key(family, k, keep): v for k, v in student.state_dict().items()}
    prefix = re.escape(LAYER_LISTS[family])
    expected = {k for k in source if not re.match(prefix + r"\.\d+\.", k) or re.match(prefix + r"\.(1|3)\.", k)}
    assert set(kept) == expected, "the student holds exactly the embeddings, head, norms and the kept layers"
    for key, tensor in kept.items():
        assert torch.equal(tensor, source[key]), key
    if family == "qwen2":
        assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention",
                                            "sliding_attention"]
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    if family == "gemma3_text":
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
        assert student.config.layer_types == ["full_attention", "full_attention"]
        assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, None]


def decode_steps(model, x, start=6):
    """Logits of ``x`` computed token by token after a prefix of ``start`` tokens, through the KV cache."""
    out = model(x[:, :start], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(start, x.shape[1]):
        out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, 1)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_student_runs_and_decodes_with_its_cache(teacher, tmp_path):
    """The student in memory (renumbered layer indices: the KV cache has one entry per kept layer) decodes
    token by token as it computes a whole sequence, and the saved student loads back with its logits."""
    family, _, path = teacher
    dropped = drop_layers(build(family), [0, 2])
    init_student(path, str(tmp_path / "student"), layers=[0, 2])
    student = load(str(tmp_path / "student"))
    x = ids()
    with torch.no_grad():
        full = dropped(x).logits
        torch.testing.assert_close(decode_steps(dropped, x), full, rtol=1e-5, atol=1e-5)
        assert torch.equal(student(x).logits, full)


def test_keeping_every_layer_gives_the_teacher(teacher, tmp_path):
    _, model, path = teacher
    assert init_student(path, str(tmp_path / "student"), keep=4) == [0, 1, 2, 3]
    x = ids(4)
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "student"))(x).logits, model(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_layers_in_memory(family):
    model = build(family)
    layers = layer_drop.layer_list(model)[2]
    originals = [layers[0], layers[2], layers[3]]
    drop_layers(model, [0, 2, 3])
    kept = layer_drop.layer_list(model)[2]
    assert list(kept) == originals  # the teacher's own modules, in order
    assert model.config.num_hidden_layers == 3
    indices = [m.layer_idx for layer in kept for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert indices and sorted(set(indices)) == [0, 1, 2]


def test_spread():
    assert spread(1, 5) == [0]
    assert spread(2, 5) == [0, 4]
    assert spread(3, 30) == [0, 15, 29]
    assert spread(4, 4) == [0, 1, 2, 3]
    for total in range(1, 41):
        for n in range(1, total + 1):
            picked = spread(n, total)
            assert len(picked) == n and picked[0] == 0 and picked == sorted(set(picked))
            assert n == 1 or picked[-1] == total - 1


def test_cli_end_to_end(tmp_path, tokenizer, capsys):
    teacher = str(tmp_path / "teacher")
    model = build("llama", layers=6)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = str(tmp_path / "student")
    assert main(["init-student", "--teacher", teacher, "--keep", "3", "--out", out]) == 0
    assert "teacher layers 0,3,5" in capsys.readouterr().out
    student = load(out)
    assert student.config.num_hidden_layers == 3
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    copied = transformers.AutoTokenizer.from_pretrained(out)
    assert copied.get_vocab() == tokenizer.get_vocab() and copied.eos_token == tokenizer.eos_token
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    assert main(["init-student", "--teacher", teacher, "--layers", "0,1", "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert load(out).config.num_hidden_layers == 3  # left as it was
    assert main(["init-student", "--teacher", teacher, "--layers", "0,1", "--out", out, "--overwrite"]) == 0
    assert load(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,0"], r"\[0\] listed more than once"),
    (["--layers", "2,1"], "ascending order"),
    (["--layers", "0,4"], r"layers 0\.\.3, got \[4\]"),
    (["--layers", "-1"], r"got \[-1\]"),
    (["--layers", "0,x"], "comma-separated layer indices"),
    (["--layers", ""], "comma-separated layer indices"),
    (["--keep", "0"], r"--keep must lie in \[1, 4\]"),
    (["--keep", "5"], r"--keep must lie in \[1, 4\]"),
], ids=["repeated", "unsorted", "out-of-range", "negative", "not-an-int", "empty", "keep-0", "keep-too-many"])
def test_bad_layer_choices(tmp_path, monkeypatch, capsys, args, message):
    teacher = str(tmp_path / "teacher")
    build("gpt2").save_pretrained(teacher)
    monkeypatch.setattr("promptkd.hf.models.load_model", lambda *a, **k: pytest.fail("weights read before checks"))
    assert main(["init-student", "--teacher", teacher, "--out", str(tmp_path / "out"), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "out")


def test_bad_paths_and_families(tmp_path, monkeypatch):
    teacher = str(tmp_path / "teacher")
    build("gpt2").save_pretrained(teacher)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("promptkd.hf.models.load_model", lambda *a, **k: pytest.fail("weights read before checks"))
    with pytest.raises(InputError, match="is a file"):
        init_student(teacher, str(tmp_path / "file"), keep=2)
    with pytest.raises(InputError, match="does not exist"):
        init_student(str(tmp_path / "nowhere"), str(tmp_path / "out"), keep=2)
    for out in (teacher, str(tmp_path)):  # the teacher's directory, or one holding it
        with pytest.raises(InputError, match="holds the teacher"):
            init_student(teacher, out, keep=2, overwrite=True)
    with pytest.raises(InputError, match="either --layers or --keep"):
        init_student(teacher, str(tmp_path / "out"), layers=[0], keep=1)
    other = str(tmp_path / "neox")
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
    )).save_pretrained(other)
    with pytest.raises(InputError, match="layer dropping does not support 'gpt_neox' models; supported families: "):
        init_student(other, str(tmp_path / "out"), keep=1)


def test_gpt2_scaled_by_layer_index_keeps_only_leading_layers():
    with pytest.raises(InputError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(build("gpt2", scale_attn_by_inverse_layer_idx=True), [0, 2])
    assert drop_layers(build("gpt2", scale_attn_by_inverse_layer_idx=True), [0, 1]).config.n_layer == 2


def test_student_from_a_gguf_teacher(tmp_path):
    pytest.importorskip("gguf", reason="writing the GGUF teacher needs the gguf package: pip install 'promptkd[gguf]'")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from test_gguf import TOKENS, tiny_llama, write_llama_gguf

    model = tiny_llama()
    path = write_llama_gguf(model, str(tmp_path / "teacher.gguf"))
    out = str(tmp_path / "student")
    assert main(["init-student", "--teacher", path, "--layers", "1,2", "--out", out]) == 0
    student = load(out)
    source = model.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(tensor, source[teacher_key("llama", key, [1, 2])]), key
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(TOKENS) and tok.eos_token == "<|im_end|>"
    assert tok("hello", add_special_tokens=False).input_ids == [TOKENS.index("hell"), TOKENS.index("o")]
