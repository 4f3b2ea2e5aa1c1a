"""Models and tokenizers from GGUF files, on tiny Llama GGUF files written here with the ``gguf`` package
the way llama.cpp's converter writes them (q/k rows permuted, a byte-level BPE tokenizer in the metadata).

Checks: the loaded model has the source model's weights and logits exactly (float32 tensors), Q4_1 blocks
are dequantised as gguf dequantises them, the loaded model saves (no quantiser left) and loads back with
the same logits, the tokenizer round-trips, the trainer and ``promptkd eval`` take .gguf paths, and a
missing package or a bad file is an input error that names the fix.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF tests write their files with the gguf package: "
                                          "pip install 'promptkd[gguf]'")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'promptkd[gguf]'")

from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from promptkd.cli import main  # noqa: E402
from promptkd.errors import InputError  # noqa: E402
from promptkd.hf import gguf as pk_gguf  # noqa: E402
from promptkd.hf.models import check_model_path, load_model, load_tokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # as SmolLM2: pad/unk, bos, eos
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġ t", "Ġt he"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# transformers' LlamaForCausalLM names -> llama.cpp's, per layer
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_llama(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows from rotate-half to interleaved pairs;
    transformers' loader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: str, q4_1: tuple[str, ...] = ()) -> str:
    """``model`` (a LlamaForCausalLM over :data:`TOKENS`) as llama.cpp writes it; the layer weights named in
    ``q4_1`` (e.g. ``"mlp.up_proj"``) stored in Q4_1 blocks, the rest in float32."""
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if q4_1 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(TEMPLATE)
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        array = tensor.numpy()
        if module in TOP_NAMES:
            name = TOP_NAMES[module]
        else:
            _, _, layer, *rest = module.split(".")
            part = ".".join(rest)
            if part == "self_attn.q_proj":
                array = llama_cpp_permute(array, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                array = llama_cpp_permute(array, c.num_key_value_heads)
            name = f"blk.{layer}.{BLOCK_NAMES[part]}"
            if part in q4_1:
                blocks = gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q4_1)
                w.add_tensor(f"{name}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                continue
        w.add_tensor(f"{name}.weight", np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q4_1_roundtrip(t: torch.Tensor) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType.Q4_1
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), kind), kind).copy())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(source model, its float32 GGUF, a 2-layer model, its GGUF with Q4_1 MLP weights)."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    small = tiny_llama(layers=2, seed=1)
    return (model, write_llama_gguf(model, str(root / "tiny.f32.gguf")), small,
            write_llama_gguf(small, str(root / "tiny.q4_1.gguf"), q4_1=("mlp.gate_proj", "mlp.up_proj")))


def ids(seed=3, shape=(2, 13)):
    return torch.randint(0, len(TOKENS), shape, generator=torch.Generator().manual_seed(seed))


def test_gguf_model_is_the_source_model(files):
    model, path, _, _ = files
    loaded = load_model("teacher", path, torch.float32, torch.device("cpu"))
    assert type(loaded) is transformers.LlamaForCausalLM
    c = loaded.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (4, 32, 4, 2, len(TOKENS))
    source = model.state_dict()
    assert loaded.state_dict().keys() == source.keys()
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, source[key]), key
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert getattr(loaded, "hf_quantizer", None) is None and not loaded.is_quantized
    assert not hasattr(loaded.config, "quantization_config")


def test_q4_1_blocks_are_dequantised(files):
    _, _, small, path = files
    loaded = load_model("student", path, torch.float32, torch.device("cpu")).state_dict()
    for key, tensor in small.state_dict().items():
        quantized = "gate_proj" in key or "up_proj" in key
        expected = q4_1_roundtrip(tensor) if quantized else tensor
        assert torch.equal(loaded[key], expected), key
        if quantized:
            assert not torch.equal(loaded[key], tensor), key  # the blocks did lose precision


def test_loaded_gguf_model_saves_and_loads_back(files, tmp_path):
    _, path, _, _ = files
    loaded = load_model("teacher", path, torch.float32, torch.device("cpu"))
    loaded.save_pretrained(str(tmp_path / "saved"))  # refused while the GGUF quantiser is attached
    config = json.load(open(tmp_path / "saved" / "config.json"))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    x = ids(4)
    with torch.no_grad():
        assert torch.equal(back(x).logits, loaded(x).logits)


def test_gguf_tokenizer(files, tmp_path):
    _, path, _, _ = files
    tok = load_tokenizer("tokenizer", path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert len(tok) == len(TOKENS)
    text = "hello world, the end"
    encoded = tok(text, add_special_tokens=False).input_ids
    assert encoded[:4] == [TOKENS.index("hell"), TOKENS.index("o"), TOKENS.index("Ġw"), TOKENS.index("or")]
    assert tok.decode(encoded) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    tok.save_pretrained(str(tmp_path / "tok"))
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert back(text, add_special_tokens=False).input_ids == encoded


def test_trainer_and_eval_take_gguf_paths(files, tmp_path):
    """A PromptKD run with a GGUF teacher and a GGUF student (whose checkpoints must save), then eval on one."""
    from promptkd.train import TrainConfig, train

    _, teacher, _, student = files
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {w}", "output": f" hello {w}"}) + "\n"
                            for w in ("world", "hello", "whirl", "or", "the", "theory", "hell", "low")))
    cfg = TrainConfig(method="promptkd", student=student, teacher=teacher, train_file=str(data), valid_file="",
                      output_dir=str(tmp_path / "run"), max_length=40, max_prompt_length=20, batch_size=4,
                      max_steps=2, lr=1e-3, warmup_steps=1, max_new_tokens=4, prompt_length=3, progress=False,
                      tensorboard=False, loss_impl="torch", attention_impl="torch", device="cpu")
    run_dir = train(cfg, log=lambda _: None)
    saved = os.path.join(run_dir, "final", "model")
    assert transformers.AutoModelForCausalLM.from_pretrained(saved).config.num_hidden_layers == 2
    assert main(["eval", "--model", teacher, "--data", str(data), "--seeds", "1", "--limit", "2",
                 "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"]) == 0


def test_missing_package_names_the_install_command(files, monkeypatch, capsys):
    _, path, _, _ = files
    real = importlib.metadata.version

    def version(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(InputError, match=r"needs gguf>=0\.10\.0: pip install 'promptkd\[gguf\]'"):
        check_model_path("teacher", path)
    assert main(["eval", "--model", path, "--data", path]) == 2
    assert "pip install 'promptkd[gguf]'" in capsys.readouterr().err


def test_bad_gguf_paths(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_model_path("teacher", str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="does not exist"):
        check_model_path("teacher", "org/model.gguf")  # not a hub name: a GGUF must be local
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(InputError, match="could not read"):
        load_model("teacher", str(garbage), torch.float32, torch.device("cpu"))
    with pytest.raises(InputError, match="could not read"):
        load_tokenizer("tokenizer", str(garbage))


def test_make_plain_lets_a_gguf_model_save(files, tmp_path):
    """transformers' own GGUF load (no dense-weights request, as older versions always load) keeps the
    quantiser and refuses to save; make_plain drops it."""
    _, path, _, _ = files
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(str(tmp_path / "refused"))
    pk_gguf.make_plain(model).save_pretrained(str(tmp_path / "saved"))
    assert "quantization_config" not in json.load(open(tmp_path / "saved" / "config.json"))


def test_make_plain_refuses_packed_weights():
    model = tiny_llama(layers=1)
    model.model.norm.weight = torch.nn.Parameter(torch.zeros(32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(RuntimeError, match="packed GGUF weights"):
        pk_gguf.make_plain(model)


def test_teacher_cache_takes_a_gguf_teacher(files, tmp_path):
    """``cache_teacher`` on a .gguf teacher: its fingerprint is the file's sha256, its targets those of the same
    model saved as a directory."""
    from promptkd.train.checkpoints import file_digest
    from promptkd.train.teacher_cache import TeacherCache, cache_teacher

    _, path, _, _ = files
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {w}", "output": f" hello {w} or"}) + "\n"
                            for w in ("world", "hello", "whirl", "or", "the", "theory", "hell")))
    folder = str(tmp_path / "as_directory")
    load_model("teacher", path, torch.float32, torch.device("cpu")).save_pretrained(folder)
    load_tokenizer("teacher", path).save_pretrained(folder)
    settings = dict(top_k=5, max_length=40, max_prompt_length=20, batch_size=3, dtype="float32", device="cpu",
                    log=lambda _: None)
    manifest = cache_teacher(path, str(data), str(tmp_path / "from_gguf"), **settings)
    cache_teacher(folder, str(data), str(tmp_path / "from_dir"), **settings)
    assert manifest["teacher"]["files"] == {"tiny.f32.gguf": file_digest(path)}
    assert manifest["teacher"]["config_sha256"] is None and manifest["vocab_size"] == len(TOKENS)
    a, b = TeacherCache(str(tmp_path / "from_gguf")), TeacherCache(str(tmp_path / "from_dir"))
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"] and a.num_examples == 7
    for i in range(a.num_examples):
        assert torch.equal(a.example(i)[0], b.example(i)[0]) and torch.equal(a.example(i)[1], b.example(i)[1])
