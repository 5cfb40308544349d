"""redi.py: the three objectives against hand-worked numbers, the joint chosen/rejected forward, 1-rank
vs 2-rank, resume, DPO's reference cache, bad pair rows, and the collapse signature."""
import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl
from transformers import AutoModelForCausalLM

import common
import fast
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
    P = redi.Pairs
    # REDI: -(-10 / 5) + 0.8 * (-30 / 10) = 2 - 2.4 = -0.4; alpha 1: 2 - 3 = -1
    assert redi.redi_loss(P(t(-10.0), t(-30.0), t(5.0), t(10.0)), alpha=0.8).item() == pytest.approx(-0.4)
    assert redi.redi_loss(P(t(-10.0), t(-30.0), t(5.0), t(10.0)), alpha=1.0).item() == pytest.approx(-1.0)
    # DPO: policy == reference gives ln 2 whatever beta is
    same = P(t(-7.0, -1.0), t(-9.0, -3.0), t(1.0, 1.0), t(1.0, 1.0), t(-7.0, -1.0), t(-9.0, -3.0))
    assert redi.dpo_loss(same, beta=0.1).tolist() == pytest.approx([math.log(2)] * 2)
    # DPO: beta 0.1 * ((-10 + 12) - (-20 + 18)) = 0.4 -> log(1 + e^-0.4) = 0.513015
    p = P(t(-10.0), t(-20.0), t(1.0), t(1.0), t(-12.0), t(-18.0))
    assert redi.dpo_loss(p, beta=0.1).item() == pytest.approx(0.5130153, abs=1e-6)
    assert redi.reference_margin(p).item() == pytest.approx(4.0)
    # SimPO at equal normalised log-probs: -log sigmoid(-gamma) = log(1 + e^gamma) = 1.313262 for gamma 1
    assert redi.simpo_loss(P(t(-10.0), t(-20.0), t(5.0), t(10.0)), beta=2.0, gamma=1.0).item() == \
        pytest.approx(1.3132617, abs=1e-6)
    # SimPO: 2 * (-1 - (-2)) - 1 = 1 -> log(1 + e^-1) = 0.313262
    p = P(t(-5.0), t(-20.0), t(5.0), t(10.0))
    assert redi.simpo_loss(p, beta=2.0, gamma=1.0).item() == pytest.approx(0.3132617, abs=1e-6)
    assert redi.normalised_margin(p).item() == pytest.approx(1.0)


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
    return lm, pairs


def naive_lp(lm, prompt, response):
    """lp(y) the obvious way: the sequence alone, full logits, log_softmax, gather, sum over the response."""
    ids = torch.tensor([prompt + response])
    logps = lm(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt) - 1:].sum()


def test_joint_packed_forward_equals_separate_forwards(lm_and_pairs):
    lm, pairs = lm_and_pairs
    model = TokenLogprobs(lm, chunk_size=16)
    with torch.no_grad():
        p = redi.pair_logps(model, redi.pack_pairs(pairs))
        for k, (prompt, y_w, y_l) in enumerate(pairs):
            assert p.chosen_logps[k].item() == pytest.approx(naive_lp(lm, prompt, y_w).item(), rel=1e-5)
            assert p.rejected_logps[k].item() == pytest.approx(naive_lp(lm, prompt, y_l).item(), rel=1e-5)
            assert (p.chosen_lens[k].item(), p.rejected_lens[k].item()) == (len(y_w), len(y_l))


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_redi_loss_and_gradients_equal_a_naive_two_forward_reference(alpha, lm_and_pairs):
    """The packed, chunked path against Eq. 5 written out with one plain forward per trace. alpha 0 is also
    length-normalised SFT on the chosen traces."""
    lm, pairs = lm_and_pairs
    model = TokenLogprobs(lm, chunk_size=16)
    lm.zero_grad()
    loss = redi.redi_loss(redi.pair_logps(model, redi.pack_pairs(pairs)), alpha=alpha).mean()
    loss.backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    naive = sum(-naive_lp(lm, p, y_w) / len(y_w) + alpha * naive_lp(lm, p, y_l) / len(y_l) for p, y_w, y_l in pairs)
    (naive / len(pairs)).backward()
    assert loss.item() == pytest.approx(naive.item() / len(pairs), abs=1e-5)
    for g, p in zip(grads, lm.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
def test_redi_gradients_in_fp64_for_any_chunk_size(chunk_size, lm_and_pairs):
    """The LM head's hand-written backward (fast.HeadLogprobs) inside the whole pair step, in float64, where
    rounding cannot hide a wrong term: REDI's loss and every parameter's gradient (the head's weight is tied to the
    embedding, so its gradient adds both uses) against Eq. 5 with one plain forward per trace, with one token per
    chunk, chunks that straddle the traces, and one chunk for all; the MLPs and norms save less for backward, as
    sft.py's and redi.py's do without activation checkpointing (fast.save_less_for_backward); the reference's are
    the model's own. And the DPO reference pass (no grad) gives the training pass's log-probs bit for bit, without
    a graph."""
    lm, pairs = copy.deepcopy(lm_and_pairs[0]).double(), lm_and_pairs[1]
    trained = copy.deepcopy(lm)
    assert fast.save_less_for_backward(trained) == 2 + 5
    model = TokenLogprobs(trained, chunk_size=chunk_size)
    batch = redi.pack_pairs(pairs)
    p = redi.pair_logps(model, batch)
    loss = redi.redi_loss(p, alpha=0.8).mean()
    grads = torch.autograd.grad(loss, list(trained.parameters()))
    naive = sum(-naive_lp(lm, q, y_w) / len(y_w) + 0.8 * naive_lp(lm, q, y_l) / len(y_l) for q, y_w, y_l in pairs)
    naive_grads = torch.autograd.grad(naive / len(pairs), list(lm.parameters()))
    assert loss.item() == pytest.approx(naive.item() / len(pairs), abs=1e-12)
    for g, r in zip(grads, naive_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        reference = redi.pair_logps(model, batch)
    assert reference.chosen_logps.grad_fn is None
    assert torch.equal(reference.chosen_logps, p.chosen_logps.detach())
    assert torch.equal(reference.rejected_logps, p.rejected_logps.detach())


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
    assert a[-1]["update_norm"] > 0
    assert "| upd " in one.stdout and "| logps w " in one.stdout  # the fixed-width line


def test_more_pairs_per_row_give_the_same_losses(tiny_model, pref_data, tmp_path):
    """run.sh paper packs 2 pairs (4 sequences) per forward. REDI's loss is a mean over the step's pairs, so only the
    order of the sums may change."""
    train(tiny_model, pref_data, tmp_path / "one", "--micro-batch-size", "1")
    train(tiny_model, pref_data, tmp_path / "four", "--micro-batch-size", "4")
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "four")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "update_norm", "chosen_logps_per_token", "rejected_logps_per_token"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-4), key


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
    rows[0]["rejected"] = ""  # an empty response is trained on, as the authors' trainers do
    rows[1]["rejected"] = rows[1]["chosen"]
    proc = train(tiny_model, write_jsonl(tmp_path / "pref.jsonl", rows), tmp_path / "out", "--stop-at-step", 1)
    assert "10 rows, 9 pairs used" in proc.stdout
    assert "warning: skipped bad rows: chosen == rejected: 1\n" in proc.stdout


def test_eos_is_appended_and_an_empty_response_is_trained_on(qwen_tokenizer, tiny_model, tmp_path):
    """With the real Qwen tokenizer: each response ends <|im_end|>, newline, EOS, also an empty one; the flag
    drops the EOS. End to end, the flag reaches training (every chosen and rejected sequence is one token
    shorter) and is recorded in config.json."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    rows = pref_rows(2)
    rows[0]["rejected"] = ""
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    (_, y_w, y_l), _ = redi.load_pairs(path, tok, 800, 19_000)
    assert tok.decode(y_w) == rows[0]["chosen"] + "<|im_end|>\n<|endoftext|>"
    assert y_l == [151645, 198, 151643]  # <|im_end|>, "\n", <|endoftext|>: |y_l| = 3
    (_, y_w2, y_l2), _ = redi.load_pairs(path, tok, 800, 19_000, append_eos=False)
    assert (y_w2, y_l2) == (y_w[:-1], [151645, 198])
    data_path = write_jsonl(tmp_path / "pref8.jsonl", pref_rows(8))
    with_eos = train(tiny_model, data_path, tmp_path / "eos", "--stop-at-step", 1)
    without = train(tiny_model, data_path, tmp_path / "no_eos", "--stop-at-step", 1, "--no-append-eos")
    assert with_eos.returncode == without.returncode == 0
    assert metrics(tmp_path / "eos")[0]["tokens"] == metrics(tmp_path / "no_eos")[0]["tokens"] + 16  # 8 pairs x 2
    assert json.loads((tmp_path / "eos/config.json").read_text())["append_eos"] is True
    assert json.loads((tmp_path / "no_eos/config.json").read_text())["append_eos"] is False


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


# -----------------------------------------------------------------------------
# the collapse warning and the objectives table


def history(n, lr=lambda s: 1e-6, update=lambda s, lr: 5.0 * lr, chosen=lambda s: -0.3, rejected=lambda s: -0.6):
    return [{"step": s + 1, "lr": lr(s), "update_norm": update(s, lr(s)), "chosen_logps_per_token": chosen(s),
             "rejected_logps_per_token": rejected(s)} for s in range(n)]


def flags(n, **kw):
    """is_collapsing at each step of a constructed run, as redi.py calls it."""
    h = history(n, **kw)
    args = redi.parser.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    return [redi.is_collapsing(h[:s], h[s], args) for s in range(n)]


def test_collapse_fires_on_the_signature_only():
    warmup_then_decay = lambda s: 1e-6 * min((s + 1) / 10, (100 - s) / 90)  # noqa: E731
    assert not any(flags(100, lr=warmup_then_decay))  # update size follows the LR: quiet
    falling = lambda s: -0.3 - (0.02 * (s - 40) if s > 40 else 0)  # noqa: E731  # both LogPS drop from step 40
    surge = lambda s, lr: 5.0 * lr * (10 if s > 60 else 1)  # noqa: E731  # the update surges from step 60
    both = flags(100, lr=warmup_then_decay, update=surge, chosen=falling, rejected=lambda s: falling(s) - 0.3)
    assert both.index(True) == 66  # the drop passes 0.5 nats/token after step 65 (0.02 x 26 = 0.52)
    assert not any(flags(100, lr=warmup_then_decay, chosen=falling, rejected=falling))  # a drop, no surge
    assert not any(flags(100, update=surge))  # a surge, no drop
    assert not any(flags(100, update=surge, chosen=falling))  # only the chosen trace falls: not the signature


def test_a_new_objective_is_one_table_entry(tiny_model, pref_data, tmp_path, monkeypatch):
    """REDI plus a constant 1 added through the table alone: its first loss is REDI's plus 1 and it takes the same
    step (a constant has no gradient)."""
    toy = redi.Objective(lambda p, alpha: redi.redi_loss(p, alpha) + 1.0, redi.normalised_margin, {"alpha": 0.8}, lr=1e-3)
    monkeypatch.setitem(redi.OBJECTIVES, "redi_plus_one", toy)

    def run(loss, out):
        monkeypatch.setattr(sys, "argv", ["redi.py", "--model", str(tiny_model), "--data", str(pref_data),
                                          "--out", str(out), "--loss", loss, "--batch-size", "8",
                                          "--micro-batch-size", "4", "--stop-at-step", "1", "--lr", "1e-3"])
        redi.main()
        return metrics(out)[0]

    a, b = run("redi", tmp_path / "redi"), run("redi_plus_one", tmp_path / "toy")
    assert b["loss"] == pytest.approx(a["loss"] + 1.0, abs=1e-6)
    assert b["update_norm"] == pytest.approx(a["update_norm"], rel=1e-6)


def test_lr_and_hyperparameters_follow_the_loss(tiny_model, pref_data, tmp_path):
    parse = lambda *f: redi.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", *f])  # noqa: E731
    for loss, lr, setting in [("redi", 1e-6, {"alpha": 0.8}), ("dpo", 2e-7, {"beta": 0.001}),
                              ("simpo", 5e-7, {"beta": 2.0, "gamma": 1.0})]:
        args = parse("--loss", loss)
        redi.resolve_objective(args)
        assert args.lr == lr and all(getattr(args, k) == v for k, v in setting.items())
    args = parse("--loss", "dpo", "--lr", "1e-6", "--beta", "0.01")
    redi.resolve_objective(args)
    assert (args.lr, args.beta) == (1e-6, 0.01)
    proc = train(tiny_model, pref_data, tmp_path / "out", "--loss", "simpo", "--stop-at-step", 1)
    assert json.loads((tmp_path / "out/config.json").read_text())["lr"] == 1e-3  # train() passes --lr 1e-3
    assert "simpo (beta 2.0, gamma 1.0, lr 0.001)" in proc.stdout
    for bad, message in [(["--loss", "kl"], "invalid choice: 'kl'"), (["--loss", "dpo", "--alpha", "0.5"],
                                                                      "--alpha does not apply to --loss dpo")]:
        proc = train(tiny_model, pref_data, tmp_path / "bad", *bad, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
