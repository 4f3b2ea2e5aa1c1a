"""Evaluation (ROUGE-L, exact match, seeded sampling with a tiny GPT-2) and run plots."""

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from promptkd.train.evaluate import evaluate, exact_match, rouge_l, sample, write_generations
from promptkd.train.plot import bar_chart, legend_width, line_style, plot_comparison, plot_run, read_metrics

VOCAB = 50
PAD, EOS = 0, 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Lengths 3, 7, 1, 5, 2 so that sorting by length reorders them and batches need padding.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20], [21, 22]]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def constant_logits(model: GPT2LMHeadModel, logits: torch.Tensor) -> GPT2LMHeadModel:
    """Make the model predict the same ``logits`` [V] at every position, whatever the input.

    The final layer norm outputs its bias c alone (weight 0); the tied output embedding then gives
    logits W c. With c = e_0 and column 0 of W set to ``logits``, the prediction is ``logits``.
    """
    model.transformer.ln_f.weight.zero_()
    model.transformer.ln_f.bias.zero_()
    model.transformer.ln_f.bias[0] = 1.0
    model.lm_head.weight[:, 0] = logits
    return model


def gen(model, prompts=PROMPTS, **kwargs):
    settings = dict(pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=8, seed=10, batch_size=2)
    settings.update(kwargs)
    return sample(model, prompts, **settings)


# ---- metrics -------------------------------------------------------------------------------------

def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("the cat sat", "dogs bark loudly") == 0.0
    assert rouge_l("", ["anything"]) == 0.0
    # Porter stemming: running -> run, cats -> cat.
    assert rouge_l("running cats", ["run cat"]) == pytest.approx(100.0)
    # LCS "a c" of 3 and 2 tokens: P = 2/3, R = 1, F = 0.8.
    assert rouge_l("a b c", "a c") == pytest.approx(80.0)


def test_rouge_l_best_of_references():
    best = rouge_l("the quick brown fox", ["a lazy dog", "the quick brown fox jumps", "quick"])
    assert best == pytest.approx(rouge_l("the quick brown fox", "the quick brown fox jumps"))
    assert 0 < best < 100


@pytest.mark.parametrize("prediction, references, expected", [
    ("Paris", ["paris"], 100.0),
    ("  The   answer is   Paris!  ", ["the answer is paris"], 100.0),
    ("yes.", ["No", "Yes"], 100.0),
    ("Paris?!", "paris", 100.0),
    ("Paris, France", ["paris france"], 0.0),  # only trailing punctuation goes
    ("Lyon", ["Paris", "Marseille"], 0.0),
])
def test_exact_match_normalization(prediction, references, expected):
    assert exact_match(prediction, references) == expected


def test_metric_errors():
    with pytest.raises(ValueError, match="references"):
        rouge_l("a", [])
    with pytest.raises(TypeError, match="references"):
        exact_match("a", [1])
    with pytest.raises(TypeError, match="prediction"):
        rouge_l(None, ["a"])


# ---- sample --------------------------------------------------------------------------------------

def test_sample_deterministic_and_seeded():
    model = tiny_gpt2()
    first = gen(model, seed=10)
    assert gen(model, seed=10) == first
    assert gen(model, seed=20) != first
    assert len(first) == len(PROMPTS)


def test_sample_independent_of_and_preserves_caller_rng():
    model = tiny_gpt2()
    torch.manual_seed(123)
    torch.rand(3)
    state = torch.random.get_rng_state()
    first = gen(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(456)
    assert gen(model) == first


def test_sample_greedy_batched_left_padding_matches_single_in_input_order():
    model = tiny_gpt2()
    batched = gen(model, do_sample=False, batch_size=4)
    single = [gen(model, [p], do_sample=False)[0] for p in PROMPTS]
    assert batched == single
    assert any(len(out) > 0 for out in single)


def test_sample_forced_eos_gives_empty_outputs():
    logits = torch.zeros(VOCAB)
    logits[EOS] = 100.0
    model = constant_logits(tiny_gpt2(), logits)
    assert gen(model, pad_token_id=2) == [[] for _ in PROMPTS]
    assert gen(model, do_sample=False) == [[] for _ in PROMPTS]


def test_sample_cuts_at_first_eos_and_drops_padding():
    # eos likely but not certain at every step, pad never sampled: any pad in an output is padding
    # that should have been cut with the eos.
    logits = torch.zeros(VOCAB)
    logits[EOS] = 2.5
    logits[2] = -100.0
    model = constant_logits(tiny_gpt2(), logits)
    outputs = gen(model, PROMPTS * 4, pad_token_id=2, batch_size=8, max_new_tokens=12)
    lengths = [len(out) for out in outputs]
    assert all(EOS not in out and 2 not in out for out in outputs)
    assert min(lengths) < 12 and max(lengths) > 0


def test_sample_restores_training_mode_and_handles_empty():
    model = tiny_gpt2().train()
    gen(model)
    assert model.training
    model.eval()
    gen(model)
    assert not model.training
    assert gen(model, []) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
])
def test_sample_errors(kwargs, match):
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=match):
        gen(tiny_gpt2(), prompts, **kwargs)


def test_sample_type_errors():
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        gen(tiny_gpt2(), [torch.tensor([1, 2])])
    with pytest.raises(TypeError, match="eos_token_id"):
        gen(tiny_gpt2(), eos_token_id=None)


# ---- evaluate ------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[EOS]", "[UNK]", "yes", "no", "the", "answer", "is", "what", "question", ":", "?", "."]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def yes_model() -> GPT2LMHeadModel:
    logits = torch.zeros(VOCAB)
    logits[WORDS.index("yes")] = 100.0
    return constant_logits(tiny_gpt2(), logits)


EXAMPLES = [
    {"prompt": "question : what is the answer ?", "references": ["Yes.", "yes it is"]},
    {"prompt": "what ?", "response": "no"},
]


def test_tiny_tokenizer_ids():
    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, EOS)
    assert tok("what is the answer ?")["input_ids"] == [8, 7, 5, 6, 11]


def test_evaluate_scores_forced_answer():
    result = evaluate(yes_model(), tiny_tokenizer(), EXAMPLES, seeds=(10, 20), max_new_tokens=1)
    assert result["generations"] == ["yes", "yes"]
    assert result["rougeL"] == pytest.approx(50.0)
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["rougeL_std"] == 0.0 and result["exact_match_std"] == 0.0
    assert [s["seed"] for s in result["per_seed"]] == [10, 20]
    assert result["num_examples"] == 2


def test_evaluate_sampled_is_deterministic_and_greedy_single_pass():
    model, tok = tiny_gpt2(), tiny_tokenizer()
    first = evaluate(model, tok, EXAMPLES, seeds=(10, 20, 30), max_new_tokens=6)
    assert evaluate(model, tok, EXAMPLES, seeds=(10, 20, 30), max_new_tokens=6) == first
    assert set(first) == {"rougeL", "rougeL_std", "exact_match", "exact_match_std", "per_seed", "generations",
                          "num_examples"}
    assert len(first["per_seed"]) == 3 and 0 <= first["rougeL"] <= 100
    greedy = evaluate(model, tok, EXAMPLES, do_sample=False, max_new_tokens=6)
    assert [s["seed"] for s in greedy["per_seed"]] == [None]
    assert greedy["rougeL_std"] == 0.0


def test_evaluate_errors():
    model, tok = tiny_gpt2(), tiny_tokenizer()
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        evaluate(model, tok, [EXAMPLES[0], {"prompt": "what ?"}])
    with pytest.raises(ValueError, match="examples"):
        evaluate(model, tok, [])
    with pytest.raises(ValueError, match="seeds"):
        evaluate(model, tok, EXAMPLES, seeds=())
    with pytest.raises(ValueError, match="temperature"):
        evaluate(model, tok, EXAMPLES, temperature=0)
    with pytest.raises(ValueError, match=r"examples\[0\]\['prompt'\]"):
        evaluate(model, tok, [{"prompt": "", "response": "no"}])


def test_write_generations(tmp_path):
    result = evaluate(yes_model(), tiny_tokenizer(), EXAMPLES, seeds=(10,), max_new_tokens=1)
    path = tmp_path / "generations.jsonl"
    write_generations(str(path), EXAMPLES, result)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1] == {"prompt": "what ?", "prediction": "yes", "references": ["no"]}
    assert [p.name for p in tmp_path.iterdir()] == ["generations.jsonl"]


# ---- plots ---------------------------------------------------------------------------------------

def write_run(folder, rows, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + tail
    (folder / "metrics.jsonl").write_text(text)
    return str(folder)


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


RUN_ROWS = [
    {"step": 1, "train/loss": 3.0, "train/lr": 1e-4, "note": "warmup", "done": False},
    {"step": 2, "train/loss": 2.5, "train/lr": 2e-4},
    {"step": 2, "valid/rougeL": 12.5},
    {"step": 3, "train/loss": 2.0, "train/lr": 2e-4},
    {"step": 4, "train/loss": 1.8, "valid/rougeL": 15.0},
]


def test_read_metrics_skips_truncated_last_line(tmp_path):
    run = write_run(tmp_path / "run", RUN_ROWS, tail='{"step": 5, "train/lo')
    assert read_metrics(f"{run}/metrics.jsonl") == RUN_ROWS


def test_read_metrics_warns_on_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a\n{"step": 3, "a": 3}\n')
    with pytest.warns(UserWarning, match="metrics.jsonl:2"):
        assert [r["step"] for r in read_metrics(str(path))] == [1, 3]


def test_plot_run_writes_one_png_per_numeric_metric(tmp_path):
    run = write_run(tmp_path / "run", RUN_ROWS, tail='{"step": 5, "tr')
    paths = plot_run(run)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["train_loss.png", "train_lr.png", "valid_rougeL.png"]
    assert all(p.startswith(f"{run}/plots/") and is_png(p) for p in paths)
    out = plot_run(run, out_dir=str(tmp_path / "elsewhere"))
    assert len(out) == 3 and all(is_png(p) for p in out)


def test_plot_run_errors(tmp_path):
    with pytest.raises(ValueError, match="run_dir"):
        plot_run(str(tmp_path / "missing"))
    run = write_run(tmp_path / "empty", [{"step": 1, "note": "x"}])
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_run(run)


def test_plot_comparison_and_bar_chart(tmp_path):
    runs = {
        "kd": write_run(tmp_path / "kd", RUN_ROWS),
        "promptkd": write_run(tmp_path / "pkd", [{"step": 2, "valid/rougeL": 20.0}, {"step": 4, "valid/rougeL": 22.0}]),
        "sft": write_run(tmp_path / "sft", [{"step": 1, "train/loss": 1.0}]),
    }
    with pytest.warns(UserWarning, match="sft"):
        path = plot_comparison(runs, "valid/rougeL", str(tmp_path / "cmp" / "rouge.png"), title="ROUGE-L")
    assert is_png(path)
    with pytest.raises(ValueError, match="metric"), pytest.warns(UserWarning):
        plot_comparison({"sft": runs["sft"]}, "valid/rougeL", str(tmp_path / "none.png"))

    bars = bar_chart({"SFT": 20.1, "KD": 21.5, "PromptKD": 23.0}, str(tmp_path / "bars.png"), "Final", "ROUGE-L",
                     errors={"SFT": 0.3, "PromptKD": 0.2})
    assert is_png(bars)
    with pytest.raises(ValueError, match="errors"):
        bar_chart({"SFT": 1.0}, str(tmp_path / "x.png"), "t", "y", errors={"KD": 0.1})
    with pytest.raises(ValueError, match="values"):
        bar_chart({}, str(tmp_path / "x.png"), "t", "y")
    many = bar_chart({f"promptkd[variant{i}]": 40.0 + i for i in range(14)}, str(tmp_path / "many.png"), "t", "y")
    assert is_png(many)


def test_lines_of_a_figure_never_look_alike():
    """The experiment draws 13 students on one figure: past the ten colours a line takes a dash pattern."""
    styles = [tuple(sorted(line_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
    assert line_style(0) == {"color": "C0", "linestyle": "-"} and line_style(10)["color"] == "C0"
    assert legend_width(13) > legend_width(3)  # a legend beside many lines, not over them


@pytest.mark.gpu
def test_sample_on_cuda_is_deterministic_and_preserves_cuda_rng():
    model = tiny_gpt2().cuda()
    state = torch.cuda.get_rng_state()
    first = gen(model)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert gen(model) == first
    assert gen(model, do_sample=False, batch_size=4) == gen(tiny_gpt2(), do_sample=False, batch_size=4)
