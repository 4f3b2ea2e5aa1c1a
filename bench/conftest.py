"""The pytest-benchmark suite's options, its shared runner, and the ratio tables printed and recorded at the end.

    pytest bench/ --benchmark-only                        # the CPU figures of docs/benchmarks.md (about 15 minutes)
    pytest bench/ --benchmark-only --bench-size quick     # seconds
    pytest bench/ --benchmark-only -k kd_loss --benchmark-autosave   # JSON under bench/results/benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare    # against the last saved run

Each way is checked against its reference way on the same inputs before it is timed (loss and gradients; the
group's eager way unless ``suite.REFERENCE`` names another), timed in this process with pytest-benchmark's
calibrated rounds after one warm-up call, and its peak memory measured in a fresh process
(``bench/suite.py``). At the end, one table per group gives every way's median as a ratio to the ways of
``suite.COLUMNS`` measured in the same run (the GEMM floor, plain eager and the best Liger way; for the
offline-distillation groups the floor, promptkd's linear_cross_entropy and eager top-k), with memory against
``suite.MEMORY``'s way; rows are appended to ``bench/results/`` (``suite.RECORD``; unless
``--bench-no-record``) and the ratios are added to the saved JSON's ``extra_info``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import suite  # noqa: E402
from bench_kd_loss import append_rows, versions  # noqa: E402

RESULTS = HERE / "results"


def pytest_addoption(parser):
    group = parser.getgroup("promptkd bench")
    group.addoption("--bench-size", default="default", choices=["default", "quick"],
                    help="problem sizes: default (the figures of docs/benchmarks.md) or quick (seconds)")
    group.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"])
    group.addoption("--bench-no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    group.addoption("--bench-no-record", action="store_true", help="do not append to bench/results/suite.csv")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    if getattr(option, "benchmark_storage", None) == "file://./.benchmarks":  # the plugin's default
        option.benchmark_storage = f"file://{RESULTS / 'benchmarks'}"


class Runner:
    """Runs one way of a group under ``benchmark`` and keeps what the summary needs."""

    def __init__(self, config):
        self.size = config.getoption("--bench-size")
        self.device = config.getoption("--bench-device")
        self.memory = not config.getoption("--bench-no-memory") and not config.getoption("benchmark_disable")
        self.results: dict[tuple[str, str], dict] = {}
        self._references: dict[tuple[str, str], dict] = {}

    def _reference(self, group: str, way: str) -> dict:
        if (group, way) not in self._references:
            case = suite.build(group, way, self.size, self.device)
            case.step()
            self._references[group, way] = case.result()
        return self._references[group, way]

    def _peak(self, group: str, way: str) -> float | None:
        cmd = [sys.executable, str(HERE / "suite.py"), group, way, "--size", self.size, "--device", self.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **suite.PEAK_ENV})
        if out.returncode != 0:
            raise RuntimeError(f"peak memory of {group}/{way} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1]).get("peak_extra_mb")

    def run(self, benchmark, group: str, way: str) -> None:
        try:
            case = suite.build(group, way, self.size, self.device)
        except suite.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = group
        benchmark.extra_info.update(suite.SIZES[group]["cuda" if self.device == "cuda" else self.size],
                                    dtype=str(suite.dtype_for(self.device)).removeprefix("torch."))
        case.step()  # warm-up: compilation, first-touch of buffers, and the agreement check below
        reference = suite.reference_way(group, way)
        if way != suite.FLOOR and reference is not None:
            _agrees(case.result(), self._reference(group, reference), self.device, f"{group}/{way}")
        benchmark(lambda: (case.step(), suite.sync(self.device)))
        peak = self._peak(group, way) if self.memory else None
        if peak is not None:
            benchmark.extra_info["peak_extra_mb"] = peak
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            self.results[group, way] = dict(median_s=stats.stats.median, peak_extra_mb=peak)


def _agrees(got: dict, want: dict, device: str, name: str) -> None:
    """Loss and gradients within a relative tolerance of the eager way's (float32: 2e-3; bfloat16: 5e-2)."""
    tol = 5e-2 if device == "cuda" else 2e-3
    for key, ref in want.items():
        diff = float((got[key] - ref).norm() / ref.norm().clamp_min(1e-30))
        assert diff <= tol, f"{name}: {key} differs from eager's by {diff:.2e} (relative L2) > {tol}"


@pytest.fixture(scope="session")
def bench(request) -> Runner:
    runner = Runner(request.config)
    request.config._promptkd_runner = runner
    return runner


def ratios(results: dict, group: str) -> dict[str, dict]:
    """Per way of ``group``: its time over each way of ``suite.COLUMNS[group]`` (the fastest, for a tuple of ways);
    its memory over the ``suite.MEMORY`` way's (``memory_x_<that way's column>``)."""
    mine = {way: r for (g, way), r in results.items() if g == group}
    columns = suite.COLUMNS[group]
    times = {name: min((mine[w]["median_s"] for w in ((ways,) if isinstance(ways, str) else ways) if w in mine),
                       default=None) for name, ways in columns.items()}
    base = mine.get(suite.MEMORY[group])
    memory_name = "memory_" + next(name for name, ways in columns.items() if ways == suite.MEMORY[group])
    out = {}
    for way, r in mine.items():
        t = r["median_s"]
        out[way] = {name: t / d if d else None for name, d in times.items()}
        out[way][memory_name] = (r["peak_extra_mb"] / base["peak_extra_mb"]
                                 if base and r["peak_extra_mb"] is not None and base["peak_extra_mb"] else None)
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    runner = getattr(config, "_promptkd_runner", None)
    if runner is None:
        return
    for entry in output_json["benchmarks"]:
        way = entry["param"] if "param" in entry else entry["name"].split("[")[-1].rstrip("]")
        entry["extra_info"].update(ratios(runner.results, entry["group"]).get(way, {}))


def _fmt(x, spec):
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def pytest_terminal_summary(terminalreporter, config):
    runner = getattr(config, "_promptkd_runner", None)
    if runner is None or not runner.results:
        return
    info = versions()
    device = torch.cuda.get_device_name() if runner.device == "cuda" else \
        f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    write = terminalreporter.write_line
    write(f"\npromptkd bench: {device} | commit {info['commit']} | torch {info['torch']} | triton {info['triton']}")
    rows: dict[str, list] = {}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for group in suite.WAYS:
        table = ratios(runner.results, group)
        if not table:
            continue
        dims = suite.SIZES[group]["cuda" if runner.device == "cuda" else runner.size]
        write(f"\n{group}  ({', '.join(f'{k.upper()}={v}' for k, v in dims.items())}, "
              f"{str(suite.dtype_for(runner.device)).removeprefix('torch.')}; medians)")
        names = list(next(iter(table.values())))
        heads = [n.replace("x_best_", "x ").replace("memory_x_", "mem x ").replace("x_", "x ") for n in names]
        write(f"  {'way':20s} {'median s':>9s} " + " ".join(f"{h:>{max(8, len(h))}s}" for h in heads[:-1])
              + f" {'peak MB':>9s} {heads[-1]:>{max(11, len(heads[-1]))}s}")
        for way in suite.WAYS[group]:
            if way not in table:
                continue
            r, q = runner.results[group, way], table[way]
            cells = " ".join(_fmt(q[n], f"{max(8, len(h))}.2f") for n, h in zip(names[:-1], heads[:-1], strict=True))
            write(f"  {way:20s} {r['median_s']:9.3f} {cells} {_fmt(r['peak_extra_mb'], '9.0f')} "
                  f"{_fmt(q[names[-1]], f'{max(11, len(heads[-1]))}.3f')}")
            rows.setdefault(suite.RECORD[group], []).append(
                dict(timestamp=stamp, device=device, **info, group=group, way=way, size=runner.size, **dims,
                     dtype=str(suite.dtype_for(runner.device)).removeprefix("torch."), **r, **q))
    if not config.getoption("--bench-no-record"):
        for name, recorded in rows.items():
            append_rows(RESULTS / name, recorded)
