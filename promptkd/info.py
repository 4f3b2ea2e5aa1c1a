"""``promptkd info`` (or ``python -m promptkd.info``): which backends this installation can use, and why not.

    promptkd info          # a short report
    promptkd info --json   # the same as JSON

Reported: versions (promptkd, Python, torch, Triton, transformers); the native CPU kernels (built and
loaded, or why not, and how to build them); the elementwise backend the chunked KD loss will use
(``PROMPTKD_CPU_KERNELS``) and its chunk size (``PROMPTKD_CHUNK_MB``); the row passes and chunk sizes of
offline distillation (``fused_linear_topk``, the sparse loss); Triton and the CUDA device the Triton kernels
would run on; what ``impl="auto"`` picks on the CPU and on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    """Everything ``promptkd info`` prints, as a dict of plain values."""
    import torch

    from . import __version__, launch
    from .kd import native, rows, torch_impl
    from .sparse import torch_impl as sparse_impl

    lib = native.library()
    try:
        configured = rows.configured_backend()
        backend_error = None
    except ValueError as e:
        configured, backend_error = os.environ.get("PROMPTKD_CPU_KERNELS"), str(e)
    if backend_error is not None:
        cpu_backend = f"error: {backend_error}"
    elif configured == "torch":
        cpu_backend = "torch (PROMPTKD_CPU_KERNELS=torch)"
    elif lib is not None:
        cpu_backend = "native"
    else:
        cpu_backend = "torch (the native kernels are unavailable)" if configured == "auto" else \
            "error: PROMPTKD_CPU_KERNELS=native, but the native kernels are unavailable"
    try:
        import triton

        triton_version, triton_error = triton.__version__, None
    except ImportError as e:
        triton_version, triton_error = None, str(e)
    cuda = torch.cuda.is_available()
    if cuda:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    else:
        why = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device visible"
        device = f"none ({why})"
    return {
        "promptkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "native_cpu_kernels": {
            "available": lib is not None,
            "path": str(native.library_path()),
            "reason": native.unavailable_reason(),
            "build": native.BUILD_COMMAND,
        },
        "cpu_elementwise_backend": cpu_backend,
        "cuda_elementwise_backend": "triton" if triton_version is not None else "torch (Triton is not installed)",
        "chunk_mb": torch_impl.CHUNK_BYTES / 2**20,
        "sparse": {"cpu_row_backend": cpu_backend,
                   "cuda_row_backend": {"loss": "triton" if triton_version is not None else "torch",
                                        "targets": "torch"},
                   "loss_chunk_mb": sparse_impl.LOSS_CHUNKS * torch_impl.CHUNK_BYTES / 2**20,
                   "targets_chunk_mb": sparse_impl.TARGET_CHUNKS * torch_impl.CHUNK_BYTES / 2**20},
        "torch_threads": torch.get_num_threads(),
        "triton_available": triton_version is not None,
        "triton_error": triton_error,
        "triton_interpreter": launch.interpreting(),
        "cuda_device": device,
        "auto_impl": {"cpu": "chunked (KD loss, sparse loss, targets), torch (prefix attention)",
                      "cuda": ("triton" if triton_version is not None else "unavailable: Triton is not installed")
                      + "; chunked (sparse loss, targets)"},
    }


def format_report(r: dict) -> str:
    native, sp = r["native_cpu_kernels"], r["sparse"]
    if native["available"]:
        native_line = f"available ({native['path']})"
    else:
        native_line = f"UNAVAILABLE: {native['reason']}\n{'':24}build them with: {native['build']}"
    lines = [
        f"promptkd {r['promptkd']}  (python {r['python']}, torch {r['torch']}, "
        f"triton {r['triton'] or 'not installed'}, transformers {r['transformers'] or 'not installed'})",
        f"{'native CPU kernels':24}{native_line}",
        f"{'chunked KD elementwise':24}{r['cpu_elementwise_backend']}; chunks of {r['chunk_mb']:g} MB per side "
        f"(PROMPTKD_CHUNK_MB), {r['torch_threads']} threads; on CUDA: {r['cuda_elementwise_backend']}",
        f"{'offline distillation':24}row passes {sp['cpu_row_backend']} on the CPU; on CUDA "
        f"{sp['cuda_row_backend']['loss']} (loss), {sp['cuda_row_backend']['targets']} ops (targets); chunks of "
        f"{sp['loss_chunk_mb']:g} MB (loss), {sp['targets_chunk_mb']:g} MB (targets)",
        f"{'Triton':24}" + (f"{r['triton']}" + (" (TRITON_INTERPRET=1: kernels run on CPU tensors)"
                                                 if r["triton_interpreter"] else "")
                            if r["triton_available"] else f"unavailable: {r['triton_error']}"),
        f"{'CUDA device':24}{r['cuda_device']}",
        "impl='auto' picks".ljust(24) + f"CPU: {r['auto_impl']['cpu']}; CUDA: {r['auto_impl']['cuda']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="promptkd info", description="Which backends promptkd can use here, and why not.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
