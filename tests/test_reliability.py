"""Nothing lost, nothing silently wrong: what sft.py, redi.py and `data.py prepare` leave behind when a step goes
non-finite, a flag, file or run folder does not fit, a huge row comes in, or the job is stopped (SIGTERM, Ctrl-C).
Each test here failed on the code before the check it names was added."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch
from conftest import ROOT, error, main, read_jsonl, write_jsonl
from safetensors.torch import load_file
from test_data import RIGHT, WRONG, raw
from test_redi import pref_rows
from test_redi import train as train_redi
from test_sft import losses, sft_rows
from test_sft import sft as train_sft
from transformers import AutoTokenizer

import common
import data
import redi
import sft


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows(40))


def checkpoints(out):
    return sorted(p.name for p in (out / "ckpt").iterdir())


def finite(ckpt):
    return all(torch.isfinite(v).all() for v in load_file(ckpt / "model.safetensors").values())


# -----------------------------------------------------------------------------
# a step that goes non-finite


@pytest.mark.parametrize("script", ["sft", "redi"])
def test_a_non_finite_step_is_neither_logged_nor_saved(script, tiny_model, sft_data, tmp_path):
    """LR 1e6, a checkpoint every step: within a few steps the gradients are NaN while the loss is still finite, and
    the update makes the weights NaN. The run stops at that step, before logging or saving it: every checkpoint is
    finite, and the message names the newest."""
    out = tmp_path / "out"
    if script == "sft":
        proc = train_sft(tiny_model, sft_data, out, "--lr", 1e6, "--save-every", 1, check=False)
    else:
        pairs = write_jsonl(tmp_path / "pref.jsonl", pref_rows(24))
        proc = train_redi(tiny_model, pairs, out, "--lr", 1e6, "--epochs", 4, "--save-every", 1, check=False)
    found = re.search(r"error: the (loss|gradient norm|update norm) is (nan|inf|-inf) at step (\d+); stopped before "
                      r"this step is logged or saved \(latest checkpoint, finite: (\S+)\)", proc.stdout)
    assert proc.returncode == 2 and found, proc.stdout[-2000:]
    step = int(found[3])
    assert step >= 2 and found[4] == str(out / f"ckpt/step_{step - 1:06d}")
    assert checkpoints(out) == [f"step_{s:06d}" for s in range(1, step)]
    assert all(finite(out / "ckpt" / name) for name in checkpoints(out))
    logged = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, step))
    assert all(math.isfinite(r[k]) for r in logged for k in ("loss", "grad_norm", "update_norm"))


def test_a_checkpoint_of_non_finite_weights_is_refused(tiny_model, tmp_path, capsys):
    """The second line of defence: save_checkpoint itself writes no checkpoint whose weights are not finite."""
    common.init_dist()
    try:
        lm = common.load_model(str(tiny_model))
        with torch.no_grad():
            lm.model.layers[1].mlp.up_proj.weight[3, 5] = math.inf
        model = common.shard_model(lm, torch.device("cpu"))
        optimizer = common.make_optimizer(model, 1e-3, 0.0)
        message = error(capsys, common.save_checkpoint, model, optimizer, AutoTokenizer.from_pretrained(tiny_model),
                        Namespace(), tmp_path, 7)
    finally:
        common.cleanup()
    assert message.startswith(f"not writing checkpoint {tmp_path / 'ckpt/step_000007'}: 1 tensors hold non-finite "
                              "values (model.layers.1.mlp.up_proj.weight first)")
    assert not any((tmp_path / "ckpt").glob("step_*"))


def test_metrics_are_strict_json(tmp_path):
    """A number that is not finite is written as null: NaN and Infinity are not JSON, and strict readers refuse them."""
    common.Metrics(tmp_path).log({"step": 1, "loss": 0.5, "margin": math.nan, "tokens_per_s": math.inf})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse) == \
        {"step": 1, "loss": 0.5, "margin": None, "tokens_per_s": None}


# -----------------------------------------------------------------------------
# the run folder: reruns, resumes, checkpoints kept


def test_a_run_folder_continues_only_with_resume_and_its_settings(tiny_model, sft_data, tmp_path):
    out = tmp_path / "run"
    train_sft(tiny_model, sft_data, out, "--stop-at-step", 2)
    config, history = (out / "config.json").read_text(), (out / "metrics.jsonl").read_text()
    # a rerun without --resume would cut metrics.jsonl and leave the checkpoints for a later --resume to jump to
    proc = train_sft(tiny_model, sft_data, out, check=False)
    assert proc.returncode == 2 and proc.stdout.strip().splitlines()[-1] == \
        f"error: --out '{out}' holds a run (2 logged steps, checkpoints up to step_000002); add --resume to continue " \
        "it, or use a new --out"
    # settings that define the numbers: stopped before the data is read
    proc = train_sft(tiny_model, sft_data, out, "--resume", "--epochs", 3, "--lr", 2e-3, "--seed", 1,
                     "--no-append-eos", check=False)
    assert proc.returncode == 2 and "data:" not in proc.stdout
    assert f"error: --resume: the run in '{out}' was made with other settings: --no-append-eos (the run ran without " \
           "it); --lr 0.002 (the run has 0.001); --epochs 3 (the run has 1); --seed 1 (the run has 0); they define " \
           "its numbers (a longer schedule cannot extend a run either" in proc.stdout
    assert (out / "config.json").read_text() == config and (out / "metrics.jsonl").read_text() == history
    # settings that do not may differ
    train_sft(tiny_model, sft_data, out, "--resume", "--micro-batch-size", 4, "--save-every", 1)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # a finished run whose final link is gone: --resume makes it again
    (out / "final").unlink()
    proc = train_sft(tiny_model, sft_data, out, "--resume")
    assert f"the run is complete: {out}/final -> {out / 'ckpt/step_000005'}" in proc.stdout
    assert (out / "final").resolve() == (out / "ckpt/step_000005").resolve()
    assert len(read_jsonl(out / "metrics.jsonl")) == 5
    # the weights and optimiser state are as readable as the other files (safetensors writes 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("model.safetensors", "train_state.pt", "config.json"):
        assert (out / "ckpt/step_000005" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_redi_resumes_only_with_its_objective_and_hyperparameters(tiny_model, tmp_path):
    pairs, out = write_jsonl(tmp_path / "pref.jsonl", pref_rows(24)), tmp_path / "run"
    train_redi(tiny_model, pairs, out, "--stop-at-step", 1)
    proc = train_redi(tiny_model, pairs, out, "--resume", "--alpha", 0.5, check=False)
    assert proc.returncode == 2 and "--alpha 0.5 (the run has 0.8)" in proc.stdout
    proc = train_redi(tiny_model, pairs, out, "--resume", "--loss", "simpo", check=False)
    assert proc.returncode == 2 and "--loss simpo (the run has redi)" in proc.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_keep_last_spares_the_linked_checkpoints(tiny_model, sft_data, tmp_path):
    """--keep-last 2 with a checkpoint every step: the two newest stay, and the ones OUT/final and OUT/best link to."""
    out = tmp_path / "run"
    train_sft(tiny_model, sft_data, out, "--save-every", 1, "--stop-at-step", 2)
    assert checkpoints(out) == ["step_000001", "step_000002"]  # keep all by default
    (out / "best").symlink_to("ckpt/step_000001")  # as report.py links a run's best evaluated checkpoint
    train_sft(tiny_model, sft_data, out, "--resume", "--save-every", 1, "--keep-last", 2)
    assert checkpoints(out) == ["step_000001", "step_000004", "step_000005"]
    assert (out / "final").resolve().name == "step_000005"


# -----------------------------------------------------------------------------
# bad flags and damaged files: one sentence, exit 2, before any work


BASE = ["--model", "m", "--data", "d", "--out", "o"]


@pytest.mark.parametrize("script,flag,value", [
    (sft, "--micro-batch-size", "0"), (sft, "--batch-size", "-16"), (sft, "--epochs", "0"), (sft, "--lr", "-1e-5"),
    (sft, "--lr", "nan"), (sft, "--weight-decay", "-0.1"), (sft, "--warmup-frac", "1"), (sft, "--max-grad-norm", "0"),
    (sft, "--seed", "-1"), (sft, "--save-every", "0"), (sft, "--stop-at-step", "0"), (sft, "--keep-last", "0"),
    (sft, "--logprob-chunk", "0"), (sft, "--max-length", "0"), (sft, "--max-position-embeddings", "0"),
    (sft, "--rope-theta", "-1"), (redi, "--epochs", "1.5"), (redi, "--max-prompt-length", "0"),
    (redi, "--max-response-length", "-5"), (redi, "--collapse-drop", "-1"), (redi, "--collapse-surge", "0"),
])
def test_bad_numbers_stop_in_argparse(script, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        script.parser.parse_args(BASE + [f"{flag}={value}"])  # "=": argparse takes "-1e-5" alone for a flag
    assert stop.value.code == 2
    assert f"error: argument {flag}: expected " in capsys.readouterr().err


@pytest.mark.parametrize("flags,expected", [
    (["--alpha", "1.5"], "--alpha 1.5: expected a number in [0, 1]"),
    (["--alpha", "-0.1"], "--alpha -0.1: expected a number in [0, 1]"),
    (["--loss", "dpo", "--beta", "nan"], "--beta nan: expected a finite number"),
    (["--loss", "simpo", "--gamma", "inf"], "--gamma inf: expected a finite number"),
])
def test_bad_hyperparameters_stop(flags, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        redi.resolve_objective(redi.parser.parse_args(BASE + flags))
    assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_edge_values_that_are_fine_pass():
    args = sft.parser.parse_args(BASE + ["--lr", "0", "--warmup-frac", "0", "--seed", "0", "--weight-decay", "0"])
    assert (args.lr, args.warmup_frac, args.seed, args.weight_decay) == (0, 0, 0, 0)
    for alpha in ("0", "1"):
        args = redi.parser.parse_args(BASE + ["--alpha", alpha])
        redi.resolve_objective(args)
        assert args.alpha == float(alpha)


@pytest.mark.parametrize("flag,value", [("--seed", "-2"), ("--max-prompt-tokens", "0"),
                                        ("--max-response-tokens", "-1")])
def test_prepare_bad_numbers_stop_in_argparse(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(data, "prepare", "--input", "raw.jsonl", "--out", "o", f"{flag}={value}")()
    assert stop.value.code == 2 and f"error: argument {flag}: expected " in capsys.readouterr().err


def test_a_damaged_model_file_is_one_sentence(tiny_model, tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    for f in tiny_model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:len(weights) // 3])  # a download or copy cut short
    assert error(capsys, common.load_model, str(bad)).startswith(
        f"--model '{bad}': could not load the weights (SafetensorError: ")


def test_resume_skips_a_damaged_checkpoint(tiny_model, sft_data, tmp_path):
    """The newest checkpoint's weights and the older one's train_state.pt cut short: none usable, one sentence. With
    the older one mended, --resume starts after it (with a note naming the newest) and computes step 2 again."""
    out = tmp_path / "run"
    train_sft(tiny_model, sft_data, out, "--save-every", 1, "--stop-at-step", 2)
    before = losses(out)
    newest, older = out / "ckpt/step_000002", out / "ckpt/step_000001"
    weights, state = (newest / "model.safetensors").read_bytes(), (older / "train_state.pt").read_bytes()
    (newest / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (older / "train_state.pt").write_bytes(state[:len(state) // 2])
    proc = train_sft(tiny_model, sft_data, out, "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"note: --resume skips {newest}: its model.safetensors cannot be read" in proc.stdout
    assert f"note: --resume skips {older}: its train_state.pt cannot be read" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == \
        f"error: --resume: none of the 2 checkpoints in {out / 'ckpt'} can be read (see the notes above); start " \
        "again in a new --out"
    (older / "train_state.pt").write_bytes(state)
    proc = train_sft(tiny_model, sft_data, out, "--resume")
    assert f"skips {newest}" in proc.stdout and f"resuming after step 1 of 5 from {older}" in proc.stdout
    after = losses(out)
    assert [s for s, _, _ in after] == [1, 2, 3, 4, 5]
    assert [x for r in after[:2] for x in r] == pytest.approx([x for r in before for x in r], abs=1e-6)


def test_a_damaged_reference_cache_is_recomputed(tiny_model, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "ref.pt"
    cache.write_bytes(b"PK\x03\x04 and then nothing")  # a zip cut short
    args = redi.parser.parse_args(["--model", str(tiny_model), "--data", str(write_jsonl(tmp_path / "p.jsonl", [])),
                                   "--out", "o", "--loss", "dpo", "--ref-cache", str(cache)])
    computed = torch.arange(8, dtype=torch.float64).view(4, 2)
    monkeypatch.setattr(redi, "reference_logps", lambda *a: computed)
    common.init_dist()
    try:
        ref = redi.load_or_compute_reference(None, [None] * 4, args, torch.device("cpu"))
    finally:
        common.cleanup()
    assert f"note: reference log-probs: {cache} cannot be read (" in capsys.readouterr().out
    assert torch.equal(ref, computed) and torch.equal(torch.load(cache), computed)


@pytest.mark.parametrize("case", ["under a file", "ckpt is a file", "read-only"])
def test_an_unwritable_out_stops_before_any_work(case, tiny_model, sft_data, tmp_path, capsys):
    if case == "under a file":
        out, expected = sft_data / "run", f"--out '{sft_data / 'run'}' is under '{sft_data}', which is a file"
    elif case == "ckpt is a file":  # the first checkpoint would fail, after --save-every steps
        out = tmp_path / "run"
        out.mkdir()
        (out / "ckpt").write_text("")
        expected = f"--out '{out}' holds a file named 'ckpt'; expected a folder of checkpoints there"
    else:  # sysfs refuses new entries even to root, for whom permission bits do not stop writes
        out, expected = "/sys/redi_test_run", "--out '/sys/redi_test_run': '/sys/redi_test_run' cannot be written ("
        if os.path.isdir("/sys/kernel") is False:
            pytest.skip("no sysfs here to stand for a read-only place")
    with pytest.raises(SystemExit) as stop:
        main(sft, "--model", tiny_model, "--data", sft_data, "--out", out, "--batch-size", 8)()
    printed = capsys.readouterr().out
    assert stop.value.code == 2 and printed.startswith("error: " + expected) and len(printed.splitlines()) == 1


# -----------------------------------------------------------------------------
# huge rows are cut before they are tokenised


class Counting:
    """A tokenizer that notes the longest text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_response_is_cut_before_tokenising(qwen_tokenizer, tmp_path):
    """A 2 MB response on the real Qwen2.5 tokenizer, whose longest token is 128 characters (a run of spaces): most
    of the response is one run of spaces, which tokenises to 128 characters a token, so the kept tokens reach within
    CUT_MARGIN tokens of the cut. They are the uncut response's, and no text near the response's size is tokenised."""
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    assert data.max_token_chars(tok) == 128
    chosen = "<think>\nAdd the units first: 7 + 5 = 12, carry 1." + " " * 2_000_000 + "\n</think>\n\\boxed{42}"
    rows = [{"problem": "What is 17 + 25?", "chosen": chosen, "rejected": "<think>\nIt is 32.\n</think>\n\\boxed{32}"}]
    counting = Counting(tok)
    [(prompt, y_w, y_l)] = redi.load_pairs(write_jsonl(tmp_path / "pref.jsonl", rows), counting, 800, 1000)
    assert counting.longest < 200_000  # the cut: (1000 + 64) x 128 characters, and the template around it
    [(ids, n_prompt)] = data.encode_chats(tok, [rows[0]["problem"]], [chosen])  # the whole response
    assert len(ids) - n_prompt > 15_000
    assert prompt == ids[:n_prompt] and y_w == ids[n_prompt:n_prompt + 1000]
    assert sum(len(tok.decode([t])) for t in y_w) > (1000 - 40) * 128  # the kept tokens reach close to the cut


def test_sft_cuts_a_huge_response_before_tokenising(qwen_tokenizer, tmp_path):
    """sft.py keeps each sequence's first --max-length tokens: the same 2 MB response is cut to (1000 + 64) x 128
    characters before tokenising, and the kept ids are the first 1,000 of the whole conversation's."""
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    response = "<think>\nAdd the units first: 7 + 5 = 12, carry 1." + " " * 2_000_000 + "\n</think>\n\\boxed{42}"
    rows = [{"problem": "What is 17 + 25?", "response": response}]
    counting = Counting(tok)
    [(ids, n_prompt, n_trained)] = sft.load_sft_examples(write_jsonl(tmp_path / "sft.jsonl", rows), counting, 1000)
    assert counting.longest < 200_000
    [(whole, whole_prompt)] = data.encode_chats(tok, [rows[0]["problem"]], [response])
    assert len(whole) > 15_000 and (ids, n_prompt) == (whole[:1000], whole_prompt)
    assert n_trained == 1000 - n_prompt  # cut before its EOS: every kept response token is trained


def test_prepare_drops_a_huge_pair_without_tokenising_it(tiny_model, tmp_path, monkeypatch):
    huge = "<think>\n" + "y" * 2_000_000 + "\n</think>\n\\boxed{2}"
    src = write_jsonl(tmp_path / "raw.jsonl", [raw(0, [RIGHT, WRONG], [True, False], [True, True]),
                                               raw(1, [RIGHT, huge], [True, False], [True, True])])
    tokenizers = []
    real = common.load_tokenizer
    monkeypatch.setattr(common, "load_tokenizer", lambda *a: tokenizers.append(Counting(real(*a))) or tokenizers[-1])
    main(data, "prepare", "--input", src, "--tokenizer", tiny_model, "--out", tmp_path / "out")()
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats["sft_kept"] == 2 and stats["pref_kept"] == 1 and stats["pref_dropped"]["response_too_long"] == 1
    assert tokenizers[0].longest < 10_000


# -----------------------------------------------------------------------------
# a failed prepare


def test_a_failed_prepare_writes_nothing_and_names_the_first_bad_row(tiny_model, tmp_path, capsys):
    good = raw(0, [RIGHT, WRONG], [True, False], [True, True])
    src, out = tmp_path / "raw.jsonl", tmp_path / "out"
    # every row malformed: the error says so, and names the first row (by line, whatever the shuffled order) and field
    write_jsonl(src, [{**good, "generations": RIGHT}, {**good, "correctness": {"llama_verification": [True, False]}}])
    assert error(capsys, main(data, "prepare", "--input", src, "--tokenizer", tiny_model, "--out", out)) == \
        f"every row of --input '{src}' is malformed, so nothing was kept; the first: {src}, line 1 has 'generations' " \
        f"= {json.dumps(RIGHT)[:40]}, not a list"
    assert sorted(p.name for p in out.iterdir()) == []  # no sft.jsonl for run.sh to take for a finished prepare
    # no correct generation, and a malformed row: the note names it
    write_jsonl(src, [raw(0, [WRONG], [False], [False]), {**good, "generations": [RIGHT, 7]}])
    assert error(capsys, main(data, "prepare", "--input", src, "--tokenizer", tiny_model, "--out", out)) == \
        "no problem had a correct generation: nothing kept (see the reasons above)"
    assert sorted(p.name for p in out.iterdir()) == []
    # a prepare that succeeds says which row it skipped first
    src.write_text("".join(json.dumps(r) + "\n" for r in [good, good]) + "{not json\n" +
                   json.dumps({**good, "source": None}) + "\n")
    main(data, "prepare", "--input", src, "--tokenizer", tiny_model, "--out", out)()
    assert f"note: 2 rows skipped as malformed; the first: {src}, line 3 is not JSON" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["pref.jsonl", "sft.jsonl", "stats.json"]


# -----------------------------------------------------------------------------
# stopping: SIGTERM (preemption) and Ctrl-C


def start(*args, nproc=1):
    """A script started as conftest.run_script starts it, not waited for."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(launcher + [str(a) for a in args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=300):
    """Until metrics.jsonl holds n steps; the run must still be going."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


LONG = ("--epochs", 12, "--save-every", 1000)  # 60 steps, no checkpoint before the end


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tiny_model, sft_data, tmp_path):
    train_sft(tiny_model, sft_data, tmp_path / "full", *LONG)
    out = tmp_path / "cut"
    proc = start("sft.py", "--model", tiny_model, "--data", sft_data, "--out", out, "--batch-size", 8,
                 "--micro-batch-size", 2, "--epochs", 1, "--lr", 1e-3, *LONG)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    step = len(read_jsonl(out / "metrics.jsonl"))
    assert proc.returncode == 143 and "Traceback" not in stderr and step < 60
    assert f"stopped by SIGTERM after step {step} of 60, checkpoint {out / f'ckpt/step_{step:06d}'} saved" in stdout
    assert checkpoints(out) == [f"step_{step:06d}"]
    proc = train_sft(tiny_model, sft_data, out, "--resume", *LONG)
    assert f"resuming after step {step} of 60" in proc.stdout
    resumed, full = losses(out), losses(tmp_path / "full")
    assert [s for s, _, _ in resumed] == list(range(1, 61))
    assert [x for r in resumed for x in r] == pytest.approx([x for r in full for x in r], abs=1e-6)


def children(pid):
    """The processes whose parent is pid, by LOCAL_RANK (torchrun's workers)."""
    found = {}
    for stat in os.listdir("/proc"):
        try:
            if stat.isdigit() and int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(v.split("=", 1) for v in open(f"/proc/{stat}/environ").read().split("\0") if "=" in v)
                found[int(env.get("LOCAL_RANK", -1))] = int(stat)
        except OSError:  # gone meanwhile
            pass
    return found


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(tiny_model, sft_data, tmp_path):
    """A scheduler that signals rank 1 alone: the ranks agree (a MAX each step) and stop together, with a checkpoint."""
    out = tmp_path / "run"
    proc = start("sft.py", "--model", tiny_model, "--data", sft_data, "--out", out, "--batch-size", 8,
                 "--micro-batch-size", 2, "--lr", 1e-3, *LONG, nproc=2)
    wait_for_steps(proc, out, 2)
    os.kill(children(proc.pid)[1], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    step = len(read_jsonl(out / "metrics.jsonl"))
    assert f"stopped by SIGTERM after step {step} of 60" in stdout
    assert checkpoints(out) == [f"step_{step:06d}"]
    state = torch.load(out / f"ckpt/step_{step:06d}/train_state.pt", weights_only=False)
    assert state["step"] == step and len(state["rng"]) == 2  # both ranks were in it


def test_ctrl_c_stops_at_once_with_one_line(tiny_model, sft_data, tmp_path):
    out = tmp_path / "run"
    proc = start("sft.py", "--model", tiny_model, "--data", sft_data, "--out", out, "--batch-size", 8,
                 "--micro-batch-size", 2, "--lr", 1e-3, "--epochs", 12, "--save-every", 1)
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stdout.strip().splitlines()[-1]
    named = re.fullmatch(r"interrupted \(Ctrl-C\); latest checkpoint: (\S+), which the same command with --resume "
                         r"continues from", last)
    assert named and (ROOT / named[1]).is_dir() and (ROOT / named[1] / "train_state.pt").exists(), last
