"""A thin trainer for PromptKD and its baselines: config in, run directory out.

    from promptkd.config import TrainConfig
    from promptkd.trainer import train
    run_dir = train(TrainConfig(method="promptkd", student=..., teacher=..., train_file=...))

Every loss is computed from hidden states and output-embedding weights with
:func:`promptkd.fused_linear_kd_loss` (or the chunked :func:`promptkd.models.linear_cross_entropy`):
no [tokens, vocab] logits tensor is made. One step (``method``):

- ``sft``      cross-entropy on the ground-truth responses.
- ``kd``       kd_ratio * KL(p || q) + (1 - kd_ratio) * CE on the ground-truth responses.
- ``rkl``      KL(q || p) on responses the student samples.
- ``gkd``      JSD(gkd_beta) on student samples with probability gkd_lambda, else on ground truth.
- ``distillm`` skew forward KL(p || a p + (1-a) q) or skew reverse KL(q || (1-a) p + a q), a = distillm_alpha,
               on ground truth (student samples with probability distillm_student_ratio).
- ``promptkd`` (1) the student samples a response per instruction (temperature 1, no truncation);
               (2) prompt step, gradient to the soft prompt only:
                   KL(p_TP || q_S) + prompt_reg * (1 - step / total) * KL(p_TP || p_T);
               (3) student step with the updated prompt (no gradient to it): KL(q_S || p_TP).
where p is the teacher, q the student, TP the teacher with the soft prompt. Losses are token means
over response tokens, averaged over micro-batches and processes.

``num_samples`` K samples K responses per instruction; ``share_prefix`` runs each instruction once
as a prefix shared by its K responses (prefix attention in both models). Under torchrun the run is
data-parallel, or with ``fsdp`` sharded (FSDP2).

The run directory holds ``config.yaml`` (the run's configuration as it started), ``metrics.jsonl``
(one line per logged step), TensorBoard events when tensorboard is installed, ``checkpoint-<step>/``
(the last ``keep_checkpoints``), ``best/`` (the best validation ROUGE-L), ``final/`` and, after a
resume that changed a setting, ``resumes.jsonl``. Checkpoints are directories synced and renamed
into place once complete, so a crash or SIGKILL never leaves a partial one. What is guaranteed:

- nothing is overwritten unless asked: an ``output_dir`` that holds a previous run is an error
  without ``resume`` or ``overwrite``;
- ``resume=True`` continues from the newest checkpoint (an error if there is none) and reaches the
  same weights as an uninterrupted run (bit-identical on the CPU). Only the settings in
  :data:`RESUMABLE` may differ from the checkpoint's (run length, validation/save/log intervals,
  device, kernel implementations, recomputation), and they apply from the resume on; any other
  change, or training data whose contents changed, is refused naming it;
- a NaN or infinite loss or gradient stops the run before that step is applied, and no checkpoint,
  ``best/`` or ``final/`` is ever written with non-finite weights (:class:`TrainingDiverged`);
- checkpoint files are read with ``torch.load(weights_only=True)``: a planted file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings

import torch

from ..errors import InputError, TrainingDiverged
from ..files import append_line, publish_dir, remove_entries, sync_dir, write_text
from ..hf.models import (
    LMOutput,
    check_model_path,
    check_same_tokens,
    has_tokenizer,
    linear_cross_entropy,
    lm_hidden,
    load_model,
    load_tokenizer,
    shard,
)
from ..kd.api import fused_linear_kd_loss
from .config import TrainConfig
from .data import DataOrder, Example, collate, collate_shared, load_examples

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
#: What a run writes in its output_dir, besides checkpoint-<step>/ and hidden work files (.tmp-*).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "resumes.jsonl", "best", "final", "tensorboard", "plots")
#: Settings a resumed run may change: how long it runs, how often it validates, saves and logs, and how
#: it computes (device, kernels, recomputation), never what it computes. Any other change is refused.
RESUMABLE = ("max_steps", "epochs", "eval_interval", "save_interval", "keep_checkpoints", "log_interval",
             "tensorboard", "progress", "output_dir", "extra", "device", "gradient_checkpointing", "loss_impl",
             "attention_impl")


# ---------------------------------------------------------------- processes


#: torch modules with functions whose default argument is ``group=dist.group.WORLD``. Imported after
#: init_process_group (transformers imports the first lazily), each such default keeps the process group
#: alive for good; imported before it, the defaults are None (which those functions read as the world).
_GROUP_DEFAULT_MODULES = ("torch.distributed.nn.functional", "torch.distributed.fsdp.sharded_grad_scaler",
                          "torch.distributed.optim.zero_redundancy_optimizer")


class ProcessGroupLeak(RuntimeWarning):
    """A gloo process group outlived :meth:`Processes.close`; see :class:`Processes`."""


#: Set by the command line, which ends a process whose gloo group lingers without finalizing it.
EXIT_WITHOUT_FINALIZING = False
_lingering_groups = 0


def lingering_process_group() -> bool:
    """Whether a gloo process group this process started is still alive after :meth:`Processes.close`."""
    return _lingering_groups > 0


class Processes:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process.

    A process group this object starts, it also ends (:meth:`close`). Why that needs care: gloo runs
    each collective on a C++ worker thread, which releases the collective's tensors a moment after
    the caller's wait has returned; releasing a tensor that has a Python object takes the GIL. If the
    group still exists when the interpreter shuts down, a worker that does this then is unwound in a
    noexcept destructor and the process aborts ("terminate called without an active exception",
    SIGABRT) after a successful run. ``destroy_process_group`` only drops torch's own references; the
    worker threads stop when the group object is freed, so :meth:`close` checks that it is:

    * the functions of some torch modules take ``group=dist.group.WORLD`` as a default argument, which
      holds the group for good when the module is imported after init_process_group (transformers
      imports one lazily); they are imported before it, so those defaults are None;
    * :meth:`Trainer.close` releases the models and optimizers first (FSDP's state holds the group);
    * FSDP's DTensors leave the group in torch's sharding caches, which no public API clears. Such a
      group lingers (:func:`lingering_process_group`): ``promptkd train`` then ends its process
      without finalizing the interpreter (everything it writes is on disk by then); a script calling
      :func:`train` gets a :class:`ProcessGroupLeak` warning saying so.

    NCCL groups are shut down by ``destroy_process_group`` itself (their communicators are aborted).
    """

    def __init__(self, device: str):
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError(f"device {device!r}: CUDA is not available on this machine")
            if self.device.index is not None and self.device.index >= torch.cuda.device_count():
                raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        self._owns_group = self.distributed and not dist.is_initialized()
        if self._owns_group:
            import importlib

            for name in _GROUP_DEFAULT_MODULES:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Destroys the process group this object started and checks that it was freed (its worker
        threads joined); release what holds it first (FSDP-sharded modules, their optimizer state)."""
        import gc
        import weakref

        global _lingering_groups
        if not (self._owns_group and torch.distributed.is_initialized()):
            return
        group = weakref.ref(torch.distributed.group.WORLD)
        gloo = torch.distributed.get_backend() == "gloo"
        torch.distributed.destroy_process_group()
        gc.collect()  # reference cycles (modules, hooks) that still hold the group
        if gloo and group() is not None:
            _lingering_groups += 1
            if not EXIT_WITHOUT_FINALIZING:
                warnings.warn("promptkd: the gloo process group is still referenced after destroy_process_group "
                              "(under FSDP, torch's DTensor sharding caches hold it), so its worker threads live on "
                              "and can abort this process at interpreter exit; end the process with "
                              "os._exit(status) once its output is flushed, as `promptkd train` does",
                              ProcessGroupLeak, stacklevel=2)

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world_size
        return values

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduce the gradients as one flat buffer per dtype (deterministic: a fixed order)."""
        if not self.distributed:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(synced)


def _is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _grad_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients, a float32 device scalar (NaN or inf if any gradient is): whole
    gradients as they are (already averaged over the processes), FSDP shards summed over the processes."""
    grads = [p.grad for p in params if p.grad is not None]
    whole = [g for g in grads if not _is_sharded(g)]
    sharded = [g.to_local() for g in grads if _is_sharded(g)]
    if not sharded:
        if not whole:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(whole).float()
    squares = torch.zeros((), device=sharded[0].device, dtype=torch.float32)
    for g in sharded:
        squares += g.float().square().sum()
    torch.distributed.all_reduce(squares)
    for g in whole:
        squares += g.float().square().sum()
    return squares.sqrt()


def _clip(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scales the gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if _is_sharded(p.grad) else p.grad
            g.mul_(scale.to(g.dtype))


def _local_state(optimizer_state: dict) -> dict:
    """An optimizer state dict with FSDP-sharded tensors replaced by this process's shards."""
    state = {k: {n: v.to_local() if _is_sharded(v) else v for n, v in s.items()}
             for k, s in optimizer_state["state"].items()}
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def _shard_state(local: dict, optimizer) -> dict:
    """The inverse of :func:`_local_state` for ``optimizer``'s parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, s in local["state"].items():
        p = params[int(k)]
        state[k] = {n: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    if _is_sharded(p) and n != "step" and v.ndim else v for n, v in s.items()}
    return {"state": state, "param_groups": local["param_groups"]}


# ---------------------------------------------------------------- run directory


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir)
             if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    names.sort(key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))
    return [os.path.join(output_dir, n) for n in names if os.path.isfile(os.path.join(output_dir, n, STATE_FILE))]


def previous_run(output_dir: str) -> list[str]:
    """The entries of ``output_dir`` that a run wrote (empty if it holds none, or does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    ours = [n for n in os.listdir(output_dir)
            if n in RUN_ENTRIES or n.startswith((CHECKPOINT_PREFIX, ".tmp-"))
            or any(n.startswith(f".{entry}.") for entry in RUN_ENTRIES)]
    return sorted(ours)


def resume_changes(saved: dict, current: dict, checkpoint: str) -> dict:
    """{key: (checkpoint's value, new value)} for the settings that differ; refuses (InputError) any
    change outside :data:`RESUMABLE`, naming the keys. A key the checkpoint lacks (an older
    promptkd) is compared with its default."""
    saved = {**TrainConfig().to_dict(), **saved}
    changes = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    refused = {k: change for k, change in changes.items() if k not in RESUMABLE}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise InputError(f"--resume: the configuration differs from {checkpoint}'s in settings that would change "
                         f"the run ({listed}). Resume with the checkpoint's values, or start a new run (another "
                         f"output_dir, or --overwrite). A resumed run may change only: {', '.join(RESUMABLE)}")
    return changes


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (the training data's fingerprint in checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by the main process."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Drop what was logged after the checkpoint we resume from (those steps run again).
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
            write_text(self.path, "".join(kept))
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------- the trainer


def _load(path: str, device) -> dict:
    """A checkpoint's torch file, unpickled with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a planted file cannot run code; anything else is an error naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--resume: cannot load {path} safely ({first})") from None


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _warmup_then_constant(warmup: int):
    # As transformers' get_constant_schedule_with_warmup, which the reference code uses.
    return lambda step: step / warmup if step < warmup else 1.0


class Trainer:
    """Runs one configuration. Construction checks everything (paths, data, tokenizers, the run
    directory, a resume's settings) and loads the models; :meth:`train` runs the steps and returns
    the run directory.

    ``resume``: continue from the newest checkpoint in ``output_dir`` (an error if there is none);
    settings outside :data:`RESUMABLE` must equal the checkpoint's. ``overwrite``: start afresh in an
    ``output_dir`` that holds a previous run, removing that run's files when training starts.
    Without either, an ``output_dir`` holding a previous run is an error: nothing is overwritten
    unless asked."""

    def __init__(self, config: TrainConfig, resume: bool = False, log=print, overwrite: bool = False):
        config.validate()
        config.check_ready()
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other: continue the run in output_dir, or replace it")
        if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
            raise InputError(f"output_dir {config.output_dir!r} is a file, not a directory")
        self.cfg = config
        self.log_fn = log
        self.procs = Processes(config.device)
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()  # an exiting process must not leave its process group behind
            raise

    def _setup(self, resume: bool, overwrite: bool) -> None:
        config = self.cfg
        self.device = self.procs.device
        self.dtype = _dtype(config.dtype, self.device)
        if self.dtype != torch.float32 and self.device.type == "cpu":
            raise InputError(f"dtype={config.dtype} needs a CUDA device; on the CPU use float32")
        if config.fsdp and not self.procs.distributed:
            raise InputError("fsdp: true shards the models over several processes: launch with torchrun "
                             "--nproc_per_node N (N > 1), or turn fsdp off")
        self.run_dir = config.output_dir
        self._check_run_dir(resume, overwrite)

        # Everything that can be wrong with the inputs is found before any model is loaded.
        check_model_path("student", config.student)
        if config.method != "sft":
            check_model_path("teacher", config.teacher)
        tokenizer_path = config.tokenizer or config.student
        self.tokenizer = load_tokenizer("tokenizer", tokenizer_path)
        if config.method != "sft" and not config.tokenizer and has_tokenizer(config.teacher):
            check_same_tokens(self.tokenizer, load_tokenizer("teacher", config.teacher), tokenizer_path,
                              config.teacher)
        self.train_examples, stats = load_examples(config.train_file, self.tokenizer, config.max_prompt_length,
                                                   config.max_length)
        self.valid_examples = []
        if config.valid_file:
            self.valid_examples, _ = load_examples(config.valid_file, self.tokenizer, config.max_prompt_length,
                                                   config.max_length, limit=config.max_valid_examples)
        self._say(f"data: {stats.kept} training examples from {stats.path} ({stats.dropped_long_prompt} dropped for "
                  f"prompts over {config.max_prompt_length} tokens, {stats.truncated_response} responses cut)")
        self.order = DataOrder(len(self.train_examples), config.batch_size, config.gradient_accumulation,
                               self.procs.world_size, config.seed)
        if config.max_steps:
            self.total_steps = config.max_steps
        else:
            self.total_steps = config.epochs * self.order.steps_per_epoch

        self.train_digest = file_digest(config.train_file)
        self.start_step, self.best = 0, {"rougeL": None, "step": None}
        if self.resume_from:
            self._check_resume()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self._load_models()

    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Nothing is overwritten unless asked, and --resume needs a checkpoint."""
        self.resume_from, self.stale, self.resume_state, self.changes = None, [], None, {}
        if resume:
            found = checkpoints(self.run_dir)
            if not found:
                where = "does not exist" if not os.path.isdir(self.run_dir) else "holds no complete checkpoint"
                hint = "start it again with --overwrite" if previous_run(self.run_dir) else "drop --resume to start"
                raise InputError(f"--resume: output_dir {self.run_dir!r} {where}; there is nothing to resume "
                                 f"({hint})")
            self.resume_from = found[-1]
            try:
                with open(os.path.join(self.resume_from, STATE_FILE)) as f:
                    self.resume_state = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"--resume: cannot read {self.resume_from}/{STATE_FILE}: {e}") from None
            return
        previous = previous_run(self.run_dir)
        if previous and not overwrite:
            shown = ", ".join(previous[:5]) + (", ..." if len(previous) > 5 else "")
            raise InputError(f"output_dir {self.run_dir!r} holds a previous run ({shown}); pass --resume to continue "
                             "it, --overwrite to replace it, or choose another output_dir")
        self.stale = previous

    def _check_resume(self) -> None:
        """The checkpoint's process count, settings and training data must be this run's."""
        state = self.resume_state
        if state["world_size"] != self.procs.world_size:
            raise InputError(f"{self.resume_from} was written by {state['world_size']} process(es); resume it "
                             f"with as many (this run has {self.procs.world_size})")
        self.changes = resume_changes(state.get("config", {}), self.cfg.to_dict(), self.resume_from)
        saved_digest = state.get("train_sha256")
        if saved_digest is not None and saved_digest != self.train_digest:
            raise InputError(f"--resume: train_file {self.cfg.train_file!r} is not the file {self.resume_from} was "
                             "trained on (its contents changed), so the data order would not be the run's")
        self.start_step, self.best = state["step"], state["best"]

    def _say(self, text: str) -> None:
        if self.procs.main:
            self.log_fn(text)

    def close(self) -> None:
        """Releases the models and optimizers, then ends the process group the trainer started (see
        :class:`Processes`). The trainer cannot train after this."""
        for name in ("student", "teacher", "prompted", "optimizer", "scheduler", "prompt_optimizer",
                     "prompt_scheduler", "student_params"):
            setattr(self, name, None)
        self.procs.close()

    # ---- models and optimizers ----

    def _load_models(self):
        cfg = self.cfg
        student_path = os.path.join(self.resume_from, "model") if self.resume_from else cfg.student
        # The student's weights stay float32 (AdamW master copy); bfloat16/float16 runs compute under autocast.
        self.student = load_model("student", student_path, torch.float32, self.device)
        self.student.train()
        if cfg.gradient_checkpointing:
            enable = getattr(self.student, "activation_checkpointing_enable", None)  # the newer name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.teacher, self.prompted = None, None
        if cfg.method != "sft":
            self.teacher = load_model("teacher", cfg.teacher, self.dtype, self.device)
            self.teacher.requires_grad_(False).eval()
            vs = self.student.get_output_embeddings().weight.shape[0]
            vt = self.teacher.get_output_embeddings().weight.shape[0]
            self.vocab_size = None if vs == vt else min(vs, vt)
        if cfg.share_prefix:
            self._use_prefix_attention()
        if cfg.method == "promptkd":
            from ..hf.attention import check_supported
            from ..hf.prompted import PromptedTeacher

            try:
                check_supported(self.teacher)
            except ValueError as e:
                raise InputError(f"promptkd: the teacher's {e}") from None
            self.prompted = PromptedTeacher(self.teacher, cfg.prompt_length, init="text",
                                            init_text=cfg.prompt_init_text, tokenizer=self.tokenizer,
                                            gradient_checkpointing=cfg.gradient_checkpointing,
                                            attention_impl=cfg.attention_impl)
            if self.resume_from:
                self.prompted.load_prompt(os.path.join(self.resume_from, "prompt"))
        if cfg.fsdp:
            shard(self.student, param_dtype=self.dtype if self.dtype != torch.float32 else None)
            if self.teacher is not None:
                shard(self.teacher)

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)

        schedule = _warmup_then_constant(cfg.warmup_steps)
        self.student_params = [p for p in self.student.parameters() if p.requires_grad]
        # FSDP's sharded parameters and the whole ones (an untied head) in separate groups: AdamW's
        # batched updates take one kind at a time.
        sharded = [p for p in self.student_params if _is_sharded(p)]
        whole = [p for p in self.student_params if not _is_sharded(p)]
        self.optimizer = adamw([{"params": group} for group in (sharded, whole) if group], cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.prompt_optimizer = self.prompt_scheduler = None
        if self.prompted is not None:
            self.prompt_optimizer = adamw([self.prompted.soft_prompt], cfg.prompt_lr or cfg.lr)
            self.prompt_scheduler = torch.optim.lr_scheduler.LambdaLR(self.prompt_optimizer, schedule)
        if self.resume_from:
            state = _load(os.path.join(self.resume_from, "optimizer.pt"), self.device)
            if cfg.fsdp:
                local = _load(os.path.join(self.resume_from, f"optimizer-rank{self.procs.rank}.pt"), self.device)
                state["student"] = _shard_state(local, self.optimizer)
            self.optimizer.load_state_dict(state["student"])
            self.scheduler.load_state_dict(state["student_scheduler"])
            if self.prompt_optimizer is not None:
                self.prompt_optimizer.load_state_dict(state["prompt"])
                self.prompt_scheduler.load_state_dict(state["prompt_scheduler"])
            rng = _load(os.path.join(self.resume_from, f"rng-rank{self.procs.rank}.pt"), "cpu")
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _use_prefix_attention(self) -> None:
        """share_prefix: the student and the teacher run their attention through prefix_attention."""
        from ..hf.attention import check_supported, register

        for name, model in (("student", self.student), ("teacher", self.teacher)):
            try:
                check_supported(model)
            except ValueError as e:
                raise InputError(f"share_prefix: the {name}'s {e}") from None
            text = model.config.get_text_config()
            dropout = getattr(text, "attn_pdrop", None) or getattr(text, "attention_dropout", None) or 0.0
            if name == "student" and dropout:
                raise InputError(f"share_prefix: the student has attention dropout {dropout}, which prefix "
                                 "attention does not implement; set it to 0 in the student's config.json "
                                 "(attn_pdrop / attention_dropout) or turn share_prefix off")
            model.set_attn_implementation(register())

    # ---- forward pieces ----

    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    @staticmethod
    def _shared(batch):
        if "group_index" not in batch:
            return None
        return batch["prefix_ids"], batch["prefix_mask"], batch["group_index"]

    def _student(self, batch) -> LMOutput:
        with self._autocast():
            return lm_hidden(self.student, batch["input_ids"], batch["attention_mask"], self._shared(batch),
                             self.cfg.attention_impl)

    def _teacher(self, batch, prompted: bool | None = None) -> LMOutput:
        if prompted is None:
            return lm_hidden(self.teacher, batch["input_ids"], batch["attention_mask"], self._shared(batch),
                             self.cfg.attention_impl)
        out = self.prompted(batch["input_ids"], batch["attention_mask"], use_prompt=prompted,
                            shared_prefix=self._shared(batch))
        return LMOutput(out.hidden_states, out.output_weight, out.output_bias)

    def _kd(self, student: LMOutput, teacher: LMOutput, labels, divergence: str, **kwargs) -> torch.Tensor:
        dt = self.dtype

        def cast(x):
            return None if x is None else x.to(dt)

        return fused_linear_kd_loss(cast(student.hidden), cast(student.weight), cast(teacher.hidden),
                                    cast(teacher.weight), labels, divergence=divergence,
                                    student_bias=cast(student.bias), teacher_bias=cast(teacher.bias),
                                    vocab_size=self.vocab_size, impl=self.cfg.loss_impl, **kwargs)

    def _batch(self, prompts, responses, closed=None, shared: bool = False):
        """A training batch and its token count (prompt + response, every sample counted in full).

        ``shared``: ``prompts`` holds each instruction ``num_samples`` times in a row (as
        :meth:`_on_policy` returns them); each instruction becomes one shared prefix for its samples."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if shared:
            k = self.cfg.num_samples
            batch = collate_shared(prompts[::k], responses, [i // k for i in range(len(responses))], pad, eos, closed)
            tokens = int(batch["attention_mask"].sum()) + sum(len(p) - 1 for p in prompts)
        else:
            batch = collate(prompts, responses, pad, eos, closed)
            tokens = int(batch["attention_mask"].sum())
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, tokens

    def _sample_seed(self, step: int, micro: int, rank: int | None = None) -> int:
        rank = self.procs.rank if rank is None else rank
        return (self.cfg.seed * 1_000_003 + step * 8191 + rank * 131 + micro) % (2**31 - 1)

    def _on_policy(self, examples: list[Example], step: int, micro: int):
        """The student's samples for each instruction (num_samples each): prompts, responses, closed."""
        from .evaluate import sample

        cfg = self.cfg
        prompts = [e.prompt_ids for e in examples for _ in range(cfg.num_samples)]
        left = cfg.max_length - max(len(p) for p in prompts)  # >= 1: prompts fit max_prompt_length < max_length
        room = min(cfg.max_new_tokens, left) if cfg.max_new_tokens else left
        responses = sample(self.student, prompts, pad_token_id=self.tokenizer.pad_token_id,
                           eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=room,
                           seed=self._sample_seed(step, micro), batch_size=len(prompts),
                           temperature=cfg.sample_temperature, synced_gpus=cfg.fsdp)
        # A response shorter than the room ended with eos (which sample() strips): it is closed by eos again.
        return prompts, responses, [len(r) < room for r in responses]

    def _coin(self, step: int, micro: int, probability: float) -> bool:
        """A reproducible draw per (step, micro-batch, rank)."""
        if probability <= 0.0:
            return False
        # Sharded models: every process must take the same branch (generate or not), so rank 0's draw.
        seed = self._sample_seed(step, micro, rank=0 if self.cfg.fsdp else None) + 7
        generator = torch.Generator().manual_seed(seed)
        return bool(torch.rand((), generator=generator) < probability)

    def _ground_truth(self, examples: list[Example]):
        return [e.prompt_ids for e in examples], [e.response_ids for e in examples], None

    # ---- one micro-batch of the baselines ----

    def _micro_loss(self, examples: list[Example], step: int, micro: int):
        cfg, method = self.cfg, self.cfg.method
        if method == "rkl" or (method == "gkd" and self._coin(step, micro, cfg.gkd_lambda)) or (
                method == "distillm" and self._coin(step, micro, cfg.distillm_student_ratio)):
            batch, tokens = self._batch(*self._on_policy(examples, step, micro), shared=cfg.share_prefix)
        else:
            batch, tokens = self._batch(*self._ground_truth(examples))
        labels = batch["labels"]
        student = self._student(batch)
        if method == "sft":
            return linear_cross_entropy(student, labels), tokens
        with torch.no_grad():
            teacher = self._teacher(batch)
        if method == "kd":
            loss = self._kd(student, teacher, labels, "forward_kl", soft_weight=cfg.kd_ratio,
                            hard_weight=1.0 - cfg.kd_ratio)
        elif method == "rkl":
            loss = self._kd(student, teacher, labels, "reverse_kl")
        elif method == "gkd":
            loss = self._kd(student, teacher, labels, "jsd", beta=cfg.gkd_beta)
        else:
            loss = self._kd(student, teacher, labels, f"skew_{cfg.distillm_skew}_kl", alpha=cfg.distillm_alpha)
        return loss, tokens

    # ---- the step ----

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        last = checkpoints(self.run_dir)
        return TrainingDiverged(f"step {step}: {what}; the run stopped without applying this step or saving those "
                                f"weights. Last good checkpoint: {last[-1] if last else 'none'}")

    def _optimizer_step(self, optimizer, scheduler, params, loss_sum: torch.Tensor, step: int,
                        what: str) -> tuple[float, float]:
        """Averages, checks, clips and applies the gradients; returns (loss, gradient norm before clipping).

        A NaN or infinite loss or gradient stops the run before the step is applied. Both are read
        with one host read, the one per optimizer step that logging and the guard need."""
        loss = self.procs.mean(loss_sum.detach().float().reshape(1))
        self.procs.average_gradients([p for p in params if not _is_sharded(p)])  # FSDP averaged the others
        norm = _grad_norm(params, self.device)
        value, norm_value = torch.cat([loss, norm.reshape(1).to(loss.device)]).tolist()
        if not math.isfinite(value):
            raise self._diverged(step + 1, f"the {what} loss is {value}")
        if not math.isfinite(norm_value):
            raise self._diverged(step + 1, f"the {what} loss is finite ({value:.6g}) but its gradient is not "
                                           f"(norm {norm_value})")
        if self.cfg.clip_grad_norm > 0:
            _clip(params, norm, self.cfg.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return value, norm_value

    def _step(self, step: int) -> dict:
        cfg = self.cfg
        micro_batches = [[self.train_examples[i] for i in idx]
                         for idx in self.order.micro_batches(step, self.procs.rank)]
        scale = 1.0 / len(micro_batches)
        tokens = 0
        if cfg.method != "promptkd":
            total = torch.zeros((), device=self.device)
            for m, examples in enumerate(micro_batches):
                loss, n = self._micro_loss(examples, step, m)
                (loss * scale).backward()
                total += loss.detach() * scale
                tokens += n
            lr = self.scheduler.get_last_lr()[0]
            value, norm = self._optimizer_step(self.optimizer, self.scheduler, self.student_params, total, step,
                                               "training")
            return {"train/loss": value, "train/grad_norm": norm, "train/lr": lr, "tokens": tokens}

        # PromptKD: (1) sample, (2) prompt step, (3) student step, over the same micro-batches.
        samples = []
        for m, examples in enumerate(micro_batches):
            batch, n = self._batch(*self._on_policy(examples, step, m), shared=cfg.share_prefix)
            samples.append(batch)
            tokens += n
        reg = cfg.prompt_reg * (1.0 - step / self.total_steps)
        prompt_total = torch.zeros((), device=self.device)
        for batch in samples:
            with torch.no_grad():
                student = self._student(batch).detach()
                plain = self._teacher(batch, prompted=False)
            prompted = self._teacher(batch, prompted=True)
            # The prompted teacher sits on the teacher side: its gradient is the fused loss's teacher gradient.
            loss = self._kd(student, prompted, batch["labels"], "forward_kl")  # KL(p_TP || q_S)
            if reg > 0:
                loss = loss + reg * self._kd(plain, prompted, batch["labels"], "forward_kl")  # KL(p_TP || p_T)
            (loss * scale).backward()
            prompt_total += loss.detach() * scale
        prompt_lr = self.prompt_scheduler.get_last_lr()[0]
        prompt_value, prompt_norm = self._optimizer_step(self.prompt_optimizer, self.prompt_scheduler,
                                                         [self.prompted.soft_prompt], prompt_total, step, "prompt")
        student_total = torch.zeros((), device=self.device)
        for batch in samples:
            with torch.no_grad():
                prompted = self._teacher(batch, prompted=True)
            loss = self._kd(self._student(batch), prompted, batch["labels"], "reverse_kl")  # KL(q_S || p_TP)
            (loss * scale).backward()
            student_total += loss.detach() * scale
        lr = self.scheduler.get_last_lr()[0]
        value, norm = self._optimizer_step(self.optimizer, self.scheduler, self.student_params, student_total, step,
                                           "student")
        return {"train/loss": value, "train/grad_norm": norm, "train/lr": lr, "prompt/loss": prompt_value,
                "prompt/grad_norm": prompt_norm, "prompt/lr": prompt_lr, "tokens": tokens}

    # ---- validation, checkpoints ----

    def validate(self) -> dict:
        from .evaluate import evaluate

        examples = [{"prompt": e.prompt, "references": e.references} for e in self.valid_examples]
        result = evaluate(self.student, self.tokenizer, examples, seeds=self.cfg.eval_seeds,
                          max_new_tokens=self.cfg.eval_max_new_tokens, batch_size=self.cfg.eval_batch_size,
                          synced_gpus=self.cfg.fsdp)
        return {"valid/rougeL": result["rougeL"], "valid/exact_match": result["exact_match"]}

    def _student_state(self) -> dict | None:
        """FSDP: the student's whole weights, gathered by every process (collective), kept on rank 0."""
        if not self.cfg.fsdp:
            return None
        head = self.student.get_output_embeddings()
        tied = {f"{n}.weight" for n, m in self.student.named_modules() if m is head} \
            if getattr(self.student, "_promptkd_tied_head", False) else set()
        state = {}
        for name, value in self.student.state_dict().items():
            value = value.full_tensor() if _is_sharded(value) else value
            if self.procs.main and name not in tied:  # a tied head is saved once, as the input embedding
                state[name] = value.detach().to("cpu", copy=True)
        return state

    def _save_model_dir(self, directory: str, state: dict | None = None) -> None:
        self.student.save_pretrained(os.path.join(directory, "model"), safe_serialization=True, state_dict=state)
        self.tokenizer.save_pretrained(os.path.join(directory, "model"))
        if self.prompted is not None:
            self.prompted.save_prompt(os.path.join(directory, "prompt"), base_model_name_or_path=self.cfg.teacher)

    def _check_weights(self, step: int) -> None:
        """Every save starts here: the student's weights and the soft prompt must be finite (one host read;
        a collective under FSDP, where each process checks its shards)."""
        tensors = [p.to_local() if _is_sharded(p) else p for p in self.student_params]
        if self.prompted is not None:
            tensors.append(self.prompted.soft_prompt)
        finite = torch.stack([t.detach().isfinite().all() for t in tensors]).all().to(torch.float32)
        if self.cfg.fsdp:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise self._diverged(step, "the weights are not finite")

    def save_checkpoint(self, step: int) -> str:
        final = os.path.join(self.run_dir, f"{CHECKPOINT_PREFIX}{step:07d}")
        tmp = os.path.join(self.run_dir, f".tmp-{CHECKPOINT_PREFIX}{step:07d}")
        self._check_weights(step)
        state = self._student_state()
        if self.procs.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self._save_model_dir(tmp, state)
            # FSDP: the student's optimizer state is sharded; each process writes its part below.
            student_state = None if self.cfg.fsdp else self.optimizer.state_dict()
            optim = {"student": student_state, "student_scheduler": self.scheduler.state_dict()}
            if self.prompt_optimizer is not None:
                optim.update(prompt=self.prompt_optimizer.state_dict(),
                             prompt_scheduler=self.prompt_scheduler.state_dict())
            torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        self.procs.barrier()
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        torch.save(rng, os.path.join(tmp, f"rng-rank{self.procs.rank}.pt"))
        if self.cfg.fsdp:  # each process's shard of the student's optimizer state
            torch.save(_local_state(self.optimizer.state_dict()),
                       os.path.join(tmp, f"optimizer-rank{self.procs.rank}.pt"))
        self.procs.barrier()
        if self.procs.main:
            epoch, within = divmod(step, self.order.steps_per_epoch)
            state = {"step": step, "epoch": epoch, "step_in_epoch": within,
                     "examples_seen": step * self.order.global_batch, "world_size": self.procs.world_size,
                     "best": self.best, "train_sha256": self.train_digest, "config": self.cfg.to_dict()}
            write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
            publish_dir(tmp, final)
            for old in checkpoints(self.run_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.procs.barrier()
        return final

    def _save_best(self, step: int) -> None:
        self._check_weights(step)
        state = self._student_state()
        if not self.procs.main:
            return
        tmp = os.path.join(self.run_dir, ".tmp-best")
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_model_dir(tmp, state)
        write_text(os.path.join(tmp, "best.json"), json.dumps({"step": step, **self.best}, indent=2))
        publish_dir(tmp, os.path.join(self.run_dir, "best"))

    def _start_run_dir(self) -> None:
        """Rank 0: clears a run replaced with ``overwrite``, keeps a resumed run's original config.yaml (a
        resume's allowed changes go to resumes.jsonl), writes a new run's."""
        import yaml

        os.makedirs(self.run_dir, exist_ok=True)
        if self.stale:
            remove_entries(self.run_dir, self.stale)
            self._say(f"overwrite: removed the previous run in {self.run_dir} ({', '.join(self.stale)})")
        config_path = os.path.join(self.run_dir, "config.yaml")
        if not (self.resume_from and os.path.exists(config_path)):
            write_text(config_path, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if self.changes:
            record = {"step": self.start_step, "checkpoint": os.path.basename(self.resume_from),
                      "changes": {k: {"from": old, "to": new} for k, (old, new) in self.changes.items()}}
            append_line(os.path.join(self.run_dir, "resumes.jsonl"), json.dumps(record))
        sync_dir(self.run_dir)

    # ---- the loop ----

    def train(self) -> str:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.procs.main:
            self._start_run_dir()
        self.procs.barrier()
        metrics = MetricsLog(self.run_dir, self.procs.main, cfg.tensorboard,
                             self.start_step if self.resume_from else None)
        if self.resume_from:
            changed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
            self._say(f"resuming from {self.resume_from} (step {self.start_step} of {self.total_steps})"
                      + (f" with changed settings: {changed}" if changed else ""))
        eval_every = cfg.eval_interval or self.order.steps_per_epoch
        save_every = cfg.save_interval or self.order.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=cfg.method, dynamic_ncols=True,
                   disable=not (self.procs.main and cfg.progress), file=sys.stderr)
        try:
            for step in range(self.start_step, self.total_steps):
                started = time.perf_counter()
                values = self._step(step)
                tokens = values.pop("tokens") * self.procs.world_size  # an estimate: rank 0's count
                values["train/tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
                done = step + 1
                if self.valid_examples and (done % eval_every == 0 or done == self.total_steps):
                    if self.procs.main or cfg.fsdp:  # a sharded student generates on every process
                        values.update(self.validate())
                        score = values["valid/rougeL"]
                        if self.best["rougeL"] is None or score > self.best["rougeL"]:
                            self.best = {"rougeL": score, "step": done}
                            self._save_best(done)
                    self.procs.barrier()
                if done % cfg.log_interval == 0 or "valid/rougeL" in values or done == self.total_steps:
                    metrics.log(done, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
                bar.update(1)
                if done % save_every == 0 or done == self.total_steps:
                    self.save_checkpoint(done)
        finally:
            bar.close()
            metrics.close()
        self._check_weights(self.total_steps)
        state = self._student_state()
        if self.procs.main:
            tmp = os.path.join(self.run_dir, ".tmp-final")
            shutil.rmtree(tmp, ignore_errors=True)
            self._save_model_dir(tmp, state)
            publish_dir(tmp, os.path.join(self.run_dir, "final"))
            best = f", best validation ROUGE-L {self.best['rougeL']:.2f} at step {self.best['step']}" \
                if self.best["rougeL"] is not None else ""
            self._say(f"done: {self.total_steps} steps{best}; run directory {self.run_dir}")
        self.procs.barrier()
        return self.run_dir


def train(config: TrainConfig, resume: bool = False, log=print, overwrite: bool = False) -> str:
    """Trains ``config`` and returns its run directory (see the module docstring and :class:`Trainer`)."""
    trainer = Trainer(config, resume=resume, log=log, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        trainer.close()
