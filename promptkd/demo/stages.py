"""What ``promptkd demo`` and ``promptkd experiment`` share: an output directory that is never overwritten
unless asked, training stages that resume, per-model scores kept on disk, and the results table.

A staged run writes a manifest (its settings) in its output directory. Starting again there is an error
without ``resume`` (continue: finished stages are kept, an interrupted one resumes from its last
checkpoint; the manifest must match) or ``overwrite`` (remove the run's entries and start again).
"""

from __future__ import annotations

import json
import os
import time

from ..errors import InputError


def start(out: str, manifest: dict, resume: bool, overwrite: bool, *, manifest_name: str, entries: tuple,
          what: str) -> bool:
    """Checks ``out`` against the run rules (module docstring); returns whether a previous run continues.

    ``entries``: the names a run of this kind writes in ``out`` (only those are removed by ``overwrite``)."""
    from ..files import remove_entries, write_text

    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory")
    previous = sorted(n for n in os.listdir(out) if n in entries) if os.path.isdir(out) else []
    manifest_path = os.path.join(out, manifest_name)
    if resume:
        if not os.path.isfile(manifest_path):
            raise InputError(f"--resume: {out!r} holds no {what} to continue (no {manifest_name})")
        with open(manifest_path) as f:
            saved = json.load(f)
        if saved != manifest:
            changed = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
            raise InputError(f"--resume: {out!r} holds a {what} with other settings (they differ in "
                             f"{', '.join(changed)}: {json.dumps({k: saved.get(k) for k in changed})}); resume "
                             "it with the same options, or pass --overwrite")
        return True
    if previous and not overwrite:
        raise InputError(f"--out {out!r} holds a previous {what} ({', '.join(previous)}); pass --resume to "
                         "continue it, --overwrite to replace it, or choose another directory")
    remove_entries(out, previous)
    os.makedirs(out, exist_ok=True)
    write_text(manifest_path, json.dumps(manifest, indent=2))
    return False


def best_model(run_dir: str) -> str:
    """The run's model selected by validation ROUGE-L (``best/``), else its last (``final/``)."""
    best = os.path.join(run_dir, "best", "model")
    return best if os.path.isdir(best) else final_model(run_dir)


def final_model(run_dir: str) -> str:
    """The run's model after its last step (``final/``)."""
    return os.path.join(run_dir, "final", "model")


def best_weights(run_dir: str) -> str:
    """The directory of the checkpoint :func:`best_model` picks (its ``model/``, and ``prompt/`` for promptkd)."""
    return os.path.dirname(best_model(run_dir))


def train_stage(run_dir: str, config, log, name: str | None = None) -> str:
    """Trains ``config`` into ``run_dir`` unless it finished earlier; resumes one cut before its end."""
    from ..files import write_text
    from ..train.checkpoints import checkpoints
    from ..train.trainer import train

    name = name or os.path.basename(run_dir)
    if os.path.isdir(os.path.join(run_dir, "final", "model")):
        log(f"{name}: trained earlier")
        return run_dir
    t0 = time.perf_counter()
    # A stage cut before its first checkpoint left only files of its own: start it again.
    again = checkpoints(run_dir)
    train(config, log=lambda _: None, resume=bool(again), overwrite=not again)
    seconds = time.perf_counter() - t0
    write_text(os.path.join(run_dir, TIMING), json.dumps({"seconds": round(seconds, 1), "resumed": bool(again)}))
    log(f"{name}: trained in {seconds:.0f} s" + (" (resumed)" if again else ""))
    return run_dir


#: A finished stage's training wall time, written by :func:`train_stage`: {"seconds", "resumed"} (a resumed
#: stage's seconds are only those of the invocation that finished it).
TIMING = "timing.json"


def stage_seconds(run_dir: str) -> dict | None:
    """What :func:`train_stage` recorded of ``run_dir``'s training time, or None (trained by an older version, or
    cut between its training's end and the record)."""
    path = os.path.join(run_dir, TIMING)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def cached(path: str, compute):
    """The JSON in ``path``, or ``compute()`` written there atomically (a kept result of a resumed run)."""
    from ..files import write_text

    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, json.dumps(value, indent=2))
    return value


def table(rows: dict, seeds: int) -> str:
    """A markdown table of ``rows`` (name -> {"test": scores, "test_heldout": scores}, as ``evaluate`` returns)."""
    with_ce = all("ce" in r["test"] and "ce" in r["test_heldout"] for r in rows.values())
    lines = ["| model | test ROUGE-L | test exact match | held-out templates ROUGE-L | held-out exact match |"
             + (" test CE | held-out CE |" if with_ce else ""),
             "|---|---|---|---|---|" + ("---|---|" if with_ce else "")]
    for name, scores in rows.items():
        t, h = scores["test"], scores["test_heldout"]
        lines.append(f"| {name} | {t['rougeL']:.1f} ± {t['rougeL_std']:.1f} | "
                     f"{t['exact_match']:.1f} ± {t['exact_match_std']:.1f} | "
                     f"{h['rougeL']:.1f} ± {h['rougeL_std']:.1f} | "
                     f"{h['exact_match']:.1f} ± {h['exact_match_std']:.1f} |"
                     + (f" {t['ce']:.3f} | {h['ce']:.3f} |" if with_ce else ""))
    first = next(iter(rows.values()))
    lines.append(f"\nSampled generation (temperature 1), mean ± std over {seeds} sampling seed(s), "
                 f"{first['test']['num_examples']} test and {first['test_heldout']['num_examples']} held-out-template "
                 "examples." + (" CE: cross-entropy on the references given the prompts (nats per token; lower is "
                                "better)." if with_ce else ""))
    return "\n".join(lines)


def verdict(rows: dict, control: str = "sft", baseline: str = "sft_init") -> str:
    """What a table can and cannot show, in words computed from it: each row's test ROUGE-L against
    ``baseline`` (where every distillation starts) and the ``control`` (continued SFT), called apart
    only when the gap exceeds twice the larger sampling-seed standard deviation."""
    def gap(name: str, other: str) -> str:
        a, b = rows[name]["test"], rows[other]["test"]
        diff, noise = a["rougeL"] - b["rougeL"], 2 * max(a["rougeL_std"], b["rougeL_std"])
        word = "above" if diff > noise else "below" if diff < -noise else "within noise of"
        return f"{word} {other} ({diff:+.1f})"

    names = [n for n in rows if n not in ("teacher", baseline, control)]
    lines = ["What this table can show (test ROUGE-L; 'noise' = twice the larger sampling-seed std; each "
             "model was trained once, so training-seed variation is not in these error bars):"]
    if control in rows and baseline in rows:
        lines.append(f"- {control} (continued SFT, the control): {gap(control, baseline)}")
    for name in names:
        parts = [gap(name, baseline)] + ([gap(name, control)] if control in rows else [])
        lines.append(f"- {name}: " + ", ".join(parts))
    distilled = [n for n in names if not n.startswith(f"{control}[")]  # not the control's replicates
    if distilled:
        best = max(distilled, key=lambda n: rows[n]["test"]["rougeL"])
        others = [n for n in distilled if n != best]
        if others:
            runner = max(others, key=lambda n: rows[n]["test"]["rougeL"])
            lines.append(f"- best distilled: {best}, {gap(best, runner)}")
    return "\n".join(lines)
