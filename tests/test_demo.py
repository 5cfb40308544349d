"""run.sh demo at a reduced size: the whole pipeline (demo.py, data.py prepare, sft.py, six redi.py runs,
eval.py on every checkpoint, eval.py report) completes, and the table comes from the real runs' files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, read_jsonl, run_script


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "PROBLEMS": "600", "TEST": "16", "SFT_EPOCHS": "1", "SAMPLES": "2",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # run.sh calls `python`: this one
    proc = subprocess.run(["bash", "run.sh", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = ["a_sft", "b_redi", "c_sym_high", "d_redi_high", "e_dpo", "f_simpo"]
    table = (out / "report.md").read_text()
    for run in ["sft_seed0/sft"] + [f"sft_seed0/stage2_seed0/{r}" for r in runs]:
        folder = out / run
        last = max(folder.glob("eval/step_*"))
        summary = json.loads((last / "summary.json").read_text())["test"]
        results = read_jsonl(last / "results.jsonl")
        assert len(results) == 16 * 2 and summary["pass@1"] == sum(r["correct"] for r in results) / 32
        row = next(line for line in table.splitlines() if line.startswith(f"| {folder} (step {int(last.name[5:])})"))
        assert f"{summary['pass@1']:.1%} +- {summary['sem']:.1%}" in row  # the table shows the run's own numbers
        pooled = next(line for line in table.splitlines() if line.startswith(f"| {folder.name} | 1 x 1 |"))
        assert f"| {summary['pass@1']:.1%} | - | - |" in pooled  # one seed of each: a mean, no spread
        if run != "sft_seed0/sft":
            metrics = read_jsonl(folder / "metrics.jsonl")
            assert f"{metrics[0]['chosen_logps_per_token']:.3f} -> {metrics[-1]['chosen_logps_per_token']:.3f}" in row
            assert (folder / "final").resolve() == folder / "ckpt" / f"step_{metrics[-1]['step']:06d}"
    # every stage-2 run starts from the same SFT checkpoint: the same LogPS at its first step
    first = {r: read_jsonl(out / "sft_seed0/stage2_seed0" / r / "metrics.jsonl")[0]["chosen_logps_per_token"]
             for r in runs}
    assert max(first.values()) - min(first.values()) < 1e-4
    assert re.search(r"\| .*e_dpo .*\| \d", table)
    # a second call finds every output there: it trains and evaluates nothing, and reports the same table
    again = subprocess.run(["bash", "run.sh", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and not re.search(r"^(step|batch) +\d+/", again.stdout, re.M), again.stdout
    assert (out / "report.md").read_text() == table


def test_demo_student_ends_its_turn_like_qwen():
    """Its eos is <|endoftext|>, as Qwen2.5-Math's base tokenizer's (training appends it after <|im_end|>\\n), and
    eval.py stops generation at <|im_end|> as well, so the student still stops at the end of its turn."""
    import eval as ev
    from demo import demo_tokenizer
    tok = demo_tokenizer()
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert ev.stop_token_ids(tok) == sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def test_imports_run_one_way():
    """demo.py -> eval.py -> engine.py, report.py, data.py -> common.py (-> fast.py), and never back: no module reaches
    itself by following imports (those inside functions count too). engine.py, which holds the sampler, and fast.py
    import no local module; eval.py imports engine.py and report.py."""
    import ast
    local = {"common", "data", "eval", "engine", "report", "fast", "demo", "sft", "redi"}
    imported = {}
    for name in local:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported[name] = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                          for a in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                                  if isinstance(node, ast.ImportFrom) and node.module}
        imported[name] &= local - {name}
    assert imported["fast"] == set() and imported["common"] <= {"fast"} and imported["data"] == {"common"}
    assert imported["engine"] == set() and imported["report"] == {"common"}
    assert imported["eval"] == {"common", "data", "engine", "report"}
    assert imported["demo"] == {"common", "data", "eval"}
    for name in local:
        reached, todo = set(), set(imported[name])
        while todo:
            reached.add(module := todo.pop())
            todo |= imported[module] - reached
        assert name not in reached, f"{name}.py imports a module that imports it back"


def test_demo_tokenizer_merges_survive_reloading(tmp_path):
    """The student folder is read back by AutoTokenizer as a Qwen2Tokenizer, which splits text its own way: the
    merges learnt on the corpus must be the ones that reloaded tokenizer applies (the same ids), and must apply
    (the system prompt, a dozen words, becomes about a dozen tokens, not ~70 bytes)."""
    import numpy as np
    from common import load_tokenizer
    from data import SYSTEM_PROMPT
    from demo import demo_model, demo_tokenizer, teacher_trace
    rng = np.random.default_rng(0)
    traces = [teacher_trace(int(a), int(b), rng)[0] for a, b in rng.integers(1000, 10000, (300, 2))]
    tok = demo_tokenizer([SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", "What is 1234 + 5678?"] + traces)
    demo_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 4321 + 8765?"},
            {"role": "assistant", "content": traces[0]}]
    ids = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert reloaded.apply_chat_template(chat, tokenize=True)["input_ids"] == ids
    assert len(reloaded(SYSTEM_PROMPT)["input_ids"]) <= 20 < len(SYSTEM_PROMPT.encode())


def test_report_pools_runs_over_sft_and_stage2_seeds(tmp_path):
    """run.sh demo's multi-seed layout (SFT_SEED/sft, SFT_SEED/STAGE2_SEED/RUN): the pooled row of each run name, its
    spreads worked by hand. Two SFT seeds (final 52% and 54%, 3/4 checkpoints 50% and 55%); b_redi from each with two
    stage-2 seeds: 30% and 40% from the first, 20% and 24% from the second."""
    def checkpoint(run, step, acc, **config):
        (run / "ckpt" / f"step_{step:06d}").mkdir(parents=True)
        (run / "eval" / f"step_{step:06d}").mkdir(parents=True)
        summary = {"toy": {"pass@1": acc, "sem": 0.01, "pass@k": {"1": acc}}}
        (run / "eval" / f"step_{step:06d}" / "summary.json").write_text(json.dumps(summary))
        (run / "config.json").write_text(json.dumps(config))

    runs = []
    for sft_seed, (acc_3_4, acc_end), stage2 in [(0, (0.50, 0.52), (0.30, 0.40)), (1, (0.55, 0.54), (0.20, 0.24))]:
        sft = tmp_path / f"sft_seed{sft_seed}" / "sft"
        checkpoint(sft, 3, acc_3_4, seed=sft_seed)
        checkpoint(sft, 4, acc_end, seed=sft_seed)
        runs.append(sft)
        for seed, acc in enumerate(stage2):
            run = tmp_path / f"sft_seed{sft_seed}" / f"stage2_seed{seed}" / "b_redi"
            start = str(sft / "ckpt" / "step_000004")
            checkpoint(run, 1, 0.35, model=start, seed=seed)
            checkpoint(run, 2, acc, model=start, seed=seed)
            runs.append(run)
    run_script("eval.py", "report", *runs, "--out", tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text()
    # sd over SFT seeds: of (52, 54) = 1.41; of the per-SFT-seed means of b_redi (35, 22) = 9.19;
    # sd over stage-2 seeds: the mean of sd(30, 40) = 7.07 and sd(20, 24) = 2.83
    assert "| sft | 2 x 1 | 53.0% | 1.4% | - | 52.0% to 54.0% | +0.5% (-1.0% to +2.0%) |" in table
    assert "| b_redi | 2 x 2 | 28.5% | 9.2% | 4.9% | 20.0% to 40.0% | -6.5% (-15.0% to +5.0%) |" in table

