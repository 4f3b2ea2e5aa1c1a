"""The run directory: what a run writes there, when it may write there, and how it saves and resumes.

``output_dir`` holds ``config.yaml`` (the run's configuration as it started), ``metrics.jsonl`` (one
line per logged step), TensorBoard events when tensorboard is installed, ``checkpoint-<step>/`` (the
last ``keep_checkpoints``), ``best/`` (the best validation ROUGE-L), ``final/`` and, after a resume
that changed a setting, ``resumes.jsonl``. A checkpoint holds ``model/`` (the student and its
tokenizer), ``prompt/`` (PromptKD's soft prompt), ``optimizer.pt`` (and ``optimizer-rank<r>.pt`` under
FSDP), ``rng-rank<r>.pt`` and ``trainer_state.json`` (step, best score, training-data digest, the teacher
cache's manifest digest, config).

Saves are written into a hidden ``.tmp-*`` directory, synced, and renamed into place once complete,
so a crash or SIGKILL never leaves a partial checkpoint. Nothing is overwritten unless asked
(:class:`RunDirectory`), a resume changes only :data:`RESUMABLE` settings, and checkpoint files are
read with ``weights_only=True`` (:func:`load_safely`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..files import append_line, publish_dir, remove_entries, sync_dir, write_text
from .config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
#: What a run writes in its output_dir, besides checkpoint-<step>/ and hidden work files (.tmp-*).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "resumes.jsonl", "best", "final", "tensorboard", "plots")
#: Settings a resumed run may change: how long it runs, how often it validates, saves and logs, and how
#: it computes (device, kernels, recomputation), never what it computes. Any other change is refused.
RESUMABLE = ("max_steps", "epochs", "eval_interval", "save_interval", "keep_checkpoints", "log_interval",
             "tensorboard", "progress", "output_dir", "extra", "device", "gradient_checkpointing", "loss_impl",
             "attention_impl", "teacher_server", "teacher_server_concurrency", "teacher_server_timeout")


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


def load_safely(path: str, device) -> dict:
    """A checkpoint's torch file, unpickled with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a planted file cannot run code; anything else is an error naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--resume: cannot load {path} safely ({first})") from None




@dataclass
class Snapshot:
    """The weights a save writes: the student (``state``: its whole state dict when it is sharded, else
    None for the model's own), its tokenizer, and the prompted teacher's soft prompt (or None)."""

    student: Any
    state: dict | None
    tokenizer: Any
    prompted: Any
    teacher: str

    def write(self, directory: str) -> None:
        model_dir = os.path.join(directory, "model")
        self.student.save_pretrained(model_dir, safe_serialization=True, state_dict=self.state)
        self.tokenizer.save_pretrained(model_dir)
        if self.prompted is not None:
            self.prompted.save_prompt(os.path.join(directory, "prompt"), base_model_name_or_path=self.teacher)


class RunDirectory:
    """A run's ``output_dir``, checked at construction: with ``resume`` it must hold a complete
    checkpoint (:attr:`resume_from`, its :attr:`resume_state`); without, it must hold no previous run
    unless ``overwrite`` (whose entries, :attr:`stale`, :meth:`start` removes). The saving methods are
    collectives: every process calls them; the main process writes what is shared."""

    def __init__(self, path: str, procs, resume: bool, overwrite: bool):
        self.path, self.procs = path, procs
        self.resume_from, self.resume_state, self.stale = None, None, []
        if resume:
            found = checkpoints(path)
            if not found:
                where = "does not exist" if not os.path.isdir(path) else "holds no complete checkpoint"
                hint = "start it again with --overwrite" if previous_run(path) else "drop --resume to start"
                raise InputError(f"--resume: output_dir {path!r} {where}; there is nothing to resume ({hint})")
            self.resume_from = found[-1]
            try:
                with open(os.path.join(self.resume_from, STATE_FILE)) as f:
                    self.resume_state = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"--resume: cannot read {self.resume_from}/{STATE_FILE}: {e}") from None
            return
        previous = previous_run(path)
        if previous and not overwrite:
            shown = ", ".join(previous[:5]) + (", ..." if len(previous) > 5 else "")
            raise InputError(f"output_dir {path!r} holds a previous run ({shown}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another output_dir")
        self.stale = previous

    def check_resume(self, config: TrainConfig, train_digest: str, cache_digest: str | None = None) -> dict:
        """The checkpoint's process count, settings, training data and teacher cache (``cache_digest``: the sha256
        of its manifest.json) must be this run's; returns the allowed changes ({key: (old, new)})."""
        state = self.resume_state
        if state["world_size"] != self.procs.world_size:
            raise InputError(f"{self.resume_from} was written by {state['world_size']} process(es); resume it "
                             f"with as many (this run has {self.procs.world_size})")
        changes = resume_changes(state.get("config", {}), config.to_dict(), self.resume_from)
        saved_digest = state.get("train_sha256")
        if saved_digest is not None and saved_digest != train_digest:
            raise InputError(f"--resume: train_file {config.train_file!r} is not the file {self.resume_from} was "
                             "trained on (its contents changed), so the data order would not be the run's")
        saved_cache = state.get("teacher_cache_sha256")
        if saved_cache != cache_digest:
            raise InputError(f"--resume: teacher_cache {config.teacher_cache!r} is not the cache {self.resume_from} "
                             "was trained from (its manifest.json differs: the cache was rewritten), so the targets "
                             "would not be the run's")
        return changes

    def load(self, name: str, device) -> dict:
        """A torch file of the checkpoint being resumed, loaded safely (:func:`load_safely`)."""
        return load_safely(os.path.join(self.resume_from, name), device)

    def start(self, config: TrainConfig, start_step: int, changes: dict, say) -> None:
        """Main process: clears a run replaced with ``overwrite``, keeps a resumed run's original
        config.yaml (a resume's allowed changes go to resumes.jsonl), writes a new run's."""
        import yaml

        os.makedirs(self.path, exist_ok=True)
        if self.stale:
            remove_entries(self.path, self.stale)
            say(f"overwrite: removed the previous run in {self.path} ({', '.join(self.stale)})")
        config_path = os.path.join(self.path, "config.yaml")
        if not (self.resume_from and os.path.exists(config_path)):
            write_text(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
        if changes:
            record = {"step": start_step, "checkpoint": os.path.basename(self.resume_from),
                      "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}
            append_line(os.path.join(self.path, "resumes.jsonl"), json.dumps(record))
        sync_dir(self.path)

    def save_checkpoint(self, step: int, weights: Snapshot, optimizers: dict, local_optimizer: dict | None,
                        rng: dict, state: dict, keep: int) -> str:
        """``checkpoint-<step>``: the weights and ``optimizers`` (main process), each process's ``rng``
        and ``local_optimizer`` shard (FSDP), then ``trainer_state.json`` (``state``); the oldest
        checkpoints beyond ``keep`` are removed."""
        procs = self.procs
        final = os.path.join(self.path, f"{CHECKPOINT_PREFIX}{step:07d}")
        tmp = os.path.join(self.path, f".tmp-{CHECKPOINT_PREFIX}{step:07d}")
        if procs.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            weights.write(tmp)
            torch.save(optimizers, os.path.join(tmp, "optimizer.pt"))
        procs.barrier()
        torch.save(rng, os.path.join(tmp, f"rng-rank{procs.rank}.pt"))
        if local_optimizer is not None:
            torch.save(local_optimizer, os.path.join(tmp, f"optimizer-rank{procs.rank}.pt"))
        procs.barrier()
        if procs.main:
            write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
            publish_dir(tmp, final)
            for old in checkpoints(self.path)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        procs.barrier()
        return final

    def save_weights(self, name: str, weights: Snapshot, record: dict | None = None) -> None:
        """Main process: ``best/`` or ``final/`` (``record``, if given, as ``<name>.json`` beside the weights)."""
        if not self.procs.main:
            return
        tmp = os.path.join(self.path, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        weights.write(tmp)
        if record is not None:
            write_text(os.path.join(tmp, f"{name}.json"), json.dumps(record, indent=2))
        publish_dir(tmp, os.path.join(self.path, name))
