"""redi.py's objectives table beyond the paper's three: a per-token objective (Tokens) against full logits of plain,
unpacked forwards, the divergence index, the paper's objectives unchanged bit for bit, the authors' variants against
their formulas, weighted sums of entries, and the flags, help and config.json that follow from the table."""
import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, run_script, write_jsonl
from test_redi import pref_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import data
import redi
from common import TokenLogprobs
from demo import demo_model, demo_tokenizer

# -----------------------------------------------------------------------------
# hand-built pairs: (prompt, y_w, y_l) token ids, with the first differing response position known by construction


def hand_pairs(vocab, seed=0):
    """Six pairs, each (prompt, y_w, y_l, d): y_l differs from y_w first at d, by construction. Covers a difference at
    token 0, at 1, mid-response, y_l a prefix of y_w (an empty suffix), and y_w a prefix of y_l."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, vocab, n).tolist()  # noqa: E731
    other = lambda t: (t + 1 + int(rng.integers(0, vocab - 1))) % vocab  # noqa: E731  # any token but t

    def diverging(y_w, d, tail):
        """y_w's first d tokens, then a token that is not y_w[d], then `tail` more."""
        return y_w[:d] + [other(y_w[d])] + ids(tail)

    out = []
    for n_prompt, n_w, d, tail in [(5, 9, 0, 6), (3, 12, 1, 9), (7, 15, 6, 13), (4, 30, 20, 2)]:
        y_w = ids(n_w)
        out.append((ids(n_prompt), y_w, diverging(y_w, d, tail), d))
    y_w = ids(11)
    out.append((ids(6), y_w, y_w[:7], 7))  # y_l is y_w's first 7 tokens: d = |y_l|, nothing of y_l is its own
    y_l = ids(10)
    out.append((ids(2), y_l[:4], y_l, 4))  # y_w is y_l's first 4 tokens: d = |y_w|, y_l's suffix is y_l[4:]
    return out


def test_divergence_index_and_positions_on_hand_built_pairs():
    cases = hand_pairs(259)
    for _, y_w, y_l, d in cases:
        assert redi.first_difference(y_w, y_l) == d
    assert redi.first_difference([1, 2, 3], [1, 2, 3]) == 3  # identical (as two responses cut to one length can be)
    assert redi.first_difference([4], [5, 4]) == 0
    batch = redi.pack_pairs([c[:3] for c in cases])
    assert batch.divergence.tolist() == [d for *_, d in cases]
    # each response token's position within its response, in packed order (y_w, then y_l, pair by pair)
    assert batch.position.tolist() == [t for _, y_w, y_l, _ in cases for y in (y_w, y_l) for t in range(len(y))]
    assert batch.packed.lengths.tolist() == [len(y) for _, y_w, y_l, _ in cases for y in (y_w, y_l)]


def test_divergence_of_loaded_pairs_meets_its_definition(tmp_path):
    """Pairs as redi.py loads them (real tokenisation; every trace starts "<think>", half share a longer start): y_w
    and y_l agree on their first d tokens, and differ at d unless one of them ends there."""
    rows = pref_rows(12, seed=4)
    for r in rows[:6]:
        r["rejected"] = r["chosen"][:len(r["chosen"]) // 2] + " wait " + r["rejected"]
    pairs = redi.load_pairs(write_jsonl(tmp_path / "pref.jsonl", rows), demo_tokenizer(), 800, 19_000)
    ds = redi.pack_pairs(pairs).divergence.tolist()
    for (_, y_w, y_l), d in zip(pairs, ds):
        assert y_w[:d] == y_l[:d] and (d == min(len(y_w), len(y_l)) or y_w[d] != y_l[d])
    assert min(ds[:6]) > 10 and min(ds) >= len("<think>")  # one token per byte


# -----------------------------------------------------------------------------
# a per-token objective against the obvious computation


def naive_token_logps(lm, prompt, response):
    """log pi(y_t | x, y_<t) of each response token the obvious way: the sequence alone through the model's own
    forward, the full logits, log_softmax, gather. (|y|,)"""
    ids = torch.tensor([prompt + response])
    logps = lm(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt) - 1:]


def naive_suffix_loss(lm, cases, alpha):
    """redi_suffix's loss written out: the mean over the pairs of -lp(y_w)/|y_w| + alpha lp(y_l[d:]) / (|y_l| - d),
    the second term 0 when y_l[d:] is empty; d as the pairs were built."""
    total = 0
    for prompt, y_w, y_l, d in cases:
        lw, ll = naive_token_logps(lm, prompt, y_w), naive_token_logps(lm, prompt, y_l)
        suffix = ll[d:].sum() / (len(y_l) - d) if len(y_l) > d else 0
        total = total + (-lw.sum() / len(y_w) + alpha * suffix)
    return total / len(cases)


def test_suffix_objective_equals_naive_full_logits_in_fp64():
    """Packed rows of 3 pairs, 2 micro-batches, the LM head in chunks of 5 tokens (they straddle traces), float64:
    the loss and every gradient entry as the formula on full logits of one plain forward per trace."""
    torch.manual_seed(0)
    lm = demo_model(demo_tokenizer(), hidden_size=32, layers=2).double()
    naive_lm = copy.deepcopy(lm)
    cases = hand_pairs(lm.config.vocab_size, seed=1)
    objective = redi.resolve_objective(parse("--loss", "redi_suffix", "--lr", "1", "--alpha", "0.7"))
    model = TokenLogprobs(lm, chunk_size=5)
    total = 0
    for micro in (cases[:3], cases[3:]):
        p, tokens = redi.pair_logps(model, redi.pack_pairs([c[:3] for c in micro]), per_token=True)
        loss = objective.losses(p, tokens)["redi_suffix"].sum() / len(cases)
        loss.backward()
        total += loss.item()
    naive = naive_suffix_loss(naive_lm, cases, alpha=0.7)
    naive.backward()
    assert total == pytest.approx(naive.item(), abs=1e-12)
    for g, r in zip([q.grad for q in lm.parameters()], [q.grad for q in naive_lm.parameters()], strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    # not REDI under another name: the shared prefixes change the value
    p, _ = redi.pair_logps(model, redi.pack_pairs([c[:3] for c in cases]), per_token=True)
    assert abs(redi.redi_loss(p, 0.7).mean().item() - total) > 1e-3


# -----------------------------------------------------------------------------
# train_step in process: one rank, the model built by the script's build_model


def parse(*flags, model="m"):
    return redi.parser.parse_args(["--model", str(model), "--data", "-", "--out", "-", *flags])


def build(loss, model_dir, device, n_pairs, *flags):
    """args, objective and model as redi.py builds them: --loss `loss`, 3 pairs per packed row, no clipping."""
    args = parse("--loss", loss, "--lr", "1e-3", "--batch-size", str(n_pairs), "--micro-batch-size", "3",
                 "--max-grad-norm", "1e9", *flags, model=model_dir)
    objective = redi.resolve_objective(args)
    model, optimizer, _ = common.build_model(args, device)
    return args, objective, model, optimizer


def stepped_grads(model, optimizer):
    """Records the gradients AdamW is handed (after clipping, which --max-grad-norm 1e9 makes a multiplication by 1)."""
    grads, step = [], optimizer.step

    def record_and_step(*a, **kw):
        grads.append([common.local_shard(q.grad).clone() for q in model.parameters()])
        return step(*a, **kw)
    optimizer.step = record_and_step
    return grads


def micro_batches(pairs, device):
    return [(redi.pack_pairs(pairs[i:i + 3]).to(device), list(range(i, min(i + 3, len(pairs)))))
            for i in range(0, len(pairs), 3)]


def train_one_step(loss, pairs, model_dir, device, *flags):
    """One redi.train_step with --loss `loss` from the starting weights: (statistics on the host, gradients)."""
    args, objective, model, optimizer = build(loss, model_dir, device, len(pairs), *flags)
    ref = redi.reference_logps(model, pairs, args, device).to(device) if objective.needs_reference else None
    model.train()
    grads = stepped_grads(model, optimizer)
    stats = redi.train_step(model, optimizer, micro_batches(pairs, device), ref, args.lr, objective, args, device)
    return common.to_host(stats, device), grads[0]


def test_suffix_objective_through_train_step_equals_naive(tiny_model, device):
    """redi.py's own step (FSDP on one rank, packed_sdpa, the chunked head, save-less MLPs, per-token indices moved
    with the batch) for --loss redi_suffix: its logged loss and the gradients it steps with, against the formula on
    full logits of one plain forward per trace."""
    cases = hand_pairs(len(AutoTokenizer.from_pretrained(tiny_model)), seed=2)
    stats, grads = train_one_step("redi_suffix", [c[:3] for c in cases], tiny_model, device)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    naive = naive_suffix_loss(lm, cases, alpha=redi.OBJECTIVES["redi_suffix"].hparams["alpha"])
    naive.backward()
    assert stats["loss"] == pytest.approx(naive.item(), abs=1e-6)
    for g, q in zip(grads, lm.parameters(), strict=True):
        torch.testing.assert_close(g, q.grad, atol=1e-6, rtol=1e-4)


# HEAD's pair_logps and losses, line for line as redi.py computed them before Tokens and weighted sums existed: the
# per-trace sums from common.sequence_logps's index_add_, each loss on those (B,) tensors, summed over the micro-batch
# and divided by the global batch
def head_pair_logps(model, packed):
    logps = model(*packed.model_inputs)  # (R,)
    lp = logps.new_zeros(packed.lengths.shape[0]).index_add_(0, packed.seq_of, logps).view(-1, 2)
    lens = packed.lengths.view(-1, 2).to(lp.dtype)
    return lp[:, 0], lp[:, 1], lens[:, 0], lens[:, 1]


HEAD_LOSSES = {
    "redi": lambda w, l, nw, nl, rw, rl: -w / nw + 0.8 * l / nl,
    "dpo": lambda w, l, nw, nl, rw, rl: -F.logsigmoid(0.001 * ((w - rw) - (l - rl))),
    "simpo": lambda w, l, nw, nl, rw, rl: -F.logsigmoid(2.0 * (w / nw - l / nl) - 1.0),
}


@pytest.mark.parametrize("loss", HEAD_LOSSES)
def test_paper_objectives_are_unchanged_bit_for_bit(loss, tiny_model, device, tmp_path):
    """--loss redi, dpo, simpo at their defaults: the step's loss and every gradient entry equal (torch.equal, not
    close) what the code computed before per-token objectives and weighted sums, from the same weights and batches."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = redi.load_pairs(write_jsonl(tmp_path / "pref.jsonl", pref_rows(6, seed=7)), tok, 800, 19_000)
    args, objective, model, optimizer = build(loss, tiny_model, device, len(pairs))
    ref = redi.reference_logps(model, pairs, args, device).to(device) if objective.needs_reference else None
    model.train()
    batches = micro_batches(pairs, device)
    head_loss = 0
    for batch, idx in batches:
        w, l, nw, nl = head_pair_logps(model, batch.packed)
        rw, rl = ref[idx].to(w.dtype).unbind(-1) if ref is not None else (None, None)
        step_loss = HEAD_LOSSES[loss](w, l, nw, nl, rw, rl).sum() / args.batch_size
        step_loss.backward()
        head_loss = head_loss + step_loss
    head_grads = [common.local_shard(q.grad).clone() for q in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    grads = stepped_grads(model, optimizer)
    stats = redi.train_step(model, optimizer, batches, ref, args.lr, objective, args, device)
    assert common.to_host(stats, device)["loss"] == head_loss.double().item()
    for g, h in zip(grads[0], head_grads, strict=True):
        assert torch.equal(g, h)
    assert "loss_" + loss not in stats  # a single entry logs no per-term loss


def test_a_weighted_sum_is_the_weighted_sum_of_its_terms(tiny_model, device, tmp_path):
    """--loss redi+0.5*dpo from the same weights: its loss is loss_redi + 0.5 loss_dpo, each term's logged loss is the
    entry's own run's, its gradients are redi's + 0.5 dpo's, the reference is computed (dpo, the second term, needs
    it), and margin and reward accuracy are the first term's."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = redi.load_pairs(write_jsonl(tmp_path / "pref.jsonl", pref_rows(6, seed=8)), tok, 800, 19_000)
    both, grads = train_one_step("redi+0.5*dpo", pairs, tiny_model, device, "--alpha", "0.6", "--beta", "0.1")
    alone_redi, grads_redi = train_one_step("redi", pairs, tiny_model, device, "--alpha", "0.6")
    alone_dpo, grads_dpo = train_one_step("dpo", pairs, tiny_model, device, "--beta", "0.1")
    assert both["loss_redi"] == pytest.approx(alone_redi["loss"], abs=1e-7)
    assert both["loss_dpo"] == pytest.approx(alone_dpo["loss"], abs=1e-7)
    assert both["loss_dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference before the first update
    assert both["loss"] == pytest.approx(both["loss_redi"] + 0.5 * both["loss_dpo"], abs=1e-6)
    assert both["margin"] == pytest.approx(alone_redi["margin"], abs=1e-7)
    assert both["reward_accuracy"] == alone_redi["reward_accuracy"]
    for g, r, d in zip(grads, grads_redi, grads_dpo, strict=True):
        torch.testing.assert_close(g, r + 0.5 * d, atol=1e-7, rtol=1e-5)


# -----------------------------------------------------------------------------
# the authors' variants, by hand


def authors_reinforce(lp_w, lp_l, n_w, n_l, c_w, c_l, gamma=None):
    """Their trainer's `reinforce` loss, as PAPER.md §3 states it: x = lp / |y| (|y| at least 1),
    L = -c_w x_w + c_l x_l, the rejected term times exp(gamma x_l) with the negative weighting on."""
    x_w, x_l = lp_w / n_w.clamp(min=1.0), lp_l / n_l.clamp(min=1.0)
    rejected = c_l * x_l
    if gamma is not None:
        rejected = rejected * torch.exp(gamma * x_l)
    return -c_w * x_w + rejected


def test_authors_variants_against_their_formulas():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    P = redi.Pairs
    # x_w = -10 / 5 = -2, x_l = -30 / 10 = -3: coefs 1, 0.8 give 2 - 2.4 = -0.4 (REDI at alpha 0.8); with the
    # weighting at gamma 1, 2 + 0.8 (-3) e^-3 = 2 - 2.4 x 0.04978707 = 1.8805110
    p = P(t(-10.0), t(-30.0), t(5.0), t(10.0))
    assert redi.redi_coefs_loss(p, 1.0, 0.8).item() == pytest.approx(-0.4)
    assert redi.redi_negw_loss(p, 1.0, 0.8, 1.0).item() == pytest.approx(1.8805110, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    n_w, n_l = torch.randint(1, 400, (16,), generator=g).double(), torch.randint(1, 400, (16,), generator=g).double()
    lp_w = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 * n_w).requires_grad_()
    lp_l = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 * n_l).requires_grad_()
    p = P(lp_w, lp_l, n_w, n_l)
    torch.testing.assert_close(redi.redi_coefs_loss(p, 1.3, 0.6), authors_reinforce(lp_w, lp_l, n_w, n_l, 1.3, 0.6))
    torch.testing.assert_close(redi.redi_coefs_loss(p, 1.0, 0.8), redi.redi_loss(p, 0.8))
    loss = redi.redi_negw_loss(p, 1.3, 0.6, 2.0)
    torch.testing.assert_close(loss, authors_reinforce(lp_w, lp_l, n_w, n_l, 1.3, 0.6, gamma=2.0))
    # the weight is not detached: d L / d lp_l = c_l (1 + gamma x_l) exp(gamma x_l) / |y_l|, not c_l exp(gamma x_l)
    # / |y_l|; it is 0 at x_l = -1/gamma
    d_w, d_l = torch.autograd.grad(loss.sum(), [lp_w, lp_l])
    x_l = lp_l.detach() / n_l
    torch.testing.assert_close(d_l, 0.6 * (1 + 2.0 * x_l) * torch.exp(2.0 * x_l) / n_l)
    torch.testing.assert_close(d_w, -1.3 / n_w)
    at_min = P(t(-1.0), t(-5.0).requires_grad_(), t(1.0), t(10.0))  # x_l = -0.5 = -1/gamma
    assert torch.autograd.grad(redi.redi_negw_loss(at_min, 1.0, 0.8, 2.0).sum(), at_min.rejected_logps)[0].item() \
        == pytest.approx(0, abs=1e-15)


# -----------------------------------------------------------------------------
# flags, help, config.json: the script as users run it


@pytest.fixture
def pref_data(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", pref_rows(24))


def train(model, data_path, out, *flags, check=True):
    return run_script("redi.py", "--model", model, "--data", data_path, "--out", out, "--batch-size", 8,
                      "--micro-batch-size", 4, *flags, check=check)


def test_help_shows_each_objectives_defaults_and_source():
    text = " ".join(run_script("redi.py", "--help").stdout.split())  # argparse wraps lines: compare words
    for name in dict.fromkeys(h for o in redi.OBJECTIVES.values() for h in o.hparams):
        flag = "--" + name.replace("_", "-")
        section = text.split(f"{flag} X [X ...] ", 1)[1].split(" --", 1)[0]  # this flag's help
        expected = ", ".join(f"{k} {o.hparams[name]} ({o.source})" for k, o in redi.OBJECTIVES.items()
                             if name in o.hparams)
        assert section == f"default: {expected}", flag
    assert "--beta X [X ...] default: dpo 0.001 (paper), simpo 2.0 (paper)" in text
    for name, o in redi.OBJECTIVES.items():
        assert f"{name} ({o.source}, {o.lr or 'none: --lr required'})" in text


def test_lr_is_required_for_an_entry_without_one(tiny_model, pref_data, tmp_path):
    proc = train(tiny_model, pref_data, tmp_path / "out", "--loss", "redi_suffix", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("redi.py: error: --lr is required with --loss redi_suffix: "
                                                    "redi_suffix has no default learning rate, as no tuned run of it "
                                                    "is known")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--loss", "dpo+simpo", "--beta", "0.01"], "--beta is a hyperparameter of dpo and simpo in --loss dpo+simpo"),
    (["--loss", "dpo", "--alpha", "0.5"], "--alpha does not apply to --loss dpo (its hyperparameters: --beta)"),
    (["--loss", "redi+kl"], "argument --loss: invalid choice: 'kl'"),
    (["--loss", "redi+x*dpo"], "--loss redi+x*dpo: the weight of dpo is not a number"),
    (["--loss", "redi+0.1*redi"], "--loss redi+0.1*redi names redi twice"),
    (["--loss", "dpo", "--beta", "simpo=1"], "--beta simpo=1: expected one value for each of dpo"),
    (["--loss", "simpo", "--beta", "two"], "--beta two: 'two' is not a number")])
def test_bad_loss_and_hyperparameter_flags_stop_with_one_sentence(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        redi.resolve_objective(parse(*flags))
    assert stop.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_hyperparameters_by_term_and_their_record():
    args = parse("--loss", "dpo+0.2*simpo", "--beta", "simpo=5", "dpo=0.01")
    objective = redi.resolve_objective(args)
    assert [(t.name, t.weight, t.hparams) for t in objective.terms] == [
        ("dpo", 1.0, {"beta": 0.01}), ("simpo", 0.2, {"beta": 5.0, "gamma": 1.0})]
    assert objective.needs_reference and args.lr == redi.OBJECTIVES["dpo"].lr  # the first term's LR
    assert args.objective == {"dpo": {"beta": 0.01}, "simpo": {"beta": 5.0, "gamma": 1.0}}
    assert (args.beta, args.gamma, args.alpha) == ({"dpo": 0.01, "simpo": 5.0}, 1.0, None)


def numpy_divergence(y_w, y_l):
    n = min(len(y_w), len(y_l))
    differ = np.flatnonzero(np.array(y_w[:n]) != np.array(y_l[:n]))
    return int(differ[0]) if len(differ) else n


@pytest.mark.parametrize("loss", ["redi_suffix", "redi_negw", "redi+0.5*dpo"])
def test_new_objectives_train_end_to_end(loss, tiny_model, pref_data, tmp_path):
    """redi.py on the toy pairs for 3 steps: the first step's loss is the formula's on the starting model (full logits
    of one plain forward per trace; a divergence found by numpy), it trains, and config.json records the terms."""
    out = tmp_path / "out"
    proc = train(tiny_model, pref_data, out, "--loss", loss, "--lr", "1e-3")
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["update_norm"] > 0 and records[-1]["loss"] != records[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == loss and config["objective"] == {
        name: redi.OBJECTIVES[name].hparams for name in re.findall(r"[a-z_]+", loss)}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = redi.load_pairs(pref_data, tok, 800, 19_000)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    first = [pairs[i] for i in data.batch_for_step(0, len(pairs), 8, 0)]
    with torch.no_grad():
        lp = [(naive_token_logps(lm, q, w), naive_token_logps(lm, q, l)) for q, w, l in first]
    x_w = torch.stack([w.sum() / len(w) for w, _ in lp])
    x_l = torch.stack([l.sum() / len(l) for _, l in lp])
    if loss == "redi_suffix":
        d = [numpy_divergence(w, l) for _, w, l in first]
        suffix = torch.stack([ll[k:].sum() / max(1, len(ll) - k) for (_, ll), k in zip(lp, d)])
        expected = (-x_w + 0.8 * suffix).mean()
        assert any(k > 0 for k in d)  # "<think>" is shared: the suffix objective is not REDI here
    elif loss == "redi_negw":
        expected = (-x_w + 0.8 * x_l * torch.exp(x_l)).mean()
    else:
        assert "| upd " in proc.stdout and {"loss_redi", "loss_dpo"} <= records[0].keys()
        assert records[0]["loss_dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
        expected = (-x_w + 0.8 * x_l).mean() + 0.5 * math.log(2)
    assert records[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)
