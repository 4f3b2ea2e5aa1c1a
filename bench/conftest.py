"""The pytest-benchmark suite's options, its shared runner, and the ratio tables printed and recorded at the end.

    pytest bench/ --benchmark-only                        # the CPU figures of the README (about 15 minutes)
    pytest bench/ --benchmark-only --bench-size quick     # seconds
    pytest bench/ --benchmark-only -k kd_loss --benchmark-autosave   # JSON under bench/results/benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare    # against the last saved run

Each way is checked against the group's eager way on the same inputs before it is timed (loss and
gradients), timed in this process with pytest-benchmark's calibrated rounds after one warm-up call, and
its peak memory measured in a fresh process (``bench/suite.py``). At the end, one table per group gives
every way's median as a ratio to the GEMM floor, plain eager and the best Liger way measured in the
same run, with memory against eager's; rows are appended to ``bench/results/suite.csv`` (unless
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
                    help="problem sizes: default (the README's figures) or quick (seconds)")
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
        self._eager: dict[str, dict] = {}

    def _reference(self, group: str) -> dict:
        if group not in self._eager:
            case = suite.build(group, suite.EAGER, self.size, self.device)
            case.step()
            self._eager[group] = case.result()
        return self._eager[group]

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
        if way != suite.FLOOR:
            _agrees(case.result(), self._reference(group), self.device, f"{group}/{way}")
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
    """Per way of ``group``: time over the floor, over eager, over the best Liger way; memory over eager's."""
    mine = {way: r for (g, way), r in results.items() if g == group}
    floor, eager = mine.get(suite.FLOOR), mine.get(suite.EAGER)
    liger = min((mine[w]["median_s"] for w in suite.LIGER if w in mine), default=None)
    out = {}
    for way, r in mine.items():
        t = r["median_s"]
        out[way] = dict(
            x_floor=t / floor["median_s"] if floor else None,
            x_eager=t / eager["median_s"] if eager else None,
            x_best_liger=t / liger if liger else None,
            memory_x_eager=(r["peak_extra_mb"] / eager["peak_extra_mb"]
                            if eager and r["peak_extra_mb"] is not None and eager["peak_extra_mb"] else None))
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    runner = getattr(config, "_promptkd_runner", None)
    if runner is None:
        return
    for entry in output_json["benchmarks"]:
        way = entry["param"] if "param" in entry else entry["name"].split("[")[-1].rstrip("]")
        entry["extra_info"].update(ratios(runner.results, entry["group"]).get(way, {}))


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def pytest_terminal_summary(terminalreporter, config):
    runner = getattr(config, "_promptkd_runner", None)
    if runner is None or not runner.results:
        return
    info = versions()
    device = torch.cuda.get_device_name() if runner.device == "cuda" else \
        f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    write = terminalreporter.write_line
    write(f"\npromptkd bench: {device} | commit {info['commit']} | torch {info['torch']} | triton {info['triton']}")
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for group in suite.WAYS:
        table = ratios(runner.results, group)
        if not table:
            continue
        dims = suite.SIZES[group]["cuda" if runner.device == "cuda" else runner.size]
        write(f"\n{group}  ({', '.join(f'{k.upper()}={v}' for k, v in dims.items())}, "
              f"{str(suite.dtype_for(runner.device)).removeprefix('torch.')}; medians)")
        write(f"  {'way':18s} {'median s':>9s} {'x floor':>8s} {'x eager':>8s} {'x liger':>8s} {'peak MB':>9s} "
              f"{'mem x eager':>11s}")
        for way in suite.WAYS[group]:
            if way not in table:
                continue
            r, q = runner.results[group, way], table[way]
            write(f"  {way:18s} {r['median_s']:9.3f} {_fmt(q['x_floor'], '8.2f')} {_fmt(q['x_eager'], '8.2f')} "
                  f"{_fmt(q['x_best_liger'], '8.2f')} {_fmt(r['peak_extra_mb'], '9.0f')} "
                  f"{_fmt(q['memory_x_eager'], '11.3f')}")
            rows.append(dict(timestamp=stamp, device=device, **info, group=group, way=way, size=runner.size,
                             **dims, dtype=str(suite.dtype_for(runner.device)).removeprefix("torch."), **r, **q))
    if rows and not config.getoption("--bench-no-record"):
        append_rows(RESULTS / "suite.csv", rows)
