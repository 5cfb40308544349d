"""Bad input files, script by script: each kind (not UTF-8, not JSON, not an object, a field missing or mistyped, a
folder where a file belongs and the reverse, nothing in it) stops with one sentence that names the file and its
1-based line, exit 2. The readers are called in-process (a launch costs seconds of imports); one launch per script
family checks that a user sees no traceback. Rows that the paper's rules skip are still skipped and counted."""
import json
import os
from types import SimpleNamespace

import pytest
from conftest import error, main, run_script, write_jsonl

import data
import demo
import eval as ev
import report as rp

GOOD_SFT = b'{"problem": "p", "response": "r"}\n'
NOT_UTF8 = b'{"problem": "\xff\xfe"}\n'  # bytes no UTF-8 text has


# -----------------------------------------------------------------------------
# sft.py and redi.py --data: a file `data.py prepare` wrote, so every bad line is fatal


@pytest.mark.parametrize("content,expected", [
    (GOOD_SFT + NOT_UTF8, "line 2 is not UTF-8 text (byte 14 of the line)"),
    (GOOD_SFT + b"\n{not json\n", "line 3 is not JSON (Expecting property name enclosed in double quotes, column 2)"),
    (b'["p", "r"]\n', "line 1 is an array, not an object"),
    (GOOD_SFT + b'{"problem": "p"}\n', "line 2 lacks the field 'response' (a string)"),
    (b'{"problem": "p", "response": 5}\n', "line 1 has 'response' = 5, not a string"),
    (b"\n \n", "holds no rows"),
], ids=["not UTF-8", "not JSON", "not an object", "field missing", "field mistyped", "no rows"])
def test_prepared_data_errors_name_the_line(capsys, tmp_path, content, expected):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(content)
    message = error(capsys, data.read_jsonl, path, ["problem", "response"])
    assert expected in message and str(path) in message


def test_prepared_data_that_is_a_folder_or_missing(capsys, tmp_path):
    assert "is a folder; expected a jsonl file" in error(capsys, data.read_jsonl, tmp_path, ["problem"])
    assert "does not exist; expected a jsonl file" in error(capsys, data.read_jsonl, tmp_path / "no.jsonl", ["problem"])
    assert data.read_jsonl(write_jsonl(tmp_path / "ok.jsonl", [{"problem": "p", "x": 1}]), ["problem"]) == \
        [{"problem": "p", "x": 1}]


def test_redi_user_sees_one_sentence(tiny_model, tmp_path):
    bad = tmp_path / "pref.jsonl"
    bad.write_bytes(b'{"problem": "p", "chosen": "a", "rejected": "b"}\n{"problem": "p", "chosen": "a"}\n')
    proc = run_script("redi.py", "--model", tiny_model, "--data", bad, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == \
        f"error: {bad}, line 2 lacks the field 'rejected' (a string); expected a jsonl file written by " \
        "`data.py prepare` (string fields problem, chosen, rejected)"


# -----------------------------------------------------------------------------
# data.py prepare --input: the file as a whole is checked on its first row; a later bad row is skipped and counted


def prepare_args(src, tok, out):
    return ["prepare", "--input", src, "--tokenizer", tok, "--out", out]


@pytest.mark.parametrize("content,expected", [
    (bytes(range(128, 256)) * 4, "line 1 is not UTF-8 text"),  # binary junk, as in the issue
    (b"\n\nhello\n" + GOOD_SFT, "line 3 is not JSON (Expecting value, column 1)"),  # blank lines are counted
    (b'[{"problem": "p"}]\n', "line 1 is an array, not an object"),  # one JSON array: not JSON lines
    (b'{"problem": "p", "source": "s"}\n' * 3, "is not in the OpenR1-Math-Raw schema: no row on lines 1-3 has "
                                               "['generations', 'correctness', 'problem_is_valid']"),
    (b"", "has no rows"),
], ids=["not UTF-8", "not JSON", "one JSON array", "not the schema", "no rows"])
def test_prepare_input_errors(capsys, tiny_model, tmp_path, content, expected):
    src = tmp_path / "raw.jsonl"
    src.write_bytes(content)
    message = error(capsys, main(data, *prepare_args(src, tiny_model, tmp_path / "out")))
    assert expected in message and str(src) in message
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_prepare_paths_of_the_wrong_kind(capsys, tiny_model, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"problem": "p"}])
    (tmp_path / "empty").mkdir()
    empty, out = tmp_path / "empty", tmp_path / "out"
    cases = [(tmp_path / "no.jsonl", tiny_model, out, f"--input '{tmp_path / 'no.jsonl'}' does not exist"),
             (empty, tiny_model, out, f"--input '{empty}' is a folder that `datasets` cannot load"),
             (raw, raw, out, f"--tokenizer '{raw}' is a file; expected a model folder"),
             (raw, empty, out, f"--tokenizer '{empty}' is a folder with no tokenizer.json or tokenizer_config.json"),
             (raw, tiny_model, raw, f"--out '{raw}' is a file; expected a folder")]
    for src, tok, out, expected in cases:
        assert expected in error(capsys, main(data, *prepare_args(src, tok, out)))


def test_prepare_skips_and_counts_bad_rows_after_the_first(capsys, tiny_model, tmp_path):
    good = {"problem": "What is 1+1?", "answer": "2", "source": "s", "problem_is_valid": "Yes",
            "generations": ["<think>\nok\n</think>\n\\boxed{2}"],
            "correctness": {"llama_verification": [True], "math_verify_reparsed_answer": [True]}}
    src = tmp_path / "raw.jsonl"
    src.write_bytes(json.dumps(good).encode() + b"\n{not json\n" + NOT_UTF8 + b"[1, 2]\n\n" +
                    json.dumps({**good, "problem": 7}).encode() + b"\n")
    main(data, *prepare_args(src, tiny_model, tmp_path / "out"), "--seed", -1)()
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats["rows_read"] == 5 and stats["sft_kept"] == 1
    assert stats["rows_dropped"] == {"bad_json": 3, "mistyped_field": 1}


# -----------------------------------------------------------------------------
# eval.py --data and --model


def problems_args(*paths):
    return SimpleNamespace(data=[str(p) for p in paths], benchmark=None, problem_field="problem", answer_field="answer",
                           id_field="id", limit=None)


@pytest.mark.parametrize("content,expected", [
    (b'{"problem": "p", "answer": 1}\n' + NOT_UTF8, "line 2 is not UTF-8 text"),
    (b'{"problem": "p", "answer": 1}\n\n{"problem": "q",\n', "line 3 is not JSON"),
    (b'"What is 1+1?"\n', "line 1 is a string, not an object"),
    (b'{"problem": "p", "answer": 1}\n{"question": "q", "answer": 2}\n',
     "line 2 lacks the field 'problem' (a string); point --problem-field and --answer-field at the fields"),
    (b'{"problem": "p", "answer": null}\n', "line 1 has 'answer' = null, not a string, number or list of them"),
], ids=["not UTF-8", "not JSON", "not an object", "field missing", "field mistyped"])
def test_eval_problem_file_errors(capsys, tmp_path, content, expected):
    path = tmp_path / "toy.jsonl"
    path.write_bytes(content)
    message = error(capsys, ev.load_problems, problems_args(path))
    assert expected in message and str(path) in message


def test_eval_problem_paths_and_parquet_rows(capsys, tmp_path):
    import datasets
    assert "--data '{}' is a folder".format(tmp_path) in error(capsys, ev.load_problems, problems_args(tmp_path))
    datasets.Dataset.from_list([{"problem": "p", "answer": "1"}, {"problem": None, "answer": "2"}]).to_parquet(
        tmp_path / "toy.parquet")
    assert error(capsys, ev.load_problems, problems_args(tmp_path / "toy.parquet")).startswith(
        f"{tmp_path / 'toy.parquet'}, row 2 has 'problem' = null, not a string")
    rows = [{"problem": "p", "answer": 0.5, "id": 3}, {"problem": "q", "answer": ["$1$", " 2\n"]}]
    assert ev.load_problems(problems_args(write_jsonl(tmp_path / "ok.jsonl", rows))) == {"ok": [
        {"id": "3", "problem": "p", "gold": ["0.5"]}, {"id": "1", "problem": "q", "gold": ["$1$", "2"]}]}


@pytest.mark.parametrize("content,expected", [
    ('[{"problem": "p", "answer": "1"}, {"problem": "q"}]', "row 2 lacks the field 'answer'"),
    ('[{"problem": "p", "answer": []}]', "row 1 has 'answer' = [], not a non-empty list of strings or numbers"),
    ('[{"problem": "p", "answer": ["1", null]}]', "row 1 has 'answer' = [\"1\", null], not a non-empty list"),
    ('[{"problem": "p", "answer": "1"},\n{"problem": "q", "answer": "2"]', "line 2 is not JSON"),
    ('[]', "holds no problems"),
], ids=["field missing", "empty list", "null alternative", "not JSON", "empty"])
def test_eval_json_array_errors(capsys, tmp_path, content, expected):
    """The authors' answer files are one JSON array each: a bad row is named by its number, from 1."""
    path = tmp_path / "minerva.json"
    path.write_text(content)
    message = error(capsys, ev.load_problems, problems_args(path))
    assert expected in message and str(path) in message


def test_eval_two_files_of_one_name(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    one = write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "answer": "1"}])
    two = write_jsonl(tmp_path / "a/math.jsonl", [{"problem": "q", "answer": "2"}])
    assert "are both named 'math'" in error(capsys, ev.load_problems, problems_args(one, two))


def test_eval_model_that_is_a_file_or_an_empty_folder(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text("{}")
    (tmp_path / "toy.jsonl").touch()
    for model, expected in [(tmp_path / "toy.jsonl", "is a file; expected a model folder"),
                            (tmp_path, "is a folder with no config.json"),
                            (tmp_path / "model", "is a folder with no tokenizer.json or tokenizer_config.json")]:
        assert f"--model '{model}' {expected}" in error(capsys, main(ev, "--model", model, "--out", tmp_path / "o"))
    assert "--out '{}' is a file".format(tmp_path / "toy.jsonl") in \
        error(capsys, ev.check_out_folder, SimpleNamespace(out=str(tmp_path / "toy.jsonl")))
    under = tmp_path / "toy.jsonl" / "runs" / "eval"  # checked before the model loads, not when mkdir fails after
    assert "--out '{}' is under '{}', which is a file".format(under, tmp_path / "toy.jsonl") in \
        error(capsys, ev.check_out_folder, SimpleNamespace(out=str(under)))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        locked = SimpleNamespace(out=str(tmp_path / "locked/o"))
        assert "cannot be written" in error(capsys, ev.check_out_folder, locked)


# -----------------------------------------------------------------------------
# eval.py score RESULTS: the minimum fields are enough; a last line cut short by a crash is skipped


MINIMUM = ("benchmark", "problem_id", "sample", "response", "answer", "correct", "num_tokens", "finish_reason")


def results(n_problems=2, n_samples=2):
    """Lines as eval.py writes them now; problem k's sample j is right when j < k."""
    return [{"benchmark": "toy", "problem_id": f"q{k}", "sample": j,
             "response": f"<think>\nWait\n</think>\\boxed{{{k}}}", "answer": str(k), "gold": str(k), "correct": j < k,
             "grade_timeout": False, "num_tokens": 10 + j, "finish_reason": "stop"}
            for k in range(n_problems) for j in range(n_samples)]


def test_score_reads_a_file_with_only_the_minimum_fields(capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "min").mkdir()
    full = write_jsonl(tmp_path / "full/results.jsonl", results())
    minimum = write_jsonl(tmp_path / "min/results.jsonl", [{k: r[k] for k in MINIMUM} for r in results()])
    main(ev, "score", full)()
    main(ev, "score", minimum)()
    summary = json.loads((tmp_path / "min/summary.json").read_text())
    assert summary == json.loads((tmp_path / "full/summary.json").read_text())
    assert summary["toy"]["pass@1"] == 0.25 and summary["toy"]["timeouts"] == 0  # 1 right of 4; absent = no timeout


def test_score_skips_a_last_line_cut_by_a_crash(capsys, tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in results())
    path = tmp_path / "results.jsonl"
    path.write_text(text[:-30])  # the last line cut short, as a crash mid-write leaves it
    main(ev, "score", path)()
    out = capsys.readouterr().out
    assert f"note: {path}, line 4, the last, is cut short (as a crash mid-write leaves it); skipped" in out
    assert json.loads((tmp_path / "summary.json").read_text())["toy"]["n_samples"] == 1  # problem q1 lost sample 1


def bad_results(kind):
    lines = [json.dumps(r).encode() + b"\n" for r in results()]
    r = results()[1]
    if kind == "not UTF-8":
        lines[1] = NOT_UTF8
    elif kind == "not JSON":
        lines[1] = lines[1][:30] + b"\n"  # cut, but not the last line: the file is damaged
    elif kind == "last line not JSON, with its newline":
        lines[3] = lines[3][:30] + b"\n"  # a crash leaves no newline; this one was edited
    elif kind == "missing":
        lines[1] = json.dumps({k: v for k, v in r.items() if k != "num_tokens"}).encode() + b"\n"
    elif kind == "mistyped":
        lines[1] = json.dumps({**r, "correct": "yes"}).encode() + b"\n"
    elif kind == "optional mistyped":
        lines[1] = json.dumps({**r, "grade_timeout": "no"}).encode() + b"\n"
    return b"".join(lines)


@pytest.mark.parametrize("kind,expected", [
    ("not UTF-8", "line 2 is not UTF-8 text"), ("not JSON", "line 2 is not JSON"),
    ("last line not JSON, with its newline", "line 4 is not JSON"),
    ("missing", "line 2 lacks the field 'num_tokens' (an integer)"),
    ("mistyped", "line 2 has 'correct' = \"yes\", not true or false"),
    ("optional mistyped", "line 2 has 'grade_timeout' = \"no\", not true or false"),
], ids=["not UTF-8", "not JSON", "last line damaged", "field missing", "field mistyped", "optional field mistyped"])
def test_score_errors_name_the_line(capsys, tmp_path, kind, expected):
    path = tmp_path / "results.jsonl"
    path.write_bytes(bad_results(kind))
    message = error(capsys, main(ev, "score", path))
    assert message.startswith(f"{path}, {expected}")
    assert not (tmp_path / "summary.json").exists()


def test_score_stops_on_a_sample_seen_twice(capsys, tmp_path):
    """Two runs' results concatenated: one line of each pair would count, silently; score names both instead."""
    path = write_jsonl(tmp_path / "results.jsonl", results() + results())
    message = error(capsys, main(ev, "score", path))
    assert message.startswith(f"{path}, lines 1 and 5 both hold sample 0 of toy problem 'q0'")
    assert not (tmp_path / "summary.json").exists()


def test_score_of_a_folder_or_nothing(capsys, tmp_path):
    assert "results file '{}' is a folder".format(tmp_path) in error(capsys, main(ev, "score", tmp_path))
    assert "holds no results" in error(capsys, main(ev, "score", write_jsonl(tmp_path / "r.jsonl", [])))


# -----------------------------------------------------------------------------
# report.py RUN... (and eval.py report RUN...): summary.json, metrics.jsonl, config.json


@pytest.fixture
def run_folder(tmp_path):
    """An SFT run with one evaluated checkpoint and a stage-2 run that starts from it."""
    sft, stage2 = tmp_path / "sft", tmp_path / "redi"
    for run, step, records in [(sft, 4, results()), (stage2, 2, results(n_problems=4, n_samples=4))]:
        (run / f"ckpt/step_{step:06d}").mkdir(parents=True)
        (run / f"eval/step_{step:06d}").mkdir(parents=True)  # run.sh: RUN/eval/<the checkpoint's folder name>
        (run / f"eval/step_{step:06d}/summary.json").write_text(json.dumps(ev.summarize(records)))
    (stage2 / "config.json").write_text(json.dumps({"model": str(sft / "ckpt/step_000004")}))
    write_jsonl(stage2 / "metrics.jsonl", [{"step": s, "chosen_logps_per_token": -0.1 * s, "update_norm": 0.5,
                                            "rejected_logps_per_token": -0.2 * s} for s in (1, 2)])
    return stage2


def test_report_reads_what_the_scripts_write(capsys, run_folder, tmp_path):
    with (run_folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "chosen_lo')  # cut short by a crash
    rp.report(SimpleNamespace(runs=[str(tmp_path / "sft"), str(run_folder)], out=str(tmp_path / "report")))
    out = capsys.readouterr().out
    assert f"note: {run_folder / 'metrics.jsonl'}, line 3, the last, is cut short" in out
    report = json.loads((tmp_path / "report/report.json").read_text())[1]
    assert report["evals"]["0"][0] == 0.25 and report["evals"]["2"][0] == 0.375  # step 0 = the SFT checkpoint's
    assert "| -0.100 -> -0.200 |" in (tmp_path / "report/report.md").read_text()


@pytest.mark.parametrize("file,content,expected", [
    ("eval/step_000002/summary.json", '{\n  "toy": {\n    "pass@1": 0.5,,\n', "line 3 is not JSON"),
    ("eval/step_000002/summary.json", b'{"toy": "\xff"}', "line 1 is not UTF-8 text"),
    ("eval/step_000002/summary.json", '{"toy": {"pass@k": {"1": 0.5}}}', "its 'toy' entry lacks the field 'pass@1'"),
    ("eval/step_000002/summary.json", '{"a": {}, "b": {}}', "has no average entry"),
    ("eval/step_000002/summary.json", '{"toy": {"pass@1": 0.5, "pass@k": {"1": "0.5"}}}', "not an object of k: number"),
    ("metrics.jsonl", '{"step": 1, "chosen_logps_per_token": -1, "rejected_logps_per_token": -2, "update_norm": 1}\n'
                      '{"step": 2, "rejected_logps_per_token": -2, "update_norm": 1}\n',
     "line 2 lacks the field 'chosen_logps_per_token' (a number)"),
    ("metrics.jsonl", '{"step": "1"}\n', "line 1 has 'step' = \"1\", not an integer"),
    ("config.json", '{"model": 3}', "has 'model' = 3, not a string"),
    ("config.json", '{"model": "x"', "line 1 is not JSON"),
], ids=["summary not JSON", "summary not UTF-8", "summary field missing", "summary without average",
        "summary field mistyped", "metrics field missing", "metrics field mistyped", "config field mistyped",
        "config not JSON"])
def test_report_file_errors(capsys, run_folder, tmp_path, file, content, expected):
    path = run_folder / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = error(capsys, rp.report, SimpleNamespace(runs=[str(run_folder)], out=str(tmp_path / "report")))
    assert str(path) in message and expected in message


def test_report_paths_of_the_wrong_kind(capsys, run_folder, tmp_path):
    file = run_folder / "config.json"
    assert f"run '{file}' is not a folder" in error(capsys, rp.report, SimpleNamespace(runs=[str(file)], out="x"))
    assert f"--out '{file}' is a file" in \
        error(capsys, rp.report, SimpleNamespace(runs=[str(run_folder)], out=str(file)))


# -----------------------------------------------------------------------------
# demo.py


def test_demo_flags_that_cannot_work(capsys, tmp_path):
    file = write_jsonl(tmp_path / "f.jsonl", [])
    assert f"--out '{file}' is a file" in error(capsys, main(demo, "--out", file))
    assert "1-digit addends make fewer than 110 distinct problems" in \
        error(capsys, main(demo, "--out", tmp_path / "d", "--digits", 1, "--problems", 100, "--test-problems", 10))
