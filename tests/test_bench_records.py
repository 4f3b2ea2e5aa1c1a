"""bench/bench_kd_loss.append_rows, which every benchmark records its rows with: a new file gets a header, rows
with the file's columns are appended, and rows with a column the file lacks rewrite it with the union of the
columns, earlier rows empty in the new one, every value under its own column."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_kd_loss import append_rows  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_rows_keep_their_columns_when_a_column_is_added(tmp_path):
    path = tmp_path / "results.csv"
    append_rows(path, [{"way": "a", "x_floor": 1.0, "memory": 0.5}])
    append_rows(path, [{"way": "b", "x_floor": 2.0, "memory": 0.25}])
    assert read(path) == (["way", "x_floor", "memory"], [{"way": "a", "x_floor": "1.0", "memory": "0.5"},
                                                          {"way": "b", "x_floor": "2.0", "memory": "0.25"}])
    append_rows(path, [{"way": "c", "x_floor": 3.0, "x_trl": 0.24, "memory": 0.125}])  # a new column mid-row
    fields, rows = read(path)
    assert fields == ["way", "x_floor", "memory", "x_trl"]
    assert rows == [{"way": "a", "x_floor": "1.0", "memory": "0.5", "x_trl": ""},
                    {"way": "b", "x_floor": "2.0", "memory": "0.25", "x_trl": ""},
                    {"way": "c", "x_floor": "3.0", "memory": "0.125", "x_trl": "0.24"}]
    append_rows(path, [{"way": "d", "memory": 1.5}])  # fewer columns: appended, the others empty
    assert read(path)[1][-1] == {"way": "d", "x_floor": "", "memory": "1.5", "x_trl": ""}
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left


def test_gpu_research_picks_the_largest_plan_that_fits():
    """bench/gpu_research.choose: the plans' costs from measured seconds, the first (largest) that fits."""
    from gpu_research import TIERS, choose, gpu_settings

    s = gpu_settings()
    per_step = dict.fromkeys(("sft", "kd", "distillm"), 0.1) | {"rkl": 0.2, "promptkd": 0.3, "promptkd_frozen": 0.2}
    # One seed of promptkd + its ablation: 1000 x (0.3 + 0.2) + 2 runs x 5 validations x 2 s + 2 evaluations x 5 s.
    choice, costs = choose(per_step, 2.0, 5.0, s, left=10 ** 6)
    assert choice == 0 and costs[-1] == 1000 * 0.5 + 2 * 5 * 2.0 + 2 * 5.0
    assert choose(per_step, 2.0, 5.0, s, left=costs[-1])[0] == len(TIERS) - 1
    assert choose(per_step, 2.0, 5.0, s, left=costs[-1] - 1)[0] is None
    assert all(a >= b for a, b in zip(costs[:2], costs[1:3], strict=True))
