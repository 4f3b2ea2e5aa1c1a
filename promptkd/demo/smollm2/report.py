"""The experiments' report: runs grouped over training seeds, the verdict over them, and the text and plots of
``results.md``."""

from __future__ import annotations

import math
import os


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0)

def seed_groups(rows: dict, variants: dict, seed: int, seconds: dict | None = None) -> dict:
    """Runs that differ only in their training seed, grouped: {group: {"runs": {row: seed}, "test": mean of the
    runs' test ROUGE-L, "train_std": their std over training seeds (sample std; 0 for one run), "sampling_std":
    the mean of their sampling-seed stds, and where the scores have it "ce" / "ce_std": the mean and training-seed
    std of the test cross-entropy on the references, and where ``seconds`` (row -> training seconds or None) has
    every run's time "seconds": their mean}}. A group is the method plus every other change of its variant."""
    groups: dict[str, dict] = {}
    for row in rows:
        if row in ("teacher", "sft_init"):
            continue
        method, _, name = row.partition("[")
        changes = dict(variants.get(name.rstrip("]"), {})) if name else {}
        run_seed = changes.pop("seed", seed)
        changes.pop("method", None)
        label = method + "".join(f" {k}={v}" for k, v in sorted(changes.items()))
        groups.setdefault(label, {"runs": {}})["runs"][row] = run_seed
    for group in groups.values():
        mean, std = mean_std([rows[r]["test"]["rougeL"] for r in group["runs"]])
        group.update(test=mean, train_std=std,
                     sampling_std=sum(rows[r]["test"]["rougeL_std"] for r in group["runs"]) / len(group["runs"]))
        if all("ce" in rows[r]["test"] for r in group["runs"]):
            group["ce"], group["ce_std"] = mean_std([rows[r]["test"]["ce"] for r in group["runs"]])
        times = [(seconds or {}).get(r) for r in group["runs"]]
        if None not in times:
            group["seconds"] = round(sum(times) / len(times), 1)
    return groups

def group_plots(groups: dict, plots: str) -> list[str]:
    """Bar charts of :func:`seed_groups`' means with their training-seed stds as error bars: test ROUGE-L
    (``groups_rougeL.png``) and, where scored, the test cross-entropy (``groups_ce.png``); returns the paths."""
    from ...train.plot import bar_chart

    paths = [bar_chart({k: g["test"] for k, g in groups.items()}, os.path.join(plots, "groups_rougeL.png"),
                       "Test ROUGE-L (mean ± std over training seeds)", "ROUGE-L",
                       errors={k: g["train_std"] for k, g in groups.items()})]
    if all("ce" in g for g in groups.values()):
        paths.append(bar_chart({k: g["ce"] for k, g in groups.items()}, os.path.join(plots, "groups_ce.png"),
                               "Test CE on the references (mean ± std over training seeds)", "nats per token",
                               errors={k: g["ce_std"] for k, g in groups.items()}))
    return paths

def groups_text(groups: dict, seeds: int) -> str:
    with_ce = all("ce" in g for g in groups.values())
    lines = [f"Test ROUGE-L over training seeds (each run: the mean over {seeds} sampling seeds)"
             + (", and the test cross-entropy on the references (nats per token, lower is better)" if with_ce else "")
             + "; training wall time per run (mean; — where a run's time was not recorded):", "",
             "| runs | training seeds | mean | std over training seeds | mean sampling std |"
             + (" CE mean | CE std over training seeds |" if with_ce else "") + " training s |",
             "|---|---|---|---|---|" + ("---|---|" if with_ce else "") + "---|"]
    for label, g in groups.items():
        lines.append(f"| {label} | {', '.join(str(x) for x in g['runs'].values())} | {g['test']:.1f} | "
                     f"{g['train_std']:.1f} | {g['sampling_std']:.1f} |"
                     + (f" {g['ce']:.3f} | {g['ce_std']:.3f} |" if with_ce else "")
                     + (f" {g['seconds']:.0f} |" if "seconds" in g else " — |"))
    return "\n".join(lines)

#: The distillation baselines whose best is compared with the control (sft), then with promptkd.
DISTILLERS = ("kd", "rkl", "gkd", "distillm")
#: :func:`seed_groups`' label of PromptKD's frozen-prompt ablation (``prompt_frozen``), which promptkd is compared with.
FROZEN_GROUP = "promptkd prompt_frozen=True"

def seed_verdict(groups: dict, control: str = "sft") -> str:
    """The verdict over training seeds, computed from :func:`seed_groups` for test ROUGE-L (higher is better) and,
    where scored, the test cross-entropy (lower is better): does the best of :data:`DISTILLERS` beat ``control``
    by more than twice the larger training-seed std of the two, and does ``promptkd`` beat that best baseline
    so, and rkl (its student loss without the prompt) and the frozen-prompt ablation (:data:`FROZEN_GROUP`) where
    they ran? A comparison with a group of one training seed has no such std and is not called."""
    lines = ["Verdict over training seeds (a gap is called only beyond twice the larger training-seed std):"]
    metrics = [("test ROUGE-L", "test", "train_std", 1.0)]
    if all("ce" in g for g in groups.values()):
        metrics.append(("test cross-entropy", "ce", "ce_std", -1.0))
    def compare(a: str, b: str, key: str, std: str, sign: float) -> str:
        ga, gb = groups[a], groups[b]
        diff, noise = ga[key] - gb[key], 2 * max(ga[std], gb[std])
        if min(len(ga["runs"]), len(gb["runs"])) < 2:
            return f"{a} {ga[key]:.3g} vs {b} {gb[key]:.3g} ({diff:+.3g}): not called (one training seed)"
        word = ("better than" if sign * diff > noise else "worse than" if sign * diff < -noise
                else "within noise of")
        return f"{a} {ga[key]:.3g} is {word} {b} {gb[key]:.3g} ({diff:+.3g}; noise {noise:.3g})"

    for title, key, std, sign in metrics:
        present = [m for m in DISTILLERS if m in groups]
        if control not in groups or not present:
            continue
        best = max(present, key=lambda m: sign * groups[m][key])
        lines.append(f"- {title}: does distillation beat fine-tuning? {compare(best, control, key, std, sign)}")
        if "promptkd" in groups:
            lines.append(f"- {title}: promptkd against the best baseline: "
                         f"{compare('promptkd', best, key, std, sign)}")
            if "rkl" in groups and best != "rkl":
                lines.append(f"- {title}: promptkd against rkl (its student loss without the prompt): "
                             f"{compare('promptkd', 'rkl', key, std, sign)}")
            if FROZEN_GROUP in groups:
                lines.append(f"- {title}: the learned prompt against the frozen one: "
                             f"{compare('promptkd', FROZEN_GROUP, key, std, sign)}")
    if len(lines) == 1:
        lines.append(f"- nothing to call: the verdict compares the best of {', '.join(DISTILLERS)} with {control}, "
                     "and these runs do not hold both")
    return "\n".join(lines)

def cache_figures(manifest: dict) -> dict:
    keys = ("mode", "k", "samples", "num_examples", "num_tokens", "id_dtype", "dtype")
    return {**{k: manifest.get(k) for k in keys}, **manifest.get("measured", {})}

def caches_text(manifests: dict, groups: dict) -> str:
    """The caches' sizes, and kd from each against online kd (within one training-seed std of online kd?)."""
    lines = ["Teacher caches (the teacher over the training file):", "",
             "| cache | tokens | bytes per token | tokens/s |", "|---|---|---|---|"]
    for spec, m in manifests.items():
        figures = cache_figures(m)
        lines.append(f"| {spec} | {figures.get('num_tokens')} | {figures.get('bytes_per_token', float('nan')):.1f} | "
                     f"{figures.get('tokens_per_s', float('nan')):.0f} |")
    online = groups.get("kd")
    if online is not None:
        noise = online["train_std"]
        lines += ["", f"kd from each cache against online kd ({online['test']:.1f}, std over {len(online['runs'])} "
                      f"training seed(s) {noise:.1f}):"]
        for label, g in groups.items():
            if not label.startswith("kd teacher_cache="):
                continue
            diff = g["test"] - online["test"]
            where = "within" if abs(diff) <= noise else "outside"
            lines.append(f"- {label.removeprefix('kd ')}: {g['test']:.1f} over {len(g['runs'])} training seed(s), "
                         f"{diff:+.1f}: {where} one training-seed std of online kd")
    # A served cache against the in-process cache of the same spec: the served teacher's targets are the same
    # teacher's, so kd from them should land within one training-seed std (the larger of the two groups').
    for label, g in groups.items():
        spec = label.removeprefix("kd teacher_cache=")
        local = groups.get(f"kd teacher_cache={spec.removeprefix('srv-')}")
        if not spec.startswith("srv-") or label == spec or local is None:
            continue
        for key, std, name in (("test", "train_std", "ROUGE-L"), ("ce", "ce_std", "CE")):
            if key not in g or key not in local:
                continue
            diff, noise = g[key] - local[key], max(g[std], local[std])
            where = "within" if abs(diff) <= noise else "outside"
            lines.append(f"- {spec} against {spec.removeprefix('srv-')} by {name}: {g[key]:.3f} vs {local[key]:.3f} "
                         f"({diff:+.3f}): {where} one training-seed std ({noise:.3f})")
    return "\n".join(lines)

def cost_text(cost: dict, teacher: str = "SFT teacher") -> str:
    lines = [f"The {teacher}'s cross-entropy on the {cost['num_examples']} test responses (nats per token):", "",
             f"- without the soft prompt: {cost['no_prompt']:.3f}",
             f"- with the initial prompt (before PromptKD): {cost['initial_prompt']:.3f}"]
    lines += [f"- with the prompt {k} learned (after PromptKD): {v:.3f}" for k, v in cost["learned"].items()]
    return "\n".join(lines)

def exposure_text(curves: dict, teacher: str = "SFT teacher") -> str:
    n = curves["max_length"]
    lines = [f"ExAccErr (%) against the {teacher} ({curves['num_prompts']} test prompts x {curves['samples']} "
             "samples):", "", "| student | " + " | ".join(f"l={m}" for m in marks(n)) + " |",
             "|---|" + "---|" * len(marks(n))]
    for name, c in curves["students"].items():
        values = [c["exaccerr"][m - 1] for m in marks(n)]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None or (isinstance(v, float) and math.isnan(v))
                                                  else f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)

def marks(n: int) -> list[int]:
    return sorted({max(1, n // 4), max(1, n // 2), n})
