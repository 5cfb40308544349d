"""Compare training runs: one table of the evaluated checkpoints (the last one's pass@1 +- SEM and pass@k, the best
one's, LogPS at the first and last step, the largest update, collapse), runs of the same name pooled over seeds, and
Figure-6-style plots of accuracy, LogPS and update norm over steps. Each run's best checkpoint (PAPER.md §3: the
highest intermediate pass@1) gets a link, RUN/best, which run.sh's final evaluation uses; report.md says what ranked
them (benchmark, samples, and the prompt and grading that eval.py's summary.json records).

    python report.py runs/sft runs/redi runs/dpo --out runs/report
    python eval.py report runs/sft runs/redi runs/dpo --out runs/report     # the same

A run folder is one of sft.py/redi.py, its checkpoints evaluated by eval.py --out RUN/eval/step_N. --out gets
report.md, report.json and report.png (with matplotlib).
"""
import argparse
import json
import re
from pathlib import Path

import numpy as np

from common import bad_fields, die, read_json, read_json_lines

parser = argparse.ArgumentParser(description="compare training runs: one table, and Figure-6-style plots of "
                                 "accuracy, LogPS and update norm over steps")
parser.add_argument("runs", nargs="+", help="run folders of sft.py/redi.py, each with eval/step_N/summary.json "
                                            "(eval.py --out RUN/eval/step_N on RUN/ckpt/step_N)")
parser.add_argument("--out", required=True, help="writes report.md, report.json and report.png (with "
                                                 "matplotlib); each RUN/best links to that run's best checkpoint")

# -----------------------------------------------------------------------------
# reading a run's files


def read_summary(path):
    """((pass@1, sem, pass@k), how) of an evaluated checkpoint: its one benchmark's, or the average over its
    benchmarks; how: what that pass@1 was measured on and with, in words (ranked_by)."""
    expected = "a summary.json written by eval.py"
    summary = read_json(path, "summary", expected)
    benchmarks = [k for k in summary if k not in ("average", "settings")] if isinstance(summary, dict) else []
    name = benchmarks[0] if len(benchmarks) == 1 else "average"
    if not benchmarks or name not in summary:
        die(f"{path} has no {'benchmark' if not benchmarks else 'average'} entry; expected {expected}")
    s = summary[name]
    wrong = bad_fields(s, {"pass@1": ((int, float), "a number"), "pass@k": (dict, "an object")})
    if not wrong and not (s["pass@k"] and all(k.isdigit() and type(v) in (int, float) for k, v in s["pass@k"].items())):
        wrong = f"has 'pass@k' = {json.dumps(s['pass@k'])[:40]}, not an object of k: number"
    if not wrong and type(s.get("sem")) not in (int, float, type(None)):  # sem is optional
        wrong = f"has 'sem' = {json.dumps(s['sem'])[:40]}, not a number"
    if wrong:
        die(f"{path}: its {name!r} entry {wrong}; expected {expected}")
    return (s["pass@1"], s.get("sem"), s["pass@k"]), ranked_by(benchmarks, max(s["pass@k"], key=int),
                                                               summary.get("settings"))


def ranked_by(benchmarks, n, settings):
    """A checkpoint's pass@1 in words: its benchmarks and samples, and the prompt and grading that eval.py's summary
    records (the authors chose checkpoints with lighteval: their prompt, no think prefix, the whole response
    graded; PAPER.md §4)."""
    what = f"{' + '.join(benchmarks)} pass@1 over {n} samples"
    if not isinstance(settings, dict) or settings.get("prompt") is None:
        return f"{what}, prompt and grading not recorded"
    prefix = {True: "think prefix", False: "no think prefix"}.get(settings.get("think_prefix"), "think prefix unknown")
    answer = {"think": "answer after </think>", "whole": "answer from the whole response"}.get(
        settings.get("answer_from"), f"answer from {settings.get('answer_from')}")
    return f"{what}, prompt {settings['prompt']}, {prefix}, {answer}"


REPORT_KEYS = ("chosen_logps_per_token", "rejected_logps_per_token", "update_norm")  # what report() reads per step


def read_metrics(path):
    """A run's metrics.jsonl: one object per step with an integer step; each of REPORT_KEYS that line 1 has must be a
    number on every line. A last line cut short by a crash is skipped, with a note."""
    expected = "a metrics.jsonl written by sft.py or redi.py"
    metrics = []
    for n, m in read_json_lines(path, "metrics", expected, cut_last_ok=True):
        first = metrics[0] if metrics else m
        keys = [k for k in REPORT_KEYS if isinstance(first, dict) and k in first]
        wrong = bad_fields(m, {"step": (int, "an integer"), **{k: ((int, float), "a number") for k in keys}})
        if wrong:
            die(f"{path}, line {n} {wrong}; expected {expected}")
        metrics.append(m)
    return metrics


def run_report(run):
    """One run's evaluated checkpoints and training dynamics: {step: (pass@1, sem, pass@k)}, metrics.jsonl, and
    its best checkpoint, the one the paper keeps (PAPER.md §3): the highest intermediate pass@1, the earlier on a
    tie."""
    run = Path(run)
    if not run.is_dir():
        die(f"run {str(run)!r} is not a folder; expected a run folder of sft.py/redi.py with eval/step_N/summary.json")
    evals, hows = {}, set()
    for path in sorted(run.glob("eval/step_*/summary.json")):
        if re.fullmatch(r"step_\d+", path.parent.name):  # not step_final, step_5.bak, ...
            evals[int(path.parent.name[5:])], how = read_summary(path)
            hows.add(how)
    if not evals:
        die(f"{run} has no eval/step_N/summary.json: evaluate its checkpoints first")
    step = min(evals, key=lambda k: (-evals[k][0], k))  # among this run's own checkpoints, before step 0 joins
    best = {"step": step, "pass@1": evals[step][0], "sem": evals[step][1],
            "checkpoint": str(run / "ckpt" / f"step_{step:06d}")}
    metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    config = read_json(run / "config.json", "config", "the config.json of an sft.py/redi.py run") \
        if (run / "config.json").exists() else {}
    wrong = bad_fields(config, {"model": (str, "a string")} if isinstance(config, dict) and "model" in config else {})
    if wrong:
        die(f"{run / 'config.json'} {wrong}; expected the config.json of an sft.py/redi.py run")
    # Step 0 is the starting model: when it is an evaluated checkpoint of another run, take its accuracy.
    start = Path(config["model"]).resolve() if "model" in config else None
    start_run = None  # the run whose checkpoint this one starts from: the SFT run of a stage-2 run
    if start and re.fullmatch(r"step_\d+", start.name) \
            and (start.parent.parent / "eval" / start.name / "summary.json").exists():
        start_run = str(start.parent.parent)
        if 0 not in evals:
            evals[0] = run_report(start_run)["evals"][int(start.name[5:])]
    return {"run": str(run), "evals": dict(sorted(evals.items())), "best": best, "ranked_by": sorted(hows),
            "metrics": metrics, "start_run": start_run}


# -----------------------------------------------------------------------------
# the tables and the plots


def seed_table(runs):
    """Runs of the same name (one folder per seed, e.g. sft_seedK/sft and sft_seedK/stage2_seedJ/b_redi) pooled: the
    final pass@1's mean, its spread over SFT seeds (the sd of the means of the runs that start from each SFT run; an
    SFT run is its own start) and over stage-2 seeds (the sd among runs from the same SFT run, averaged over SFT
    runs), its range, and the change from each run's previous checkpoint to its last (3/4 of SFT to the end; halfway
    through stage 2 to the end), which says whether a run had stopped moving. Sample sds (n - 1); "-" for one value."""
    sd = lambda v: f"{np.std(v, ddof=1):.1%}" if len(v) > 1 else "-"  # noqa: E731
    lines = ["| run | runs (SFT seeds x stage-2 seeds) | final pass@1, mean | sd over SFT seeds "
             "| sd over stage-2 seeds | min to max | last - previous checkpoint, mean (min to max) |", "|---" * 7 + "|"]
    by_name = {}
    for r in runs:
        by_name.setdefault(Path(r["run"]).name, []).append(r)
    for name, group in by_name.items():
        by_start = {}
        for r in group:
            by_start.setdefault(r["start_run"] or r["run"], []).append(r["evals"][max(r["evals"])][0])
        finals = [v for vs in by_start.values() for v in vs]
        within = [np.std(v, ddof=1) for v in by_start.values() if len(v) > 1]
        n_stage2 = sorted({len(v) for v in by_start.values()})
        changes = []
        for r in group:
            steps = [s for s in r["evals"] if s > 0]  # step 0 is another run's checkpoint
            if len(steps) > 1:
                changes.append(r["evals"][steps[-1]][0] - r["evals"][steps[-2]][0])
        change = f"{np.mean(changes):+.1%} ({min(changes):+.1%} to {max(changes):+.1%})" if changes else "-"
        lines.append(f"| {name} | {len(by_start)} x {'/'.join(map(str, n_stage2))} | {np.mean(finals):.1%} | "
                     f"{sd([np.mean(v) for v in by_start.values()])} | {f'{np.mean(within):.1%}' if within else '-'} | "
                     f"{min(finals):.1%} to {max(finals):.1%} | {change} |")
    return lines


def report(args):
    """The table: the last checkpoint's pass@1 +- SEM and pass@k per run, and its best checkpoint's; LogPS at the
    first and last step; the largest update; the first step flagged as collapse. A line says what ranked the
    checkpoints. Then runs of the same name pooled over seeds (seed_table): mean and spread of the final pass@1 over
    SFT seeds and stage-2 seeds.
    Each run folder gets RUN/best, a link to its best checkpoint (as RUN/final links the last), for run.sh's final
    evaluation; report.json names it too."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        die(f"--out {args.out!r} is a file; expected a folder (it is created if missing)")
    runs = [run_report(r) for r in args.runs]
    lines = ["| run (last step) | pass@1 | pass@k | best checkpoint: pass@1 | chosen LogPS | rejected LogPS "
             "| max update norm | collapse |", "|---" * 8 + "|"]
    for r in runs:
        step = max(r["evals"])
        acc, sem, at_k = r["evals"][step]
        k = max(at_k, key=int)
        m, best = r["metrics"], r["best"]
        logps = lambda key: f"{m[0][key]:.3f} -> {m[-1][key]:.3f}" if m and key in m[0] else ""  # noqa: E731
        collapse = next((str(x["step"]) for x in m if x.get("collapse")), "no" if m and "collapse" in m[0] else "")
        largest = max((x["update_norm"] for x in m if "update_norm" in x), default=float("nan"))
        lines.append(f"| {r['run']} (step {step}) | {acc:.1%} +- {sem or 0:.1%} | @{k} {at_k[k]:.1%} | "
                     f"**step {best['step']}: {best['pass@1']:.1%} +- {best['sem'] or 0:.1%}** | "
                     f"{logps('chosen_logps_per_token')} | {logps('rejected_logps_per_token')} | "
                     f"{largest:.3g} | {collapse} |")
        link, target = Path(r["run"]) / "best", Path(best["checkpoint"])
        if target.is_dir():
            link.unlink(missing_ok=True)
            link.symlink_to(target.relative_to(r["run"]))
        else:
            print(f"note: {target} is not there, so {link} was not made")
    hows = sorted({how for r in runs for how in r["ranked_by"]})
    if len(hows) == 1:
        lines += ["", f"Checkpoints ranked by: {hows[0]}."]
    else:  # a best checkpoint is only the best under the measure that ranked it
        lines += ["", "Checkpoints ranked by different measures (their pass@1 do not compare): " +
                  "; ".join(f"{r['run']}: {' / '.join(r['ranked_by'])}" for r in runs) + "."]
    lines += [""] + seed_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(matplotlib is not installed: no plots)")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for r in runs:
        m = [x for x in r["metrics"] if "chosen_logps_per_token" in x]
        if not m:  # an SFT run: its last accuracy is step 0 of the runs that start from it
            continue
        steps = sorted(r["evals"])
        [line] = axes[0].plot(steps, [r["evals"][s][0] for s in steps], marker="o", label=r["run"])
        axes[0].plot(r["best"]["step"], r["best"]["pass@1"], marker="*", ms=16, color=line.get_color())  # the best
        for ax, key in zip(axes[1:], ("chosen_logps_per_token", "rejected_logps_per_token", "update_norm")):
            ax.plot([x["step"] for x in m], [x[key] for x in m], label=r["run"])
    for ax, title in zip(axes, ("pass@1 of checkpoints", "chosen LogPS (per token)", "rejected LogPS (per token)",
                                "update norm |theta_t+1 - theta_t|")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[3].set_yscale("log")
    if axes[0].lines:  # none when no run has stage-2 metrics
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    print(f"plots: {out / 'report.png'}")


def main(argv=None, prog=None):
    """`python report.py RUN... --out DIR`; eval.py's `report` sub-command calls it with prog="eval.py report"."""
    parser.prog = prog or parser.prog
    report(parser.parse_args(argv))


if __name__ == "__main__":
    main()
