"""redi.py: the three objectives against hand-worked numbers, the joint chosen/rejected forward, 1-rank
vs 2-rank, resume, DPO's reference cache, bad pair rows, and the collapse signature."""
import math
import sys

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl
from transformers import AutoModelForCausalLM

import common
import redi
from common import TokenLogprobs
from data import encode_chats
from demo import demo_tokenizer


def pref_rows(n, seed=0):
    """Pairs whose chosen and rejected responses differ a lot in length, as real traces do."""
    rng = np.random.default_rng(seed)
    words = ["carry", "add", "seven", "so", "the", "sum", "is", "wait", "check", "+", "="]
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    return [{"problem": f"Problem {i}: {text(rng.integers(1, 20))}",
             "chosen": f"<think>\n{text(rng.integers(1, 80))}\n</think>\n\\boxed{{{i}}}",
             "rejected": f"<think>\n{text(rng.integers(1, 150))}\n</think>\n\\boxed{{{i + 1}}}"} for i in range(n)]


@pytest.fixture
def pref_data(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", pref_rows(24))


def train(model, data_path, out, *flags, nproc=1, check=True):
    return run_script("redi.py", "--model", model, "--data", data_path, "--out", out, "--batch-size", 8,
                      "--micro-batch-size", 2, "--lr", 1e-3, *flags, nproc=nproc, check=check)


def metrics(out):
    return read_jsonl(out / "metrics.jsonl")


# -----------------------------------------------------------------------------
# the objectives


def test_losses_against_hand_worked_values():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # REDI: -(-10 / 5) + 0.8 * (-30 / 10) = 2 - 2.4 = -0.4; alpha 1: 2 - 3 = -1
    assert redi.redi_loss(t(-10.0), t(-30.0), t(5.0), t(10.0), 0.8).item() == pytest.approx(-0.4)
    assert redi.redi_loss(t(-10.0), t(-30.0), t(5.0), t(10.0), 1.0).item() == pytest.approx(-1.0)
    # DPO: policy == reference gives ln 2 whatever beta is
    assert redi.dpo_loss(t(-7.0, -1.0), t(-9.0, -3.0), t(-7.0, -1.0), t(-9.0, -3.0), 0.1).tolist() == \
        pytest.approx([math.log(2)] * 2)
    # DPO: beta 0.1 * ((-10 + 12) - (-20 + 18)) = 0.4 -> log(1 + e^-0.4) = 0.513015
    assert redi.dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), 0.1).item() == pytest.approx(0.5130153, abs=1e-6)
    # SimPO at equal normalised log-probs: -log sigmoid(-gamma) = log(1 + e^gamma) = 1.313262 for gamma 1
    assert redi.simpo_loss(t(-10.0), t(-20.0), t(5.0), t(10.0), 2.0, 1.0).item() == pytest.approx(1.3132617, abs=1e-6)
    # SimPO: 2 * (-1 - (-2)) - 1 = 1 -> log(1 + e^-1) = 0.313262
    assert redi.simpo_loss(t(-5.0), t(-20.0), t(5.0), t(10.0), 2.0, 1.0).item() == pytest.approx(0.3132617, abs=1e-6)


@pytest.fixture(scope="module")
def lm_and_pairs():
    from demo import demo_model
    tok = demo_tokenizer()
    torch.manual_seed(0)
    lm = demo_model(tok, hidden_size=32, layers=2).float()
    rows = pref_rows(3, seed=1)
    problems = [r["problem"] for r in rows]
    chosen = encode_chats(tok, problems, [r["chosen"] for r in rows])
    rejected = encode_chats(tok, problems, [r["rejected"] for r in rows])
    pairs = [(c[0][:c[1]], c[0][c[1]:], r[0][r[1]:]) for c, r in zip(chosen, rejected)]
    return lm, pairs, tok.pad_token_id


def test_joint_forward_equals_separate_forwards(lm_and_pairs):
    lm, pairs, pad = lm_and_pairs
    model = TokenLogprobs(lm, chunk_size=16)
    with torch.no_grad():
        w, l, w_len, l_len = redi.pair_logps(model, *redi.collate_pairs(pairs, pad), torch.device("cpu"))
        for k, (p, y_w, y_l) in enumerate(pairs):
            for y, lp, n in ((y_w, w[k], w_len[k]), (y_l, l[k], l_len[k])):
                ids = torch.tensor([p + y])
                alone = model(ids, torch.ones_like(ids), torch.tensor([[0] * len(p) + [1] * len(y)]))
                assert lp.item() == pytest.approx(alone.sum().item(), rel=1e-6)  # fp32 sums of ~300 terms
                assert n.item() == len(y)


def test_alpha_zero_is_length_normalised_sft_on_the_chosen_trace(lm_and_pairs):
    lm, pairs, pad = lm_and_pairs
    model = TokenLogprobs(lm, chunk_size=16)
    lm.zero_grad()
    redi.redi_loss(*redi.pair_logps(model, *redi.collate_pairs(pairs, pad), torch.device("cpu")), 0.0).mean().backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    nll = 0
    for p, y_w, _ in pairs:  # each chosen trace alone: mean token NLL, averaged over pairs
        ids = torch.tensor([p + y_w])
        nll = nll - model(ids, torch.ones_like(ids), torch.tensor([[0] * len(p) + [1] * len(y_w)])).sum() / len(y_w)
    (nll / len(pairs)).backward()
    for g, p in zip(grads, lm.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# the script, end to end


@pytest.mark.parametrize("loss", ["redi", "dpo"])
def test_two_ranks_give_the_one_rank_losses(loss, tiny_model, pref_data, tmp_path):
    flags = ["--loss", loss] + (["--ref-cache", tmp_path / "ref_{}.pt"] if loss == "dpo" else [])
    one = train(tiny_model, pref_data, tmp_path / "one", *[str(f).format(1) for f in flags])
    train(tiny_model, pref_data, tmp_path / "two", *[str(f).format(2) for f in flags], nproc=2)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "update_norm", "chosen_logps_per_token", "rejected_logps_per_token", "margin"):
            # DPO's margin is a difference of sums over ~2,000 tokens: fp32 rounding alone is ~1e-4
            assert ra[key] == pytest.approx(rb[key], abs=3e-4 if key == "margin" else 1e-5, rel=1e-4), key
    if loss == "dpo":  # both computed the same reference, and step 1 starts at policy == reference
        assert torch.allclose(torch.load(tmp_path / "ref_1.pt"), torch.load(tmp_path / "ref_2.pt"), atol=1e-4)
        assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and a[0]["margin"] == pytest.approx(0, abs=3e-4)
    assert a[-1]["update_norm"] > 0 and 0 <= a[0]["reward_accuracy"] <= 1
    assert "| upd " in one.stdout and "| logps w " in one.stdout  # the fixed-width line


def test_resume_equals_uninterrupted(tiny_model, pref_data, tmp_path):
    train(tiny_model, pref_data, tmp_path / "full", "--loss", "simpo")
    train(tiny_model, pref_data, tmp_path / "cut", "--loss", "simpo", "--stop-at-step", 1)
    train(tiny_model, pref_data, tmp_path / "cut", "--loss", "simpo", "--resume")
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6) and ra["update_norm"] == pytest.approx(rb["update_norm"], rel=1e-5)
    assert (tmp_path / "cut/final").resolve().name == "step_000003"
    AutoModelForCausalLM.from_pretrained(tmp_path / "cut/final")


def test_dpo_uses_its_cache_and_holds_one_model(tiny_model, pref_data, tmp_path, monkeypatch):
    """In-process, so we can count models and forbid recomputing the reference."""
    loaded = []
    real_load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))

    def run(out):
        monkeypatch.setattr(sys, "argv", ["redi.py", "--model", str(tiny_model), "--data", str(pref_data),
                                          "--out", str(out), "--loss", "dpo", "--batch-size", "8",
                                          "--micro-batch-size", "4", "--stop-at-step", "1"])
        redi.main()

    run(tmp_path / "first")
    cache = list(tmp_path.glob("ref_logps_*.pt"))
    assert len(cache) == 1 and torch.load(cache[0]).shape == (24, 2)
    monkeypatch.setattr(redi, "reference_logps", lambda *a, **k: pytest.fail("reference recomputed"))
    run(tmp_path / "second")
    assert loaded == [str(tiny_model)] * 2  # one model per run: no reference model next to the policy
    for out in ("first", "second"):
        assert metrics(tmp_path / out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    write_jsonl(pref_data, pref_rows(24, seed=5))  # other data: another cache file
    assert redi.ref_cache_path(redi.parser.parse_args(["--model", str(tiny_model), "--data", str(pref_data),
                                                       "--out", "x"])) != cache[0]


def test_bad_pair_rows_are_reported_not_trained_on(tiny_model, tmp_path):
    rows = pref_rows(10)
    rows[0]["rejected"] = " "
    rows[1]["rejected"] = rows[1]["chosen"]
    proc = train(tiny_model, write_jsonl(tmp_path / "pref.jsonl", rows), tmp_path / "out", "--stop-at-step", 1)
    assert "10 rows, 8 pairs used" in proc.stdout
    assert "empty response: 1" in proc.stdout and "chosen == rejected: 1" in proc.stdout


def test_long_inputs_are_truncated_and_counted(tiny_model, pref_data, tmp_path):
    tok = demo_tokenizer()
    pairs = redi.load_pairs(pref_data, tok, 10_000, 10_000)  # nothing cut
    max_p, max_r = (sorted(n)[len(n) // 2] for n in ([len(p) for p, _, _ in pairs], [len(w) for _, w, _ in pairs]))
    prompt_cut = sum(len(p) > max_p for p, _, _ in pairs)
    response_cut = sum(len(w) > max_r or len(l) > max_r for _, w, l in pairs)
    assert 0 < prompt_cut < len(pairs) and 0 < response_cut < len(pairs)
    cut = redi.load_pairs(pref_data, tok, max_p, max_r)
    for (p, w, l), (p2, w2, l2) in zip(pairs, cut):
        assert p2 == p[-max_p:] and w2 == w[:max_r] and l2 == l[:max_r]  # prompts keep their end, responses their start
    proc = train(tiny_model, pref_data, tmp_path / "out", "--max-prompt-length", max_p, "--max-response-length", max_r,
                 "--stop-at-step", 1)
    assert f"prompts cut to their last {max_p} tokens: {prompt_cut}; pairs with a response cut to {max_r} tokens: " \
           f"{response_cut}" in proc.stdout
