"""sft.py and the plumbing it shares: the schedule, 1-rank vs 2-rank losses, the step's loss against the naive
mean NLL, resume, checkpoints that reload, and failures that stop cleanly. The speed machinery (fast.py) against
the plain path: tests/test_fast.py."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import common
import data
import demo
import redi
from common import lr_at
from sft import load_sft_examples


def sft_rows(n, seed=0):
    """Conversations of very different lengths (10 to ~600 tokens with the byte-level tokenizer)."""
    rng = np.random.default_rng(seed)
    words = ["carry", "add", "seven", "so", "the", "sum", "is", "wait", "check", "+", "="]
    return [{"problem": f"Problem {i}: " + " ".join(rng.choice(words, rng.integers(1, 30))),
             "response": "<think>\n" + " ".join(rng.choice(words, rng.integers(1, 120))) + f"\n</think>\n\\boxed{{{i}}}"}
            for i in range(n)]


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows(40))


def sft(model, data_path, out, *flags, nproc=1, check=True):
    return run_script("sft.py", "--model", model, "--data", data_path, "--out", out, "--batch-size", 8,
                      "--micro-batch-size", 2, "--epochs", 1, "--lr", 1e-3, *flags, nproc=nproc, check=check)


def losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(out / "metrics.jsonl")]


# -----------------------------------------------------------------------------
# log-probs the naive way: the trusted side here and in tests/test_fast.py


def naive_logps(lm, sequences):
    """Each sequence alone through the full model, the whole (T, V) logits tensor at once: log p of each response
    token, concatenated in order. What common.TokenLogprobs must reproduce with packing, plain or fast."""
    out = []
    for ids, n_prompt in sequences:
        logits = lm(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
        logps = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)  # (T-1,)
        out.append(logps[n_prompt - 1:])  # position t predicts token t + 1: the response tokens
    return torch.cat(out)


# -----------------------------------------------------------------------------
# schedule


def test_warmup_then_linear_decay_to_zero():
    # 20 steps: warmup = ceil(0.1 * 20) = 2 steps rising from 0, the peak at step 2, then falling towards 0
    lrs = [lr_at(s, 20, 1.0) for s in range(20)]
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[11] == pytest.approx(9 / 18) and lrs[19] == pytest.approx(1 / 18)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    # 1,661 steps (PAPER.md §3): 167 warmup steps
    assert lr_at(166, 1661, 1e-6) < 1e-6 and lr_at(167, 1661, 1e-6) == 1e-6


@pytest.mark.parametrize("total,frac", [(20, 0.1), (1661, 0.1), (3030, 0.1), (7, 0.1), (5, 0.5), (10, 0.0)])
def test_schedule_is_transformers_linear_schedule_with_warmup(total, frac):
    """The authors trained with the HF Trainer's linear schedule: warmup steps = ceil(ratio * total), and the LR
    of optimiser step s (from 0) is peak * lambda(s). Compared here with transformers' own scheduler, stepped
    as the Trainer steps it (the LR is read before each optimizer.step())."""
    from transformers import get_linear_schedule_with_warmup
    peak = 5e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(frac * total), total)
    for s in range(total):
        assert lr_at(s, total, peak, frac) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-20), s
        opt.step()
        sched.step()


# -----------------------------------------------------------------------------
# the script, end to end


def test_two_ranks_give_the_one_rank_losses(tiny_model, sft_data, tmp_path):
    """Also with activation checkpointing on the 2-rank side: recomputing must not change the numbers."""
    sft(tiny_model, sft_data, tmp_path / "one")
    sft(tiny_model, sft_data, tmp_path / "two", "--grad-checkpointing", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _, _ in one] == [1, 2, 3, 4, 5]
    for (_, l1, g1), (_, l2, g2) in zip(one, two):
        assert abs(l1 - l2) < 1e-5 and abs(g1 - g2) < 1e-4
    assert one[-1][1] < one[0][1] - 0.05  # and it learns
    # tokens: every token of the step's 8 packed sequences (prompts included), summed over both ranks
    tok = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [len(ids) for ids, _ in data.encode_chats(tok, *zip(*[(r["problem"], r["response"]) for r in sft_rows(40)]))]
    assert read_jsonl(tmp_path / "two/metrics.jsonl")[0]["tokens"] == sum(lengths[i] for i in data.batch_for_step(0, 40, 8, 0))


REDUCTIONS = """
import os, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, ".")
import common, fast, sft
from data import pack
rank, world, device = common.init_dist()
fast.register_packed_sdpa()
torch.manual_seed(0)
config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=128, attn_implementation="packed_sdpa")
model = common.shard_model(Qwen2ForCausalLM(config), device)  # 4 FSDP units: 3 layers and the root
calls, reduce_scatter = [], dist.reduce_scatter_single
dist.reduce_scatter_single = lambda *a, **k: calls.append(1) or reduce_scatter(*a, **k)
g = torch.Generator().manual_seed(rank)
batches = [pack([(torch.randint(1, 128, (20 + 5 * i,), generator=g).tolist(), 4)]) for i in range(3)]
sft.train_step(model, common.make_optimizer(model, 1e-3, 0.0), batches, 1e-3, SimpleNamespace(max_grad_norm=1.0, plain=False),
               device)
print(f"rank {rank}: {len(calls)} reduce-scatters")
common.cleanup()
# a rank has still aborted at interpreter exit after printing the right counts ("terminate called without an active
# exception", gloo's threads torn down; 2 of ~10 suite runs): leave without that teardown, nothing is left to do
sys.stdout.flush()
os._exit(0)
"""


def test_two_ranks_reduce_gradients_once_per_step(tmp_path):
    """With 2 ranks and 3 micro-batches, each FSDP unit reduce-scatters its gradients once per step (after the last
    micro-batch), not once per micro-batch (12 calls). test_two_ranks_give_the_one_rank_losses checks the numbers."""
    script = tmp_path / "reductions.py"
    script.write_text(REDUCTIONS)
    out = run_script(script, nproc=2).stdout
    assert "rank 0: 4 reduce-scatters" in out and "rank 1: 4 reduce-scatters" in out, out


def test_more_sequences_per_row_give_the_same_losses(tiny_model, sft_data, tmp_path):
    """run.sh paper packs 4 sequences per forward (fewer forwards: less host time per step on a GPU). The loss is
    normalised by the step's response-token count, so only the order of the sums may change."""
    sft(tiny_model, sft_data, tmp_path / "one", "--micro-batch-size", 1)
    sft(tiny_model, sft_data, tmp_path / "four", "--micro-batch-size", 4)
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert [s for s, _, _ in four] == [1, 2, 3, 4, 5]
    for (_, l1, g1), (_, l2, g2) in zip(one, four):
        assert abs(l1 - l2) < 1e-5 and abs(g1 - g2) < 1e-4


@pytest.mark.parametrize("checkpointing", [["--grad-checkpointing"], []], ids=["checkpointed", "mlps-save-less"])
def test_compiled_layers_give_the_eager_losses(checkpointing, tiny_model, sft_data, tmp_path):
    """--compile (each decoder layer's forward through torch.compile: with activation checkpointing, whose wrapper
    is then compiled too; without it, the MLPs' hand-written backward) must train as the eager path does: every
    step's loss and gradient norm to 1e-5 (fp32 on a CPU; the compiled kernels may sum in other orders). Slow: ~1
    min of compiling each."""
    sft(tiny_model, sft_data, tmp_path / "eager", *checkpointing)
    sft(tiny_model, sft_data, tmp_path / "compiled", *checkpointing, "--compile")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _, _ in compiled] == [1, 2, 3, 4, 5]
    for (_, l1, g1), (_, l2, g2) in zip(eager, compiled):
        assert abs(l1 - l2) < 1e-5 and abs(g1 - g2) < 1e-5


def test_step_one_loss_is_the_plain_mean_nll(tiny_model, sft_data, tmp_path):
    """Step 1's logged loss = the mean over all response tokens of the step's 8 examples of -log p, computed the
    naive way. A loss normalised per micro-batch (4 of 2 examples, of different lengths) would not match."""
    sft(tiny_model, sft_data, tmp_path / "out", "--stop-at-step", 1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = sft_rows(40)
    seqs = data.encode_chats(tok, [r["problem"] for r in rows], [r["response"] for r in rows])
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        nll = {i: -naive_logps(lm, [seqs[i]]) for i in data.batch_for_step(0, 40, 8, 0)}  # per example, per token
    plain = torch.cat(list(nll.values())).mean().item()
    micro = data.micro_batches(list(nll), [len(s[0]) for s in seqs], 2, 0, 1)
    per_micro_batch = sum(torch.cat([nll[i] for i in mb]).mean().item() for mb in micro) / len(micro)
    assert abs(plain - per_micro_batch) > 1e-4  # distinguishable: 10x the tolerance below
    assert read_jsonl(tmp_path / "out/metrics.jsonl")[0]["loss"] == pytest.approx(plain, abs=1e-5)


def test_resume_equals_uninterrupted(tiny_model, sft_data, tmp_path):
    sft(tiny_model, sft_data, tmp_path / "full")
    sft(tiny_model, sft_data, tmp_path / "cut", "--stop-at-step", 2)
    assert [s for s, _, _ in losses(tmp_path / "cut")] == [1, 2]
    # what a crash leaves behind: a half-written checkpoint and a logged step past the last checkpoint
    (tmp_path / "cut/ckpt/step_000003.tmp").mkdir()
    with (tmp_path / "cut/metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0, "grad_norm": 0.0}) + "\n" + '{"step": 4, "lo')  # cut mid-line
    proc = sft(tiny_model, sft_data, tmp_path / "cut", "--resume")
    assert "resuming after step 2" in proc.stdout and "dropped a damaged line" in proc.stdout
    resumed, full = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4, 5]
    assert [x for r in resumed for x in r] == pytest.approx([x for r in full for x in r], abs=1e-6)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full/final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut/final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_checkpoint_is_a_model_folder_that_reloads(arch, tiny_model, sft_data, tmp_path):
    """With LR 0 the saved weights must be the starting weights, bit for bit (tied and untied heads)."""
    if arch == "llama":
        start = tmp_path / "llama"
        tok = demo.demo_tokenizer()
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=False)).save_pretrained(start)
        tok.save_pretrained(start)
    else:
        start = tiny_model
    sft(start, sft_data, tmp_path / "out", "--lr", 0, "--stop-at-step", 1)
    ckpt = tmp_path / "out/ckpt/step_000001"
    saved, initial = (AutoModelForCausalLM.from_pretrained(p) for p in (ckpt, start))
    assert type(saved) is type(initial)
    assert saved.config.tie_word_embeddings == (arch == "qwen2")
    for (k, v), (k2, v2) in zip(saved.state_dict().items(), initial.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert json.loads((ckpt / "run_config.json").read_text())["lr"] == 0
    assert (ckpt / "tokenizer.json").exists() and (tmp_path / "out/config.json").exists()


def test_eos_is_appended_unless_turned_off(tiny_model, sft_data, tmp_path):
    """Each example ends with the tokenizer's EOS, as the authors' TRL trainer appends it; --no-append-eos drops
    it: every sequence of the step is one token shorter, and config.json says which."""
    tok = demo.demo_tokenizer()
    with_eos = load_sft_examples(sft_data, tok, 10_000)
    without = load_sft_examples(sft_data, tok, 10_000, append_eos=False)
    assert [(ids[:-1], n) for ids, n, _ in with_eos] == [(ids, n) for ids, n, _ in without]
    assert {ids[-1] for ids, _, _ in with_eos} == {tok.eos_token_id}
    sft(tiny_model, sft_data, tmp_path / "eos", "--stop-at-step", 1)
    sft(tiny_model, sft_data, tmp_path / "no_eos", "--stop-at-step", 1, "--no-append-eos")
    a, b = (read_jsonl(tmp_path / out / "metrics.jsonl")[0] for out in ("eos", "no_eos"))
    assert a["tokens"] == b["tokens"] + 8  # one EOS per sequence, batch 8
    assert [json.loads((tmp_path / out / "config.json").read_text())["append_eos"] for out in ("eos", "no_eos")] == \
        [True, False]


def test_sft_keeps_the_eos_as_input_but_does_not_train_it(qwen_tokenizer, tmp_path):
    """The authors' SFT collator drops the label of every pad token, and their pad token is the EOS: on the real
    Qwen2.5 tokenizer, each SFT sequence keeps the appended <|endoftext|> as its last input token but trains one
    response token fewer than stage 2 counts in |y| for the same trace; --train-eos trains it."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer)
    rows = [{"problem": f"What is {a} + {a}?", "response": f"<think>\n{a} + {a} = {2 * a}\n</think>\n\\boxed{{{2 * a}}}"}
            for a in (7, 123, 4096)]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", rows)
    pref_file = write_jsonl(tmp_path / "pref.jsonl", [{"problem": r["problem"], "chosen": r["response"],
                                                       "rejected": r["response"] + " no"} for r in rows])
    default = load_sft_examples(sft_file, tok, 10_000)
    trained = load_sft_examples(sft_file, tok, 10_000, train_eos=True)
    pairs = redi.load_pairs(pref_file, tok, 800, 19_000)
    for (ids, n_prompt, n_trained), (ids2, _, n_trained2), (prompt, chosen, _) in zip(default, trained, pairs):
        assert ids == ids2 and ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") == 151643
        assert ids[-3:-1] == tok.encode("<|im_end|>\n")  # the end of the turn stays trained
        assert ids[n_prompt:] == chosen and n_trained == len(chosen) - 1 and n_trained2 == len(chosen)
    packed, packed_all = data.pack(default), data.pack(trained)
    assert packed.input_ids.equal(packed_all.input_ids)  # the same rows in, one target fewer per sequence
    assert (packed_all.lengths - packed.lengths).tolist() == [1, 1, 1]
    assert redi.pack_pairs(pairs).packed.lengths.view(-1, 2)[:, 0].tolist() == [len(w) for _, w, _ in pairs]


def test_context_window_overrides(tiny_model):
    """PAPER.md §2: the authors widen Qwen2.5-Math's window with max_position_embeddings 32768, rope_theta 300000."""
    lm = common.load_model(str(tiny_model), max_position_embeddings=32768, rope_theta=300000.0)
    assert lm.config.max_position_embeddings == 32768 and lm.config.rope_parameters["rope_theta"] == 300000.0
    dim = lm.config.hidden_size // lm.config.num_attention_heads
    expected = 1.0 / 300000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, expected)  # the rotary embedding uses the new theta


def test_nan_loss_stops_with_a_clear_message(tiny_model, sft_data, tmp_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        lm.model.norm.weight[0] = math.nan
    lm.save_pretrained(tmp_path / "nan_model")
    demo.demo_tokenizer().save_pretrained(tmp_path / "nan_model")
    proc = sft(tmp_path / "nan_model", sft_data, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "the loss is nan at step 1" in proc.stdout
    assert not any((tmp_path / "out/ckpt").iterdir())  # made (and checked writable) before any work; left empty


def test_bad_inputs_are_one_sentence(tiny_model, sft_data, tmp_path):
    proc = sft(tiny_model, sft_data, tmp_path / "out", "--micro-batch-size", 3, check=False)
    assert proc.returncode == 2 and "must be a multiple of --micro-batch-size 3" in proc.stdout
    proc = sft(tmp_path, sft_data, tmp_path / "out", check=False)  # a folder that holds no model
    assert proc.returncode == 2 and "is a folder with no tokenizer.json" in proc.stdout and proc.stderr == ""
    proc = sft(sft_data, sft_data, tmp_path / "out", check=False)  # a file
    assert proc.returncode == 2 and "is a file; expected a model folder" in proc.stdout and proc.stderr == ""
    proc = sft(tiny_model, sft_data, sft_data, check=False)  # --out is a file
    assert proc.returncode == 2 and "is a file; expected a folder for the run" in proc.stdout and proc.stderr == ""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}])
    proc = sft(tiny_model, bad, tmp_path / "out", check=False)
    assert proc.returncode == 2 and f"{bad}, line 1 lacks the field 'response'" in proc.stdout
