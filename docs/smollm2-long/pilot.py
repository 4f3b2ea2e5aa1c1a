"""Pilot of ``smollm2-long`` (docs/experiments.md): one training seed of some of its methods (PromptKD and its
frozen-prompt ablation first) at the experiment's settings (300 steps from ``sft_init``, batches of 4, 24-token
answers, 10 validations with the prompt's diagnostics), to see whether the prompt moves the teacher at this budget
before the full run. A second call with more methods adds them to the same directory (a resume may add methods).

    python docs/smollm2-long/pilot.py [--out runs/smollm2-long] [--methods promptkd[,rkl,...]]

Writes OUT/results.md, OUT/plots/ (the prompt's diagnostics of both runs) and, beside this script, pilot.json
(the scores, the prompt cost, each run's diagnostics at every validation and its seconds).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from promptkd.demo.smollm2 import LONG, run_experiment
from promptkd.train.plot import run_series


def main() -> int:  # noqa: D103
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/smollm2-long")
    parser.add_argument("--methods", default="promptkd")
    args = parser.parse_args()
    out, methods = args.out, tuple(args.methods.split(","))
    settings = replace(LONG, methods=methods)
    results = run_experiment(out, settings=settings, name="smollm2-long",
                             resume=os.path.isfile(os.path.join(out, "experiment.json")))
    runs = {m: os.path.join(out, m) for m in methods}
    runs["promptkd[promptkd_frozen]"] = os.path.join(out, "variants", "promptkd_frozen")
    curves = {}
    for row, run_dir in runs.items():
        series = run_series(run_dir)
        curves[row] = {k: {"steps": v[0], "values": v[1]} for k, v in series.items()
                       if k.startswith("prompt/") or k in ("valid/ce", "valid/rougeL")}
    summary = {"settings": results["settings"], "scores": results["scores"], "prompt_cost": results["prompt_cost"],
               "seconds": results["seconds"], "curves": curves}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pilot.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
