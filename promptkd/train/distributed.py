"""Processes: torchrun's environment and the process group a run starts and ends, gradient averaging,
the global gradient norm and clipping (whole and FSDP-sharded gradients alike), and an optimizer
state's per-process shards for checkpoints."""

from __future__ import annotations

import os
import warnings

import torch

from ..errors import InputError
from ..hf.fsdp import is_dtensor

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
    * ``Trainer.close`` releases the models and optimizers first (FSDP's state holds the group);
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


def grad_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients, a float32 device scalar (NaN or inf if any gradient is): whole
    gradients as they are (already averaged over the processes), FSDP shards summed over the processes."""
    grads = [p.grad for p in params if p.grad is not None]
    whole = [g for g in grads if not is_dtensor(g)]
    sharded = [g.to_local() for g in grads if is_dtensor(g)]
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


def clip_gradients(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scales the gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            g.mul_(scale.to(g.dtype))


def local_optimizer_state(optimizer_state: dict) -> dict:
    """An optimizer state dict with FSDP-sharded tensors replaced by this process's shards."""
    state = {k: {n: v.to_local() if is_dtensor(v) else v for n, v in s.items()}
             for k, s in optimizer_state["state"].items()}
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def sharded_optimizer_state(local: dict, optimizer) -> dict:
    """The inverse of :func:`local_optimizer_state` for ``optimizer``'s parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, s in local["state"].items():
        p = params[int(k)]
        state[k] = {n: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    if is_dtensor(p) and n != "step" and v.ndim else v for n, v in s.items()}
    return {"state": state, "param_groups": local["param_groups"]}
