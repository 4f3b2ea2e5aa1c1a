"""Instruction data: JSONL records, the reference prompt template, tokenisation, batches and data order.

A record is one JSON object per line, with either Dolly's fields ``instruction``, ``context``,
``response`` (Alpaca's ``input`` / ``output`` are accepted too) or ``prompt`` and ``response`` /
``output`` (a prompt used as it is, untemplated). A response may be a list of strings: the first
is the training target, all of them are evaluation references.

Batches are padded to their own longest sequence (never to ``max_length``). In a training batch
``labels[b, t]`` is the token that position ``t`` predicts (``input_ids[b, t + 1]``) where that
token belongs to the response (its closing eos included) and ``-100`` elsewhere, so the labels
line up with the hidden states the fused losses take.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..kd.settings import IGNORE_INDEX

# The Alpaca-style template of the MiniLLM / PromptKD reference data processing.
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_prompt(instruction: str, context: str = "") -> str:
    """The reference template; ``context`` (Dolly) is the template's input section."""
    if context:
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=context)
    return TEMPLATE.format(instruction=instruction)


@dataclass
class Example:
    """One tokenised instruction. ``response_ids`` exclude the eos that closes them in training. ``index`` is
    its position in the list :func:`load_examples` returns (what a teacher cache and the data order number)."""

    prompt: str
    references: list[str]
    prompt_ids: list[int]
    response_ids: list[int]
    record: dict = field(default_factory=dict, repr=False)
    index: int = -1


@dataclass
class DataStats:
    path: str
    records: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0
    truncated_response: int = 0


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file; blank lines are skipped. Errors name the file and the line."""
    if not os.path.isfile(path):
        raise InputError(f"data file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise InputError(f"data file {path!r} holds no records")
    return records


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_record(record: dict, where: str) -> tuple[str, list[str]]:
    """(prompt text, reference responses) of one record, in the reference template."""
    if "instruction" in record:
        instruction = _text(record, "instruction", where)
        context_key = "context" if "context" in record else "input" if "input" in record else None
        context = _text(record, context_key, where) if context_key and record[context_key] is not None else ""
        prompt = render_prompt(instruction, context)
    elif "prompt" in record:
        prompt = _text(record, "prompt", where)
    else:
        raise InputError(f"{where}: missing field 'instruction' (Dolly/Alpaca records) or 'prompt'; "
                         f"found {sorted(record)}")
    key = "response" if "response" in record else "output" if "output" in record else None
    if key is None:
        raise InputError(f"{where}: missing field 'response' (or 'output'); found {sorted(record)}")
    value = record[key]
    references = value if isinstance(value, list) else [value]
    if not references or not all(isinstance(r, str) for r in references):
        raise InputError(f"{where}: field {key!r} must be a string or a non-empty list of strings")
    return prompt, references


def load_examples(path: str, tokenizer, max_prompt_length: int, max_length: int,
                  limit: int | None = None) -> tuple[list[Example], DataStats]:
    """Tokenises a JSONL file. Prompts longer than ``max_prompt_length`` tokens are dropped and
    counted; responses are cut so that prompt + response + eos fit in ``max_length``."""
    stats = DataStats(path)
    examples = []
    for number, record in read_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        prompt, references = parse_record(record, f"{path}:{number}")
        stats.records += 1
        prompt_ids = list(tokenizer(prompt)["input_ids"])  # with the tokenizer's own specials (BOS), as in evaluation
        if len(prompt_ids) > max_prompt_length or not prompt_ids:
            stats.dropped_long_prompt += len(prompt_ids) > 0
            continue
        response_ids = list(tokenizer(references[0], add_special_tokens=False)["input_ids"])
        room = max_length - len(prompt_ids) - 1
        if len(response_ids) > room:
            response_ids = response_ids[:room]
            stats.truncated_response += 1
        examples.append(Example(prompt, references, prompt_ids, response_ids, record, index=len(examples)))
    stats.kept = len(examples)
    if not examples:
        raise InputError(f"{path}: no usable example ({stats.records} records, {stats.dropped_long_prompt} "
                         f"with prompts over max_prompt_length={max_prompt_length})")
    return examples, stats


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int | None,
            closed: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded training batch: prompt + response (+ eos where ``closed``, default all).

    Returns input_ids [B, L], attention_mask [B, L] and labels [B, L] aligned with the hidden states
    (see the module docstring); L is the batch's longest sequence.
    """
    closed = [True] * len(prompts) if closed is None else closed
    rows = []
    for p, r, c in zip(prompts, responses, closed, strict=True):
        rows.append((list(p), list(r) + ([eos_id] if c and eos_id is not None else [])))
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(p + r)
        mask[b, :n] = 1
        if r:
            labels[b, len(p) - 1:n - 1] = torch.tensor(r)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_shared(prompts: list[list[int]], responses: list[list[int]], group: list[int], pad_id: int,
                   eos_id: int | None, closed: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """A batch of several responses per prompt, the prompt shared as a prefix.

    Prompt g minus its last token is prefix g (``prefix_ids`` / ``prefix_mask`` [G, P], right-padded,
    P >= 1); row b is its prompt's last token + ``responses[b]`` (+ eos where ``closed``), for prompt
    ``group[b]``. ``input_ids``, ``attention_mask`` and ``labels`` [B, L] are right-padded rows;
    ``group_index`` [B]. Labels equal those :func:`collate` gives the full sequences, without the
    prompt's leading columns, so losses over them are the same.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("collate_shared needs at least one prompt, each of at least one token")
    closed = [True] * len(responses) if closed is None else closed
    width = max(1, max(len(p) - 1 for p in prompts))
    prefix_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for g, p in enumerate(prompts):
        prefix_ids[g, :len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
        prefix_mask[g, :len(p) - 1] = 1
    rows = [prompts[g][-1:] for g in group]
    batch = collate(rows, responses, pad_id, eos_id, closed)
    batch.update(prefix_ids=prefix_ids, prefix_mask=prefix_mask, group_index=torch.tensor(group, dtype=torch.long))
    return batch


class DataOrder:
    """Which examples each process takes at each step: a deterministic, resumable order.

    Epoch ``e`` visits a permutation drawn from ``seed`` and ``e``; step ``s`` of the epoch takes the
    next ``global_batch`` examples (a last partial batch is dropped). Micro-batch ``m`` of rank ``r``
    is the slice ``(r * accumulation + m) * batch_size`` of that global batch, so the set of
    micro-batches of a step does not depend on how it is split over processes.
    """

    def __init__(self, num_examples: int, batch_size: int, accumulation: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_size * accumulation * world_size
        if num_examples < self.global_batch:
            raise InputError(f"the training data has {num_examples} examples, fewer than one global batch "
                             f"(batch_size * gradient_accumulation * processes = {self.global_batch})")
        self.steps_per_epoch = num_examples // self.global_batch
        self._epoch, self._order = None, None

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The example indices of each micro-batch of global ``step`` (0-based) for ``rank``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            self._epoch = epoch
        start = within * self.global_batch
        out = []
        for m in range(self.accumulation):
            first = start + (rank * self.accumulation + m) * self.batch_size
            out.append(self._order[first:first + self.batch_size])
        return out
