"""fast.py, the speed machinery, against the plain path (--plain) and the plain math: the whole optimiser step of
sft.py and of every objective in redi.OBJECTIVES (losses, statistics, gradients, update norm), the packed log-probs
against one sequence at a time, the LM head's hand-written backward against full logits (and the memory it holds),
the MLPs and norms that save less for backward bit for bit against the model's own, and the update norm from
AdamW's state against the difference of the weights."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, write_jsonl
from test_redi import pref_rows
from test_sft import naive_logps, sft_rows
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import common
import data
import fast
import redi
import sft
from common import TokenLogprobs

# -----------------------------------------------------------------------------
# the whole step: --plain against the fast path, through the scripts' own build_model and train_step

STAGES = ["sft", *redi.OBJECTIVES]  # a new objective in the table is covered without a new line here
# fp32 tolerances, plain against fast, each at least 5x the largest difference seen here: statistics to RTOL (seen:
# 1.7e-7); DPO's margin, a difference of sums over ~2,000 tokens that starts at 0, to MARGIN_ATOL (seen: 6.1e-5);
# gradient entries to GRAD_RTOL plus GRAD_ATOL (seen: 8.8e-8 at most, on entries up to 0.24); the plain update norm
# against AdamW's state to UPDATE_RTOL (seen: 1.8e-7). A bug in either path (attention across sequences, a wrong
# log-prob) moves them by 1e-3 or more.
RTOL, MARGIN_ATOL = 1e-5, 3e-4
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
UPDATE_RTOL = 2e-6


@pytest.fixture(scope="module")
def examples(tiny_model, tmp_path_factory):
    """(SFT examples, pairs), tokenised as sft.py and redi.py tokenise them."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = sft_rows(12, seed=3)
    sft_examples = data.encode_chats(tok, [r["problem"] for r in rows], [r["response"] for r in rows])
    assert None not in sft_examples
    pref = write_jsonl(tmp_path_factory.mktemp("fast") / "pref.jsonl", pref_rows(8, seed=3))
    return sft_examples, redi.load_pairs(pref, tok, 800, 19_000)


def run_steps(stage, flags, model_dir, device, examples, steps=2):
    """`steps` optimiser steps of sft.py's or redi.py's train_step (redi.py's with --loss stage), the model built by
    common.build_model from the script's own parser, 2 micro-batches a step, several sequences per packed row.
    Returns the built model and, per step, (statistics on the host, the gradients AdamW stepped with, the update
    norm from AdamW's state)."""
    flags = ["--model", str(model_dir), "--data", "-", "--out", "-", "--lr", "1e-3", "--batch-size", "4",
             "--micro-batch-size", "2", *flags]
    if stage == "sft":
        args, items = sft.parser.parse_args(flags), examples[0]
        lengths = [len(ids) for ids, *_ in items]
    else:
        args, items = redi.parser.parse_args(flags + ["--loss", stage]), examples[1]
        objective = redi.resolve_objective(args)
        lengths = [2 * len(p) + len(w) + len(l) for p, w, l in items]
    model, optimizer, _ = common.build_model(args, device)
    ref = None
    if stage != "sft" and objective.needs_reference:
        ref = redi.reference_logps(model, items, args, device).to(device)  # (N, 2)
    model.train()
    stepped, step = [], optimizer.step

    def record_and_step(*a, **kw):  # the gradients after clipping, as AdamW takes them
        stepped.append([common.local_shard(p.grad).clone() for p in model.parameters()])
        return step(*a, **kw)
    optimizer.step = record_and_step
    results = []
    for s in range(steps):
        micro = data.micro_batches(data.batch_for_step(s, len(items), args.batch_size, args.seed), lengths,
                                   args.micro_batch_size, 0, 1)
        if stage == "sft":
            batches = [data.pack([items[i] for i in mb]).to(device) for mb in micro]
            stats = sft.train_step(model, optimizer, batches, args.lr, args, device)
        else:
            batches = [(redi.pack_pairs([items[i] for i in mb]).to(device), mb) for mb in micro]
            stats = redi.train_step(model, optimizer, batches, ref, args.lr, objective, args, device)
        results.append((common.to_host(stats, device), stepped[-1], fast.adamw_update_sq(optimizer).sqrt().item()))
    return model, results


@pytest.mark.parametrize("checkpointing", [False, True], ids=["save-less", "checkpointed"])
@pytest.mark.parametrize("stage", STAGES)
def test_plain_step_equals_fast_step(stage, checkpointing, tiny_model, device, examples):
    """Two optimiser steps, fast and --plain, from the same weights on the same batches, in fp32, with and without
    activation checkpointing: every logged statistic and every gradient entry must agree to fp32 rounding (the
    paths sum in other orders; tolerances above). Not reward_accuracy: it is the share of margins above 0, and at
    DPO's first step (policy = reference) each margin is 0 up to rounding. The plain run's update norm is the
    difference of its weights; it must equal what fast.adamw_update_sq finds from AdamW's state for the same step
    (LR 1e-3: the updates stand far above the weights' fp32 rounding)."""
    flags = ["--grad-checkpointing"] if checkpointing else []
    fast_model, fast_run = run_steps(stage, flags, tiny_model, device, examples)
    plain_model, plain_run = run_steps(stage, flags + ["--plain"], tiny_model, device, examples)
    lm, plain_lm = fast_model.lm, plain_model.lm
    assert (lm.config._attn_implementation, plain_lm.config._attn_implementation) == ("packed_sdpa", "sdpa")
    assert "forward" not in vars(plain_lm.model.layers[0].mlp)  # the model's own modules
    assert ("forward" in vars(lm.model.layers[0].mlp)) == (not checkpointing)  # fast.save_less_for_backward
    for (stats, grads, _), (plain_stats, plain_grads, from_state) in zip(fast_run, plain_run):
        assert stats.keys() == plain_stats.keys()
        for key in stats.keys() - {"reward_accuracy"}:
            atol = MARGIN_ATOL if key == "margin" else 0
            assert plain_stats[key] == pytest.approx(stats[key], rel=RTOL, abs=atol), key
        for g, plain_g in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(plain_g, g, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        assert plain_stats["update_norm"] == pytest.approx(from_state, rel=UPDATE_RTOL)


def test_plain_with_packed_sdpa_is_an_error(tiny_model, tmp_path):
    """--plain runs transformers' attention; naming fast.py's packed_sdpa with it stops with one sentence."""
    data_path = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    proc = run_script("sft.py", "--model", tiny_model, "--data", data_path, "--out", tmp_path / "out", "--batch-size",
                      8, "--plain", "--attn-implementation", "packed_sdpa", check=False)
    assert proc.returncode == 2 and "--plain runs transformers' own attention and --attn-implementation " \
        "packed_sdpa is fast.py's" in proc.stdout and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# the log-probs: packed rows, the LM head


@pytest.mark.parametrize("attn, plain", [("packed_sdpa", False), ("sdpa", False), ("sdpa", True)],
                         ids=["fast", "fast-head-sdpa", "plain"])
def test_packed_logprobs_equal_naive_values_and_gradients(attn, plain):
    """Three sequences packed in one row (attention must not cross them) and a head in chunks of 7 tokens (or, plain,
    common.token_logps on the whole logits), against each sequence alone with full logits. Values in fp32 (what a CPU
    run computes) to 1e-5. Gradients in fp64: in fp32 the two paths sum in different orders and a few of the 4.9M
    gradient entries differ by ~1e-5, varying from run to run (CI once saw 1.7e-5): too close to any tolerance to
    tell a bug from rounding. In fp64 both paths must agree to rounding. packed_sdpa (the default) runs SDPA per
    sequence; with sdpa, transformers (5.x) builds the block-diagonal mask from the position ids that restart at each
    sequence (masking_utils.find_packed_sequence_indices): a plain causal mask would let sequences 2 and 3 see 1."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = Qwen2ForCausalLM(copy.deepcopy(config)).float()
    seqs = [(torch.randint(0, 151_936, (n,)).tolist(), p) for n, p in [(37, 5), (20, 19), (29, 1)]]
    batch = data.pack(seqs)
    assert batch.input_ids.shape == (1, 86) and batch.lengths.tolist() == [32, 1, 28]
    fast.register_packed_sdpa()
    lm.config._attn_implementation = attn
    naive_lm = Qwen2ForCausalLM(config).float()  # the naive side: plain sdpa, one sequence at a time
    assert naive_lm.config._attn_implementation == "sdpa"
    naive_lm.load_state_dict(lm.state_dict())

    def both(lm, naive_lm):
        chunked = TokenLogprobs(lm, chunk_size=7, plain=plain)(*batch.model_inputs)
        chunked.sum().backward()
        grads = [p.grad.clone() for p in lm.parameters()]
        naive = naive_logps(naive_lm, seqs)
        naive.sum().backward()
        return chunked, naive, grads

    chunked, naive, _ = both(lm, naive_lm)
    assert chunked.shape == (61,)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=0)
    lm.zero_grad()
    naive_lm.zero_grad()
    chunked64, naive64, grads = both(lm.double(), naive_lm.double())
    torch.testing.assert_close(chunked64, naive64, atol=1e-10, rtol=0)
    for g, p in zip(grads, naive_lm.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-10, rtol=1e-8)
    lm.float()
    with torch.no_grad():  # the no-grad path (reference log-probs) is the same function without checkpointing
        torch.testing.assert_close(TokenLogprobs(lm, 1000, plain)(*batch.model_inputs), chunked)
    sums = common.sequence_logps(TokenLogprobs(lm, plain=plain), batch)  # (S,): each sequence's response log-prob
    torch.testing.assert_close(sums, torch.stack([t.sum() for t in naive.detach().split([32, 1, 28])]),
                               atol=1e-4, rtol=0)


def full_logits_logps(h, weight, bias, targets):
    """The trusted side: every row's whole (V,) logits in float64 through common.token_logps, the definition."""
    logits = F.linear(h.double(), weight.double(), None if bias is None else bias.double())  # (R, V)
    return common.token_logps(logits, targets)  # (R,)


def head_inputs(rows, tied, dtype, seed=0):
    """Leaves (ids or h, weight, bias, projection) and a function that builds the head's input from them: h is a
    leaf, or with `tied` the embedding of token ids under the head's own weight, projected, so that the weight's
    gradient must add the head's part to the embedding's."""
    g = torch.Generator().manual_seed(seed)
    V, H = 300, 6
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (rows,), generator=g)
    if tied:
        ids, proj = torch.randint(0, V, (rows,), generator=g), torch.randn(H, H, generator=g, dtype=dtype)
        proj.requires_grad_()
        return (weight, bias, proj), lambda w, b, p: (F.embedding(ids, w) @ p, w, b), targets
    h = torch.randn(rows, H, generator=g, dtype=dtype).requires_grad_()
    return (h, weight, bias), lambda h, w, b: (h, w, b), targets


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, chunk_size", [(13, 13), (13, 4), (13, 1), (12, 4), (13, 1000), (1, 1), (1, 256)])
def test_head_logprobs_equal_full_logits_values_and_gradients(rows, chunk_size, dtype, tol, tied):
    """fast.HeadLogprobs (the LM head's log-probs with a hand-written backward) against the full logits in
    float64 through autograd: values and the gradients of h, weight and bias, under an uneven upstream gradient.
    Chunk sizes that divide the rows, that do not, one row per chunk, one chunk for all, and a single row. In
    float64 both must agree to rounding (1e-12); in float32 to 1e-5 (relative, and absolute for near-zero
    entries). `tied`: the weight is also the embedding that makes h."""
    leaves, build, targets = head_inputs(rows, tied, dtype)
    upstream = torch.linspace(-1.0, 2.0, rows, dtype=torch.float64)  # (R,): a loss that weighs rows unevenly
    logps = fast.HeadLogprobs.apply(*build(*leaves), targets, chunk_size)
    assert logps.dtype == dtype and logps.shape == (rows,)
    grads = torch.autograd.grad(logps, leaves, upstream.to(dtype))
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    reference = full_logits_logps(*build(*leaves64), targets)
    reference_grads = torch.autograd.grad(reference, leaves64, upstream)
    torch.testing.assert_close(logps.double(), reference, atol=tol, rtol=tol)
    for g, r in zip(grads, reference_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)
    with torch.no_grad():  # the reference pass of DPO: the same values, no graph
        no_grad = fast.HeadLogprobs.apply(*build(*leaves), targets, chunk_size)
    assert no_grad.grad_fn is None and torch.equal(no_grad, logps.detach())


def test_head_logprobs_in_bf16_upcast_to_fp32():
    """A GPU's path: bf16 weights and hidden states, logits upcast to fp32 for the softmax. The log-probs come out
    in fp32, the gradients in bf16, both as close to float64 as bf16 inputs allow (the float64 side starts from
    the same bf16-rounded numbers; bf16 keeps 8 bits: 1% of each gradient entry)."""
    (h, weight, bias), build, targets = head_inputs(13, False, torch.bfloat16)
    logps = fast.HeadLogprobs.apply(h, weight, bias, targets, 5)
    assert logps.dtype == torch.float32
    grads = torch.autograd.grad(logps.sum(), (h, weight, bias))
    leaves64 = [x.detach().double().requires_grad_() for x in (h, weight, bias)]
    reference = full_logits_logps(*leaves64, targets)
    torch.testing.assert_close(logps.double(), reference, atol=0.05, rtol=0)  # bf16 logits: 0.4% of ~10 (0.02 seen)
    for g, r in zip(grads, torch.autograd.grad(reference.sum(), leaves64)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, atol=0.02, rtol=0.02)


def checkpointed_head_logps(h, weight, bias, targets, chunk_size):
    """The path HeadLogprobs replaced, kept here only to show what the memory test tells apart: each chunk's
    F.linear + cross-entropy under activation checkpointing, differentiated by autograd."""
    def chunk(h, weight, bias, targets):
        return -F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="none")
    return torch.cat([checkpoint(chunk, h[i:i + chunk_size], weight, bias, targets[i:i + chunk_size],
                                 use_reentrant=False) for i in range(0, h.shape[0], chunk_size)])


def peak_bytes_allocated(fn):
    """The highest total of CPU bytes allocated and not yet freed while fn runs, from the profiler's allocation
    events in time order (the same records torch's own memory profiler reads)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:  # nbytes: + for an allocation, - for a free
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def test_head_backward_holds_one_chunk_of_logits():
    """Memory by design: forward and backward of HeadLogprobs each hold one (chunk, V) fp32 buffer at a time, on
    top of the gradients they return (measured: 1.06 and 1.00 buffers). The checkpointed path it replaced held 3
    in backward (logits, log-softmax, their gradients) and 2 in forward: the test tells them apart."""
    V, H, R, chunk_size = 50_000, 4, 40, 16
    h, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in [(R, H), (V, H), (V,)])
    targets = torch.randint(0, V, (R,))
    buffer, grads = chunk_size * V * 4, (V * H + V + R * H) * 4  # bytes: one fp32 chunk of logits; the gradients
    held = {}  # in buffers: (backward beyond the gradients, forward)
    for name, head in [("hand-written", fast.HeadLogprobs.apply), ("checkpointed", checkpointed_head_logps)]:
        logps = head(h, weight, bias, targets, chunk_size)
        backward = peak_bytes_allocated(lambda: torch.autograd.grad(logps.sum(), (h, weight, bias)))
        forward = peak_bytes_allocated(lambda: head(h, weight, bias, targets, chunk_size))
        held[name] = ((backward - grads) / buffer, forward / buffer)
    assert held["hand-written"][0] < 1.25 and held["hand-written"][1] < 1.25, held
    assert held["checkpointed"][0] > 2.75 and held["checkpointed"][1] > 1.75, held  # so the bounds above can fail


# -----------------------------------------------------------------------------
# MLPs and norms that save less for backward


def saved_activation_bytes(fn, params):
    """Bytes of the distinct tensors, other than `params`, that autograd saves for backward while fn runs."""
    saved, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def tiny_lm(arch, **extra):
    kw = dict(vocab_size=100, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, **extra)
    torch.manual_seed(0)
    return (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).float()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_mlp_saving_less_is_the_models_mlp_bit_for_bit(arch):
    """fast.save_less_for_backward, the MLPs: output and every gradient equal the model's own MLP exactly (fp32:
    the same operations in the same order), while autograd keeps the MLP's input, g and u (H + 2I floats a token)
    instead of also silu(g) and the product (H + 4I). An MLP of another shape is left alone."""
    lm = tiny_lm(arch)
    H, I, N = 16, 48, 10
    x = torch.randn(1, N, H)
    grad_out = torch.randn(1, N, H)
    results = []
    for fused in (False, True):
        mlp = lm.model.layers[0].mlp
        if fused:
            assert fast.save_less_for_backward(lm) == 2 + 5  # 2 MLPs; 2 norms a layer and the final one
        x_ = x.clone().requires_grad_()
        out, nbytes = saved_activation_bytes(lambda: mlp(x_), mlp.parameters())
        grads = torch.autograd.grad(out, [x_, *mlp.parameters()], grad_out)
        results.append((out, grads, nbytes))
    (out, grads, nbytes), (out_f, grads_f, nbytes_f) = results
    assert torch.equal(out, out_f)
    for g, g_f in zip(grads, grads_f):
        assert torch.equal(g, g_f)
    assert (nbytes, nbytes_f) == (4 * N * (H + 4 * I), 4 * N * (H + 2 * I))
    gelu = tiny_lm("qwen2", hidden_act="gelu")
    assert fast.save_less_for_backward(gelu) == 5 and "forward" not in vars(gelu.model.layers[0].mlp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_saving_less_is_the_models_norm_bit_for_bit(dtype):
    """fast.save_less_for_backward, the RMSNorms: output and gradients equal the model's own norm exactly (the same
    operations, backward in autograd's order), while autograd keeps x and one fp32 float a row: the model's norm
    also keeps an fp32 tensor of x's size (x in fp32 and the normalised rows, one of them x itself in fp32)."""
    lm = tiny_lm("qwen2").to(dtype)
    N, H = 12, 16
    torch.manual_seed(1)
    x, grad_out = torch.randn(2, N, H, dtype=dtype) * 3, torch.randn(2, N, H, dtype=dtype)
    norms = lambda: (lm.model.layers[0].input_layernorm, lm.model.norm)  # noqa: E731
    with torch.no_grad():
        for norm in norms():
            norm.weight.normal_()  # not all ones: the weight's gradient must be right
    results = []
    for fused in (False, True):
        if fused:
            fast.save_less_for_backward(lm)
        for norm in norms():
            x_ = x.clone().requires_grad_()
            out, nbytes = saved_activation_bytes(lambda: norm(x_), [norm.weight])
            results.append((out, torch.autograd.grad(out, [x_, norm.weight], grad_out), nbytes))
    for (out, grads, nbytes), (out_f, grads_f, nbytes_f) in zip(results[:2], results[2:]):
        assert torch.equal(out, out_f)
        for g, g_f in zip(grads, grads_f):
            assert torch.equal(g, g_f)
        assert nbytes_f == x.numel() * x.element_size() + 2 * N * 4  # x, and 1 / rms of each row in fp32
        assert nbytes == nbytes_f + x.numel() * 4  # the model's norm also keeps an fp32 tensor of x's size


# -----------------------------------------------------------------------------
# the update norm


def test_update_norm_from_adamw_state_equals_the_weights_difference():
    """fast.adamw_update_sq gives ||theta_{t+1} - theta_t|| from AdamW's state instead of copying theta_t: it must
    equal the difference of the weights, in fp64 (where the difference carries no visible rounding), over several
    steps (bias corrections change), both parameter groups (decayed and not), and groups of tensors split small."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 30)).double()
    optimizer = common.make_optimizer(model, 1e-2, 0.1)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 4]
    for _ in range(3):
        model(torch.randn(8, 50, dtype=torch.float64)).pow(2).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        diff = sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before))
        assert diff > 1e-4
        for chunk_numel in (1000, 2**26):  # 5 groups of tensors; 1 per parameter group
            assert fast.adamw_update_sq(optimizer, chunk_numel).item() == pytest.approx(diff.item(), rel=1e-9)




def test_update_norm_accumulates_in_fp64():
    """16.8M elements of 0.1: summed in fp32, their norm read 0.9% low on this CPU; the update norm must match the
    same formula in fp64. AdamW state set by hand so that u = m_hat / (sqrt(v_hat) + eps) is 0.1 everywhere."""
    n, lr = 2**24, 1e-3
    p = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0, eps=0.0, fused=True)
    p.grad = torch.ones(n)
    opt.step()  # step 1: m = 0.1, v = 0.001 (betas 0.9, 0.999), so m_hat = 1 and v_hat = 1
    opt.state[p]["exp_avg"].mul_(0.1)  # m_hat = 0.1: u = 0.1
    exact = n * 0.1 ** 2 * lr ** 2  # lr^2 * sum(u^2), weight decay 0
    assert float(fast.adamw_update_sq(opt)) == pytest.approx(exact, rel=1e-6)
