"""Instruction-following evaluation with the settings of the MiniLLM / PromptKD reference code.

Responses are sampled (temperature 1.0, no top-k, top-p 1.0) and scored with ROUGE-L F-measure
(``rouge-score``, Porter stemming), best over the references, x100; scores are averaged over
several seeds (10, 20, 30, 40, 50 in the reference) and reported with their spread::

    rougeL(seed) = mean over examples of max over references of 100 * F_L(prediction, reference)
    rougeL       = mean over seeds of rougeL(seed),   rougeL_std = population std over seeds

Exact match is computed the same way on normalized strings (see :func:`exact_match`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from rouge_score import rouge_scorer

from ..files import write_jsonl

DEFAULT_SEEDS = (10, 20, 30, 40, 50)

_SCORER = None  # built on first use: constructing it loads the stemmer
_TRAILING_PUNCTUATION = ".,!?;:"


def _scorer() -> rouge_scorer.RougeScorer:
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def _as_references(references, name: str = "references") -> list[str]:
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, (list, tuple)) or not all(isinstance(r, str) for r in references):
        raise TypeError(f"{name} must be a str or a list of str, got {type(references).__name__}")
    if len(references) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(references)


def rouge_l(prediction: str, references: list[str] | str) -> float:
    """ROUGE-L F-measure of ``prediction`` against its best reference, in 0..100 (stemmed, as in MiniLLM)."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    references = _as_references(references)
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _normalize(text: str) -> str:
    text = " ".join(text.lower().split())
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, references: list[str] | str) -> float:
    """100.0 if ``prediction`` equals any reference after normalization, else 0.0.

    Normalization: lowercase, collapse runs of whitespace to one space, strip surrounding
    whitespace and trailing punctuation (``.,!?;:``).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    references = _as_references(references)
    pred = _normalize(prediction)
    return 100.0 if any(pred == _normalize(ref) for ref in references) else 0.0


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_generation_args(max_new_tokens, batch_size, temperature, top_k, top_p, do_sample) -> None:
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("top_k", top_k, 0)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    if not isinstance(temperature, (int, float)) or (do_sample and not temperature > 0):
        raise ValueError(f"temperature must be a number > 0 when do_sample, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _eos_ids(eos_token_id) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not ids or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise TypeError(f"eos_token_id must be an int or a non-empty list of int, got {eos_token_id!r}")
    return list(ids)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _truncate_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | list[int],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Generate a continuation of each prompt with a Hugging Face causal LM; return new token ids per prompt.

    prompts: token id lists of any (non-zero) lengths. They are sorted by length (longest first,
    stable), cut into batches of ``batch_size``, left-padded with ``pad_token_id`` and masked. Each
    result stops before its first eos (``eos_token_id``, an id or a list of ids); results come back
    in input order. ``top_k=0`` means no top-k filter; ``do_sample=False`` decodes greedily.
    ``synced_gpus=True`` (a model sharded over processes, e.g. with FSDP) keeps every process running
    forward passes until all of them have finished (transformers' ``synced_gpus``).
    Sampling settings, lengths, eos/pad and ``repetition_penalty=1.0`` are passed explicitly, so a
    checkpoint's ``generation_config`` (e.g. its own temperature) does not change them.

    Determinism: the samples are a function of (seed, the prompts and their order, batch_size,
    the model and its device/dtype). Batch ``b`` of the length-sorted order is generated after
    ``torch.manual_seed(seed * 1_000_003 + b)`` (seeds of different calls and batches don't
    collide for seed, b < 1_000_003) inside ``torch.random.fork_rng``, so the result does not depend
    on what ran before and the caller's CPU (and the model's CUDA device's) RNG state is left as it
    was. A prompt's sample does depend on which other prompts share its batch (the batch draws
    from one generator); greedy results do not (up to floating-point differences from padding).
    The model is put in eval mode for the call and its previous mode restored.
    """
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise TypeError(f"prompts[{i}] must be a list of int token ids")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
    _check_int("pad_token_id", pad_token_id, 0)
    eos = _eos_ids(eos_token_id)
    _check_int("seed", seed, 0)
    _check_generation_args(max_new_tokens, batch_size, temperature, top_k, top_p, do_sample)
    if not prompts:
        return []

    device = _model_device(model)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                    eos_token_id=eos if len(eos) > 1 else eos[0], repetition_penalty=1.0, num_beams=1)
    if synced_gpus:  # a sharded (FSDP) model: every process runs the same number of forward passes
        settings["synced_gpus"] = True
    if do_sample:
        settings.update(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    eos_set = set(eos)

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for b, start in enumerate(range(0, len(order), batch_size)):
                index = order[start:start + batch_size]
                width = len(prompts[index[0]])  # longest in the batch: sorted longest first
                input_ids = torch.full((len(index), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(index), width), dtype=torch.long)
                for row, i in enumerate(index):
                    n = len(prompts[i])
                    input_ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
                    attention_mask[row, width - n:] = 1
                torch.manual_seed(seed * 1_000_003 + b)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     **settings)
                for row, i in enumerate(index):
                    results[i] = _truncate_at_eos(out[row, width:].tolist(), eos_set)
    finally:
        model.train(was_training)
    return results


def _check_examples(examples) -> list[tuple[str, list[str]]]:
    if not isinstance(examples, (list, tuple)):
        raise TypeError(f"examples must be a list of dicts, got {type(examples).__name__}")
    checked = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str):
            raise ValueError(f"examples[{i}] must be a dict with a str 'prompt'")
        if "references" in ex:
            refs = _as_references(ex["references"], f"examples[{i}]['references']")
        elif "response" in ex:
            refs = _as_references(ex["response"], f"examples[{i}]['response']")
        else:
            raise ValueError(f"examples[{i}] needs 'references' (list of str) or 'response' (str)")
        checked.append((ex["prompt"], refs))
    return checked


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _pstd(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def evaluate(
    model,
    tokenizer,
    examples: list[dict],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    synced_gpus: bool = False,
) -> dict:
    """Sample a response per example and seed; score ROUGE-L and exact match against the references.

    examples: dicts with "prompt" (already templated text) and "references" (list of str) or
    "response" (str, one reference). Prompts are encoded with ``tokenizer(prompt)["input_ids"]``;
    generations are decoded with ``skip_special_tokens=True`` and stripped. The tokenizer's
    ``eos_token_id`` ends a response; its ``pad_token_id`` (eos if it has none) pads.

    Returns a dict:
      "rougeL", "exact_match": mean over seeds of the mean over examples (0..100);
      "rougeL_std", "exact_match_std": population std over seeds (0.0 for one seed);
      "per_seed": [{"seed", "rougeL", "exact_match"}] in the order of ``seeds``;
      "generations": the first seed's predictions (str), in example order;
      "num_examples": int.
    With ``do_sample=False`` decoding is greedy and does not depend on a seed: one pass is made,
    reported with ``"seed": None``, and ``seeds`` is ignored.
    """
    checked = _check_examples(examples)
    if not checked:
        raise ValueError("examples must not be empty")
    if do_sample:
        if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
            raise ValueError(f"seeds must be a non-empty sequence of int, got {seeds!r}")
        for i, s in enumerate(seeds):
            _check_int(f"seeds[{i}]", s, 0)
    _check_generation_args(max_new_tokens, batch_size, temperature, top_k, top_p, do_sample)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; generation needs one to stop")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id

    prompts = [tokenizer(prompt)["input_ids"] for prompt, _ in checked]
    references = [refs for _, refs in checked]
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError(f"examples[{i}]['prompt'] encodes to no tokens")
    per_seed, generations = [], None
    for seed in (seeds if do_sample else [None]):
        outputs = sample(model, prompts, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         max_new_tokens=max_new_tokens, seed=seed or 0, batch_size=batch_size,
                         temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                         synced_gpus=synced_gpus)
        predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
        if generations is None:
            generations = predictions
        per_seed.append({
            "seed": seed,
            "rougeL": _mean([rouge_l(p, refs) for p, refs in zip(predictions, references, strict=True)]),
            "exact_match": _mean([exact_match(p, refs) for p, refs in zip(predictions, references, strict=True)]),
        })

    rouge = [s["rougeL"] for s in per_seed]
    em = [s["exact_match"] for s in per_seed]
    return {"rougeL": _mean(rouge), "rougeL_std": _pstd(rouge),
            "exact_match": _mean(em), "exact_match_std": _pstd(em),
            "per_seed": per_seed, "generations": generations, "num_examples": len(checked)}


def reference_ce(model, tokenizer, examples, batch_size: int = 32) -> float:
    """The model's cross-entropy (nats per token) on tokenised examples' first references and their closing eos,
    given the prompts (teacher forcing): ``examples`` are :class:`promptkd.train.data.Example` (``prompt_ids``,
    ``response_ids``). The held-out language-model loss of the open regime, and the trainer's ``valid/ce``."""
    from ..hf.models import linear_cross_entropy, lm_hidden
    from .data import collate

    _check_int("batch_size", batch_size, 1)
    device = _model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
            labels = batch["labels"].to(device)
            out = lm_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            n = int((labels != -100).sum())
            total, count = total + float(linear_cross_entropy(out, labels)) * n, count + n
    return total / max(count, 1)


def write_generations(path: str, examples: list[dict], result: dict) -> None:
    """Write one JSON line per example: prompt, prediction (first seed's), references; atomically."""
    checked = _check_examples(examples)
    generations = result.get("generations") if isinstance(result, dict) else None
    if not isinstance(generations, list) or len(generations) != len(checked):
        raise ValueError("result must be evaluate()'s dict for these examples (one generation per example)")
    write_jsonl([{"prompt": prompt, "prediction": prediction, "references": refs}
                 for (prompt, refs), prediction in zip(checked, generations, strict=True)], path)
