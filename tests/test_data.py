"""data.py: PAPER.md §1's selection rules on a fixture in the OpenR1-Math-Raw schema, bad input, the
prompt/response boundary with the real Qwen2.5 tokenizer, and the batching both stages share."""
import json

import numpy as np
import pytest
from conftest import read_jsonl, run_script, write_jsonl
from transformers import AutoTokenizer

import data

RIGHT, WRONG = "<think>\nok\n</think>\n\\boxed{1}", "<think>\nhmm\n</think>\n\\boxed{2}"


def raw(i, gens, judge, verify, reparsed=None, source="olympiads", valid="Yes", problem=None, **extra):
    row = {"problem": problem or f"Problem {i}?", "answer": "1", "source": source, "problem_is_valid": valid,
           "generations": gens, "correctness": {"llama_verification": judge, "math_verify_answer": verify,
                                                "math_verify_reparsed_answer": verify if reparsed is None else reparsed},
           "solution": "unused", "messages": []}
    row.update(extra)
    return row


PAIR_DROPS = ("no_incorrect", "prompt_too_long", "response_too_long")


def fixture_rows():
    """(row, expectation): one row per rule and per kind of bad input. Expectation: the drop reason, or
    (sft response, pref rejected or the reason in PAIR_DROPS it is not a pair)."""
    g = [f"<think>\ntrace {k}\n</think>\n\\boxed{{{k}}}" for k in range(4)]
    long_problem = "x" * 900  # byte-level tokenizer: > 800 prompt tokens
    long_trace = "<think>\n" + "y" * 19_500 + "\n</think>"  # > 19,000 response tokens
    return [
        (raw(0, g[:4], [False, True, True, False], [True, True, True, False]), (g[1], g[0])),
        (raw(1, g[:3], [True, True, True], [False, None, True]), (g[2], g[0])),  # null label = incorrect
        (raw(2, g[:2], [True, True], [True, True]), (g[0], "no_incorrect")),
        (raw(3, g[:2], [False, None], [True, True]), "no_correct"),
        (raw(4, g[:2], [True, False], [True, True], source="cn_k12"), "cn_k12"),
        (raw(5, g[:2], [True, False], [True, True], valid="No"), "invalid_problem"),
        (raw(6, g[:2], [True, False], [True, True], valid=" YES\n"), (g[0], g[1])),  # case/space-insensitive
        # Math-Verify columns disagree: the default (reparsed, authors' code) says wrong, the other right
        (raw(7, g[:2], [True, True], [True, True], reparsed=[False, True]), (g[1], g[0])),
        (raw(8, [g[0], long_trace], [True, False], [True, True]), (g[0], "response_too_long")),
        (raw(9, g[:2], [True, False], [True, True], problem=long_problem), (g[0], "prompt_too_long")),
        # bad input: skipped and counted, never a traceback
        ({k: v for k, v in raw(10, g[:2], [True, False], [True, True]).items() if k != "generations"}, "missing_field"),
        (raw(11, g[0], [True], [True]), "mistyped_field"),  # generations is a string
        (raw(12, g[:2], [True, "yes"], [True, True]), "mistyped_field"),
        (raw(13, g[:2], [True, False, True], [True, True]), "label_length_mismatch"),
        # an empty generation is judged by its labels like any other (the authors' rule), a null one is empty
        (raw(14, [g[0], ""], [True, False], [True, True]), (g[0], "")),
        (raw(15, g[:2], [True, False], [True, True], problem=" "), "empty_problem"),
        (raw(16, g[:2], [True, False], [True, True], source=None), "missing_field"),
        (raw(17, [" ", g[1]], [True, False], [True, True]), (" ", g[1])),
        (raw(18, [g[0], None, g[2]], [True, False, False], [True, True, True]), (g[0], "")),
        (raw(19, [], [], []), "no_generations"),
        (raw(20, [g[0], 7], [True, False], [True, True]), "mistyped_field"),
    ]


@pytest.fixture
def raw_file(tmp_path):
    rows = [r for r, _ in fixture_rows()]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    return path


def prepare(src, tok, out, *flags, check=True):
    return run_script("data.py", "prepare", "--input", src, "--tokenizer", tok, "--out", out, *flags, check=check)


def test_prepare_applies_every_rule(raw_file, tiny_model, tmp_path):
    proc = prepare(raw_file, tiny_model, tmp_path / "out")
    sft, pref = read_jsonl(tmp_path / "out/sft.jsonl"), read_jsonl(tmp_path / "out/pref.jsonl")
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    expected = dict(enumerate(e for _, e in fixture_rows()))
    want_drop, want_pair_drop = {}, {}
    for i, e in expected.items():
        if isinstance(e, str):
            want_drop[e] = want_drop.get(e, 0) + 1
        elif e[1] in PAIR_DROPS:
            want_pair_drop[e[1]] = want_pair_drop.get(e[1], 0) + 1
    want_drop["bad_json"] = 1
    assert stats["rows_read"] == len(expected) + 1
    assert stats["rows_dropped"] == want_drop
    assert {k: v for k, v in stats["pref_dropped"].items() if v} == want_pair_drop
    assert {r["id"]: r["response"] for r in sft} == {i: e[0] for i, e in expected.items() if isinstance(e, tuple)}
    assert {r["id"]: (r["chosen"], r["rejected"]) for r in pref} == \
        {i: e for i, e in expected.items() if isinstance(e, tuple) and e[1] not in PAIR_DROPS}
    for r in pref:  # the pair's chosen trace is the SFT trace of the same problem
        assert r["chosen"] == next(s["response"] for s in sft if s["id"] == r["id"])
        assert r["problem"] == fixture_rows()[r["id"]][0]["problem"]
    assert stats["sft_kept"] == len(sft) and stats["pref_kept"] == len(pref)
    assert "D_SFT kept" in proc.stdout and "dropped cn_k12" in proc.stdout


def test_paper_flags(raw_file, tiny_model, tmp_path):
    prepare(raw_file, tiny_model, tmp_path / "out", "--label", "answer", "--no-validity-filter")
    sft = {r["id"]: r["response"] for r in read_jsonl(tmp_path / "out/sft.jsonl")}
    g = [r for r, _ in fixture_rows()]
    assert sft[7] == g[7]["generations"][0]  # math_verify_answer says generation 0 is right
    assert 5 in sft  # problem_is_valid "No" kept without the filter


def test_order_is_datasets_shuffle_and_parquet_matches_jsonl(tiny_model, tmp_path):
    import datasets
    rows = [raw(i, [RIGHT, WRONG], [True, False], [True, True]) for i in range(50)]
    write_jsonl(tmp_path / "raw.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(tmp_path / "raw.parquet")
    prepare(tmp_path / "raw.jsonl", tiny_model, tmp_path / "a")
    prepare(tmp_path / "raw.parquet", tiny_model, tmp_path / "b")
    expected = [r["problem"] for r in ds.shuffle(seed=42)]
    assert [r["problem"] for r in read_jsonl(tmp_path / "a/sft.jsonl")] == expected
    assert (tmp_path / "a/sft.jsonl").read_text() == (tmp_path / "b/sft.jsonl").read_text()
    assert (tmp_path / "a/pref.jsonl").read_text() == (tmp_path / "b/pref.jsonl").read_text()


def test_wrong_schema_is_one_clear_error(tiny_model, tmp_path):
    rows = [{"problem": "p", "answer": "1", "source": "s", "problem_is_valid": "Yes", "correctness": {}}]
    proc = prepare(write_jsonl(tmp_path / "raw.jsonl", rows), tiny_model, tmp_path / "out", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no row on lines 1-1 has ['generations']" in proc.stdout


def test_keeping_nothing_fails(tiny_model, tmp_path):
    rows = [raw(i, [WRONG], [False], [False]) for i in range(3)]
    proc = prepare(write_jsonl(tmp_path / "raw.jsonl", rows), tiny_model, tmp_path / "out", check=False)
    assert proc.returncode != 0 and "nothing kept" in proc.stdout and "dropped no_correct" in proc.stdout


# -----------------------------------------------------------------------------
# the prompt/response boundary, with the real Qwen2.5 tokenizer


def test_qwen_boundary(qwen_tokenizer):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    data.check_chat_template(tok)
    problem, response = "Find $x$ if $2x = 4$.", "<think>\nDivide by two.\n</think>\n\n$x = \\boxed{2}$"
    [(ids, n_prompt)] = data.encode_chats(tok, [problem], [response])
    assert tok.decode(ids[:n_prompt]) == (
        f"<|im_start|>system\n{data.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
        "<|im_start|>assistant\n")
    # |y| counts the response, the closing <|im_end|> and newline, and the EOS the authors' trainers append
    assert tok.decode(ids[n_prompt:]) == response + "<|im_end|>\n<|endoftext|>"
    assert ids[n_prompt:][-3:] == [151645, 198, 151643]  # <|im_end|>, "\n", <|endoftext|> (this tokenizer's EOS)
    assert ids[:2] == [151644, 8948]  # <|im_start|>, "system"
    [(ids_no_eos, n_prompt_no_eos)] = data.encode_chats(tok, [problem], [response], append_eos=False)
    assert (ids_no_eos, n_prompt_no_eos) == (ids[:-1], n_prompt)
    assert tok.decode(ids_no_eos[n_prompt:]) == response + "<|im_end|>\n"
    # an empty response is still a response: the template's closing tokens and the EOS
    [(ids, n_prompt)] = data.encode_chats(tok, [problem], [""])
    assert ids[n_prompt:] == [151645, 198, 151643]


def authors_count(tok, role, text):
    """The authors' length script (PAPER.md §1), written out: the one message chat-templated alone, + 1."""
    return len(tok.apply_chat_template([{"role": role, "content": text}], tokenize=True,
                                       add_generation_prompt=False)["input_ids"]) + 1


def of_length(tok, role, n, make):
    """make(k) for the k whose authors' count is exactly n; make(k) must grow by one token per step of k >= 1."""
    k = 1 + n - authors_count(tok, role, make(1))
    assert authors_count(tok, role, make(k)) == n
    return make(k)


def test_length_filter_counts_as_the_authors(qwen_tokenizer, tmp_path):
    """The authors kept a triplet iff prompt <= 800 and both responses <= 19,000 of THEIR tokens: the response
    templated alone (so with the default system turn this template inserts, and the assistant header) + 1, the
    prompt templated alone without a generation prompt + 1. Their count differs from the trained one by -2
    (prompt) and +23 (response), so pairs at 19,001 of theirs are kept by the other count and dropped here."""
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    trace = lambda k: "<think>\n" + " x" * k + "\n</think>\n\\boxed{1}"  # noqa: E731  " x" is one token
    question = lambda k: "What is" + " x" * k + "?"  # noqa: E731
    short = question(3)
    y = {n: of_length(tok, "assistant", n, trace) for n in (19_000, 19_001)}
    x = {n: of_length(tok, "user", n, question) for n in (800, 801)}
    rows = {"chosen_19000": (short, y[19_000], RIGHT), "rejected_19000": (short, RIGHT, y[19_000]),
            "chosen_19001": (short, y[19_001], RIGHT), "rejected_19001": (short, RIGHT, y[19_001]),
            "prompt_800": (x[800], RIGHT, WRONG), "prompt_801": (x[801], RIGHT, WRONG)}
    raw_rows = [raw(i, [c, r], [True, False], [True, True], problem=p, name=name)
                for i, (name, (p, c, r)) in enumerate(rows.items())]
    src = write_jsonl(tmp_path / "raw.jsonl", raw_rows)

    def kept(*flags):
        prepare(src, qwen_tokenizer, tmp_path / "out", "--seed", -1, *flags)
        return [list(rows)[r["id"]] for r in read_jsonl(tmp_path / "out/pref.jsonl")]

    assert kept() == ["chosen_19000", "rejected_19000", "prompt_800"]
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats["pref_dropped"]["response_too_long"] == 2 and stats["pref_dropped"]["prompt_too_long"] == 1
    # the trained count: the prompt has the assistant header (800 of theirs is 802), the response has no
    # system turn (19,001 of theirs is 18,978)
    [(ids, n_prompt)] = data.encode_chats(tok, [x[800]], [y[19_001]])
    assert (n_prompt, len(ids) - n_prompt) == (802, 18_978)
    assert kept("--length-count", "trained") == ["chosen_19000", "rejected_19000", "chosen_19001", "rejected_19001"]


def test_boundary_merge_is_detected(qwen_tokenizer):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    # the prompt ends in "\n"; a response starting with "\n" merges into one "\n\n" token
    assert data.encode_chats(tok, ["p", "p"], ["\nabc", "abc"]) == [None, data.encode_chats(tok, ["p"], ["abc"])[0]]


def test_template_that_rewrites_the_answer_is_refused(qwen_tokenizer):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    # like the R1-distill templates: the thinking is stripped from assistant turns
    tok.chat_template = data.CHATML_TEMPLATE.replace("m['content']", "m['content'].split('</think>')[-1]")
    with pytest.raises(SystemExit):
        data.check_chat_template(tok)
    tok.chat_template = None
    with pytest.raises(SystemExit):
        data.check_chat_template(tok)


# -----------------------------------------------------------------------------
# batching


def test_every_example_once_per_epoch_and_ranks_partition_the_batch():
    n, batch, lengths = 103, 8, list(np.random.default_rng(0).integers(5, 500, 103))
    per_epoch = n // batch
    for epoch in range(2):
        seen = [i for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in data.batch_for_step(s, n, batch, 0)]
        assert len(seen) == len(set(seen)) == per_epoch * batch
    assert data.batch_for_step(0, n, batch, 0) != data.batch_for_step(per_epoch, n, batch, 0)
    step = data.batch_for_step(3, n, batch, 0)
    one = data.micro_batches(step, lengths, 2, 0, 1)
    two = [data.micro_batches(step, lengths, 2, r, 2) for r in range(2)]
    assert sorted(map(tuple, one)) == sorted(map(tuple, two[0] + two[1]))
    assert len(two[0]) == len(two[1]) == 2
    # longest first: the step's largest activations come before its gradients exist
    assert all(min(lengths[i] for i in mb) >= max(lengths[i] for i in nxt) for mb, nxt in zip(one, one[1:]))


def test_pack_lays_sequences_end_to_end_and_marks_the_responses():
    b = data.pack([([5, 6, 7, 8], 2), ([9, 10, 11], 1)])
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]  # restarting at 0: attention stays in each sequence
    assert b.pred_at.tolist() == [1, 2, 4, 5]  # position 1 predicts 7, 2 predicts 8, 4 predicts 10, 5 predicts 11
    assert b.targets.tolist() == [7, 8, 10, 11]
    assert b.seq_of.tolist() == [0, 0, 1, 1] and b.lengths.tolist() == [2, 2]
    assert b.seq_bounds == (0, 4, 7)  # host ints: where each sequence starts, then the row's end


def test_seeds_give_independent_orders_per_seed_and_epoch():
    n, batch = 64, 8
    epoch = lambda seed, e: [i for s in range(e * 8, (e + 1) * 8) for i in data.batch_for_step(s, n, batch, seed)]  # noqa: E731
    orders = {(seed, e): epoch(seed, e) for seed in range(3) for e in range(3)}
    assert len({tuple(o) for o in orders.values()}) == 9  # seed 1's first epoch is not seed 0's second, etc.
