"""run.sh paper's wiring, without GPUs: torchrun is replaced by a stand-in that logs each command and leaves what
the real script would (checkpoints, the final link, an eval summary.json); the data is already prepared, and the
real `eval.py report` picks the best checkpoint that the final evaluation must then use."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, read_jsonl

# pass@1 the stand-in evaluation reports per checkpoint: step 200 is the best stage-2 checkpoint, not the last
ACCURACY = {"step_000010": 0.3, "step_000100": 0.4, "step_000200": 0.6, "step_000300": 0.5}

STAND_IN = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["TORCHRUN_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
script, flag = args[2], lambda name: args[args.index(name) + 1]
out = Path(flag("--out"))
if script in ("sft.py", "redi.py"):
    steps = [10] if script == "sft.py" else [100, 200, 300]
    for step in steps:
        (out / "ckpt" / f"step_{{step:06d}}").mkdir(parents=True)
    (out / "final").symlink_to(f"ckpt/step_{{steps[-1]:06d}}")
    (out / "config.json").write_text(json.dumps({{"model": flag("--model")}}))
elif script == "eval.py":
    acc = {ACCURACY!r}[Path(flag("--model")).name]
    out.mkdir(parents=True, exist_ok=True)  # a rerun finds its samples there
    (out / "summary.json").write_text(json.dumps({{"math500": {{"pass@1": acc, "sem": 0.01, "pass@k": {{"4": acc}}}},
                                                  "average": {{}}}}))
"""


def run_paper(tmp_path, **variables):
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "torchrun").write_text(STAND_IN)
        (bin_dir / "torchrun").chmod(stat.S_IRWXU)
    log = tmp_path / "torchrun.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "OUT": str(tmp_path / "paper"), "TORCHRUN_LOG": str(log), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           **variables}
    proc = subprocess.run(["bash", "run.sh", "paper"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(args[2], args[3:]) for args in read_jsonl(log)]


def flag(args, name):
    return args[args.index(name) + 1]


def test_paper_recipe_runs_sft_3ep_on_its_own_and_evaluates_the_best_checkpoint(tmp_path):
    paper = tmp_path / "paper"
    (paper / "data").mkdir(parents=True)
    (paper / "data" / "sft.jsonl").write_text("")  # prepared already: run.sh must not prepare again (offline here)
    (paper / "data" / "pref.jsonl").write_text("")

    # The default: the paper's final model, REDI from SFT-5ep.
    calls = run_paper(tmp_path)
    assert [script for script, _ in calls] == ["sft.py", "redi.py"] + ["eval.py"] * 6
    sft, redi = calls[0][1], calls[1][1]
    assert (flag(sft, "--epochs"), flag(sft, "--out")) == ("5", str(paper / "sft_5ep"))
    assert flag(redi, "--model") == str(paper / "sft_5ep/final") and flag(redi, "--alpha") == "0.8"
    assert flag(redi, "--save-every") == "200"  # the authors' save_steps
    # 8 GPUs: a rank's 16 SFT sequences as 4 rows of 4, its 4 pairs as 2 rows of 2
    assert (flag(sft, "--micro-batch-size"), flag(redi, "--micro-batch-size")) == ("4", "2")
    intermediate, final = [args for _, args in calls[2:6]], [args for _, args in calls[6:]]
    for args in intermediate:  # checkpoint selection as the authors' lighteval runs: no forced <think>, whole response
        assert (flag(args, "--benchmark"), flag(args, "--samples"), flag(args, "--prompt")) == ("math500", "4", "lighteval")
        assert "--no-think-prefix" in args and flag(args, "--answer-from") == "whole"
    assert [flag(args, "--model") for args in intermediate] == \
        [str(paper / "sft_5ep/ckpt/step_000010")] + [str(paper / f"sft_5ep-redi/ckpt/step_{s:06d}") for s in (100, 200, 300)]
    for args in final:  # the tables' numbers: five benchmarks x 16, the forced <think> and the </think> rule
        assert flag(args, "--samples") == "16" and "aime24" in args and flag(args, "--prompt") == "lighteval"
        assert "--no-think-prefix" not in args and "--answer-from" not in args
    assert flag(final[0], "--model") == str(paper / "sft_5ep/ckpt/step_000010")  # the SFT model's rows
    assert flag(final[1], "--model") == str(paper / "sft_5ep-redi/ckpt/step_000200")  # the best, not the last (300)
    report = json.loads((paper / "sft_5ep-redi/report.json").read_text())
    assert report[1]["best"]["step"] == 200

    # A baseline: SFT-3ep is trained as its own 3-epoch run and the baseline starts from it; the data is reused.
    calls = run_paper(tmp_path, SFT_EPOCHS="3", RUN2="dpo", STAGE2="--loss dpo --beta 0.001 --lr 2e-7")
    sft, dpo = calls[0][1], calls[1][1]
    assert (flag(sft, "--epochs"), flag(sft, "--out")) == ("3", str(paper / "sft_3ep"))
    assert flag(dpo, "--model") == str(paper / "sft_3ep/final") and flag(dpo, "--out") == str(paper / "sft_3ep-dpo")
    assert (flag(dpo, "--loss"), flag(dpo, "--beta"), flag(dpo, "--lr")) == ("dpo", "0.001", "2e-7")
    assert flag(calls[-2][1], "--model") == str(paper / "sft_3ep/ckpt/step_000010")  # SFT-3ep's own rows
    assert flag(calls[-1][1], "--model") == str(paper / "sft_3ep-dpo/ckpt/step_000200")

    # Run again: both trainings are done, so only the evaluations (which skip finished samples) run.
    assert [script for script, _ in run_paper(tmp_path)] == ["eval.py"] * 6
