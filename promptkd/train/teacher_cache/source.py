"""Where a cache's targets come from: a :class:`TeacherSource`. The writer (:mod:`.writer`) owns the examples,
their batches and order, the sampled rows' keys, the shards and every guarantee of the directory; a source only
says what teacher it is and turns a batch into targets, so another source (a served teacher) plugs in beside
:class:`InProcessTeacher` without a change to the writer or the reader."""

from __future__ import annotations

import os

import torch

from ...errors import InputError
from ..checkpoints import file_digest
from .format import canonical, check_width, sha256_bytes


class TeacherSource:
    """What the writer asks of a teacher, in this order:

    1. :meth:`check` before anything loads (every process): its own arguments and whether it can give the
       targets asked for (InputError naming them);
    2. :meth:`describe` on rank 0, once: the teacher's record for ``cache.json`` and the manifest: ``teacher``
       (a JSON fingerprint; a resume must find the same ``teacher_sha256``), ``vocab_size`` (the ids targets can
       name), ``teacher_logit_transform`` (what the teacher applies to its logits, recorded) and, where a row holds
       more than k targets, ``width`` (the stored row width; for ``hidden``, the hidden size D);
    3. :meth:`open` on every process once there is work, with the run's settings (``mode``, ``k``,
       ``samples``, ``temperature``, ``vocab_size``, ...) and the process's device;
    4. :meth:`targets` per batch: the targets of the batch's counted positions (``labels != -100``), in
       row-major order, with the Philox key of each row when the mode is ``samples`` (:meth:`hidden` instead for
       the ``hidden`` mode: the final hidden states at those positions);
    5. :meth:`close`.

    ``tokenizer_path`` is the tokenizer the examples are encoded with when the caller names none."""

    tokenizer_path: str

    def check(self, name, mode: str, temperature: float) -> None:
        """``name(argument)``: how the caller names an argument (``--teacher`` on the command line); ``mode``:
        ``top_k`` or ``samples``."""

    def describe(self, mode: str, k: int, vocab_size: int | None, tokenizer, temperature: float) -> dict:
        """``tokenizer``: the one the examples are encoded with (loaded)."""
        raise NotImplementedError

    def open(self, settings: dict, device: torch.device) -> None:
        raise NotImplementedError

    def targets(self, batch: dict, counted: torch.Tensor, keys: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [rows, width] int64 (-1: no target) and log-probabilities [rows, width] float32 (-inf there), on the
        CPU, for the ``rows = counted.sum()`` counted positions of ``batch`` (:func:`promptkd.train.data.collate`,
        plus ``examples`` [B]: each row's example index)."""
        raise NotImplementedError

    def hidden(self, batch: dict, counted: torch.Tensor) -> torch.Tensor:
        """[rows, D] float32 on the CPU: the final hidden states (the output head's input) at the counted
        positions of ``batch``, in row-major order (mode ``hidden``)."""
        raise InputError(f"{type(self).__name__} gives no hidden states")

    def close(self) -> None:
        pass


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def local_teacher(path: str) -> str:
    """A teacher's local directory or .gguf file; a hub name is resolved to its downloaded snapshot."""
    from ...hf import gguf

    if gguf.is_gguf(path) or os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(f"teacher: {path!r} is a hub name; caching needs the teacher's files to fingerprint them: "
                         "install huggingface_hub, or download the model to a directory and pass that") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 (the hub's errors have no common base)
        raise InputError(f"teacher: could not fetch the hub model {path!r}: {e}") from None


def teacher_digest(path: str) -> dict:
    """The teacher's fingerprint: {"path", "config_sha256" (None for a .gguf file), "files" {name: sha256} (its
    weight files, or the .gguf file), "sha256" (of those together)}."""
    from ...hf import gguf

    if gguf.is_gguf(path):
        config, files = None, {os.path.basename(path): file_digest(path)}
    else:
        config = file_digest(os.path.join(path, "config.json"))
        names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
        if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in names):
            raise InputError(f"teacher: {path!r} holds no weight files (*.safetensors, *.bin)")
        files = {n: file_digest(os.path.join(path, n)) for n in names}
    return {"path": path, "config_sha256": config, "files": files,
            "sha256": sha256_bytes(canonical({"config": config, "files": files}))}


class InProcessTeacher(TeacherSource):
    """A Hugging Face causal LM (a directory, hub name or .gguf file) run by promptkd in this process, in eval
    mode under ``no_grad`` (float32 weights on the CPU, bfloat16 on CUDA, as the trainer's ``dtype: auto``): each
    counted position's targets are :func:`promptkd.fused_linear_topk` of its last hidden state, with the logit
    transform of the teacher's config (checked on the model by :func:`~promptkd.hf.models.probe_logits`)."""

    def __init__(self, path: str):
        self.path = self.tokenizer_path = path
        self.model = None
        self.settings: dict = {}

    def check(self, name, mode: str = "top_k", temperature: float = 1.0) -> None:
        from ...hf.models import check_model_path

        check_model_path(name("teacher"), self.path)

    def describe(self, mode: str, k: int, vocab_size: int | None, tokenizer=None, temperature: float = 1.0) -> dict:
        from ...hf.models import load_config, logit_transform

        config = load_config("teacher", self.path)
        logit_scale, softcap = logit_transform("teacher", config)
        rows = getattr(config.get_text_config(), "vocab_size", None)
        if vocab_size is not None and rows is not None and vocab_size > rows:
            raise InputError(f"vocab_size={vocab_size} exceeds the teacher's vocabulary ({rows})")
        vocab = vocab_size or rows
        if vocab is None:
            raise InputError("teacher: its config states no vocab_size; pass vocab_size (--vocab-size)")
        check_width(mode, k, vocab)  # before the teacher's files are hashed
        fingerprint = teacher_digest(local_teacher(self.path)) | {"path": self.path}
        record = {"teacher": fingerprint, "teacher_sha256": fingerprint["sha256"], "vocab_size": vocab,
                  "teacher_logit_transform": {"logit_scale": logit_scale, "softcap": softcap}}
        if mode == "hidden":
            record["width"] = _hidden_size(config)
        return record

    def open(self, settings: dict, device: torch.device) -> None:
        from ...hf.models import load_model, probe_logits

        self.settings = settings
        model = load_model("teacher", self.path, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        model.requires_grad_(False).eval()
        probe_logits("teacher", model)
        head_rows = model.get_output_embeddings().weight.shape[0]
        if settings["vocab_size"] > head_rows:
            raise InputError(f"vocab_size={settings['vocab_size']} exceeds the rows of the teacher's output layer "
                             f"({head_rows})")
        self.model, self.device = model, device

    def targets(self, batch: dict, counted: torch.Tensor, keys: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        from ...hf.models import lm_hidden
        from ...sparse.targets import fused_linear_topk

        s, device = self.settings, self.device
        with torch.no_grad():
            out = lm_hidden(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            rows = out.hidden[counted.to(device)]
            form = s["teacher_logit_transform"]
            targets = fused_linear_topk(rows, out.weight, s["k"], bias=out.bias, temperature=s["temperature"],
                                        vocab_size=s["vocab_size"], samples=s["samples"] or 0,
                                        seed=None if keys is None else keys.to(device),
                                        logit_scale=form["logit_scale"], softcap=form["softcap"])
        return targets.ids.cpu(), targets.logprobs.float().cpu()

    def hidden(self, batch: dict, counted: torch.Tensor) -> torch.Tensor:
        from ...hf.models import lm_hidden

        with torch.no_grad():
            out = lm_hidden(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            return out.hidden[counted.to(self.device)].float().cpu()

    def close(self) -> None:
        self.model = None


def _hidden_size(config) -> int:
    """The width of a model's final hidden states (its output head's input)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int) or size < 1:
        raise InputError(f"teacher: its config states no hidden_size ({type(text).__name__})")
    return size
