"""Speed machinery: what sft.py and redi.py run by default so that a step takes less memory and time. The method
reads without it: with `--plain` (common.add_training_args) the scripts run the plain path instead, and
tests/test_fast.py checks that both paths give the same losses and gradients.

What each piece buys (measured), and what --plain runs in its place:
- packed_sdpa: attention over a packed row without a (tokens x tokens) mask: 2.5 GB less than transformers' sdpa
  for one 11,443-token pair on the CPU benchmark model. --plain: transformers' sdpa, whose block-diagonal mask
  comes from the position ids that restart at each sequence.
- HeadLogprobs: the LM head's log-probs in chunks with a hand-written backward: one (chunk, vocabulary) fp32
  buffer at a time (156 MB at 256 x 151,936) where autograd through checkpointed chunks held three. --plain:
  the full (response tokens, vocabulary) logits, log_softmax and gather (common.token_logps, the definition).
- save_less_for_backward: MLPs and RMSNorms that keep less for backward, bit for bit the model's values and
  gradients. The MLPs' four (tokens, intermediate) tensors were 55% of the activations of one 8,704-token pair;
  the norms took the pair step's allocation peak from 1.20 to 1.13 GB (both profiled). --plain: the model's
  own modules.
- adamw_update_sq: the update norm from AdamW's state, without a copy of the weights (6 GB at 1.5B parameters,
  which set the step's peak memory). --plain: the difference of the weights before and after the step.
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# attention over a packed row


def packed_sdpa(module, query, key, value, attention_mask, seq_bounds=None, **kwargs):
    """Attention for a packed row (data.Packed): PyTorch's SDPA with its causal kernel, run on each sequence of
    the row in turn, so attention never crosses sequences and no (tokens x tokens) mask is ever built (the
    block-diagonal mask transformers makes for `sdpa` from restarting position ids holds N^2 entries: 2.5 GB
    more than this for one 11,443-token pair on this project's CPU benchmark model). seq_bounds: the host-side
    start of each sequence and the row's end. query: (1, heads, N, head_dim). Returns (1, N, heads, head_dim).

    seq_bounds is no argument of the model's forward: it arrives here only because transformers passes the keyword
    arguments it does not know from the model's forward, through each decoder layer, on to the attention function
    (common.TokenLogprobs passes it). Without it the row is one sequence (a plain call, lm(input_ids)); so a release
    that stopped passing it on would make packed rows attend across their sequences, which tests/test_fast.py's
    packed log-probs against one sequence at a time would catch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    bounds = seq_bounds or (0, query.shape[2])
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    # split, not a slice per sequence: a slice's backward writes its gradient into a zero tensor of the whole
    # row, S times over; split's backward is one concatenation (S = 32 sequences in 6,400 tokens, attention
    # forward + backward on one CPU thread: 55 ms against 114; S = 128 in 32,768: 335 against 1,584)
    outs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, dim=1), None


def register_packed_sdpa():
    """Makes "packed_sdpa" an attn_implementation that from_pretrained accepts; its mask builder returns None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("packed_sdpa", packed_sdpa)
    AttentionMaskInterface.register("packed_sdpa", lambda *args, **kwargs: None)


# -----------------------------------------------------------------------------
# the LM head's log-probs


class HeadLogprobs(torch.autograd.Function):
    """log p(target) of each row through the LM head, chunk by chunk, as one autograd node with a hand-written
    backward. h: (R, H); weight: (V, H); bias: (V,) or None; targets: (R,). Returns (R,) in fp32 (fp64 for fp64).
    Equals common.token_logps(F.linear(h, weight, bias), targets), the definition (tests/test_fast.py).

    Why not autograd through F.linear + cross_entropy, each chunk under activation checkpointing (the earlier
    path): its backward re-runs the chunk's forward under autograd, then cross-entropy's backward, so three (chunk,
    V) fp32 buffers live at once (156 MB each at 256 x 151,936), and every chunk adds the checkpoint's Python
    hooks and several autograd nodes (host time, which bounds a GPU's step). Here forward saves only the inputs and
    each row's logsumexp (R floats), and backward recomputes one chunk's logits at a time and turns them into
    their gradient in place: one fp32 buffer (plus its bf16 copy on a GPU; tests/test_fast.py measures it) and one
    autograd node for the whole head. d logp / d logits = onehot(target) - softmax."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        acc = torch.promote_types(h.dtype, torch.float32)  # bf16 is upcast; fp32 (fp64 in tests) kept
        target_logits, lses = [], []
        for h_c, t_c in zip(h.split(chunk_size), targets[:, None].split(chunk_size)):  # (n, H), (n, 1)
            logits = F.linear(h_c, weight, bias).to(acc)  # (n, V): one chunk only
            target_logits.append(logits.gather(1, t_c))  # (n, 1)
            # logsumexp in place (torch.logsumexp would allocate a second (n, V) buffer)
            top = logits.amax(1, keepdim=True)  # (n, 1)
            lses.append(logits.sub_(top).exp_().sum(1, keepdim=True).log_().add_(top))  # (n, 1)
            del logits  # before the next chunk's F.linear allocates its own
        lse = torch.cat(lses)  # (R, 1): all that backward needs beyond the inputs
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return torch.cat(target_logits).squeeze(1) - lse.squeeze(1)  # (R,): a new tensor, not a view (FSDP warns)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_weight, need_bias = ctx.needs_input_grad[:3]
        # accumulated over chunks in the weight's own dtype (bf16 on a GPU), as autograd summed the old path's
        # per-chunk gradients; addmm_ rounds once per chunk
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        grad_h = []
        g = grad_logps[:, None]  # (R, 1): d loss / d logp
        c = ctx.chunk_size
        for h_c, t_c, lse_c, g_c, minus_g_c in zip(h.split(c), targets[:, None].split(c), lse.split(c), g.split(c),
                                                   (-g).split(c)):
            logits = F.linear(h_c, weight, bias).to(lse.dtype)  # (n, V): the forward's logits again
            # d logp / d logits = onehot(target) - softmax; times g, in the logits' own buffer
            d = logits.sub_(lse_c).exp_().mul_(minus_g_c).scatter_add_(1, t_c, g_c).to(h.dtype)  # (n, V)
            if need_h:
                grad_h.append(d @ weight)  # (n, H)
            if need_weight:
                grad_weight.addmm_(d.t(), h_c)  # (V, H)
            if need_bias:
                grad_bias += d.sum(0)  # (V,)
            del logits, d  # before the next chunk's F.linear allocates its own
        return torch.cat(grad_h) if need_h else None, grad_weight, grad_bias, None, None


# -----------------------------------------------------------------------------
# MLPs and norms that save less for backward


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(g) * u): the end of a Llama-style MLP (Qwen2's), saving only g and u for backward.

    Why: autograd through the model's own MLP keeps four (tokens, intermediate) tensors per layer until backward:
    g, silu(g), u and their product (the down projection's input), the largest part of the activations (55% of
    them in one 8,704-token pair on the CPU benchmark model, profiled). Backward here recomputes silu(g) and the
    product from g and u: two elementwise operations, no matmul. The same operations in the same order as the
    model's forward and autograd's backward, so values and gradients are bit for bit the model's
    (tests/test_fast.py). g, u: (..., I); weight: (H, I)."""

    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        return F.linear(F.silu(g) * u, weight)

    @staticmethod
    def backward(ctx, grad_out):
        g, u, weight = ctx.saved_tensors
        a = F.silu(g)
        grad_weight = grad_out.flatten(0, -2).t().mm((a * u).flatten(0, -2))  # (H, I)
        grad_p = grad_out @ weight  # (..., I): the product's gradient
        grad_u = grad_p * a
        del a
        grad_g = torch.ops.aten.silu_backward(grad_p.mul_(u), g)
        return grad_g, grad_u, grad_weight


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)), as Llama-style models (Qwen2's) compute it: in fp32, rounded back to x's dtype before
    the weight. Saves x and each row's 1 / rms for backward instead of x in fp32 (a copy, for bf16 x) and the
    normalised rows (pair step allocation peak 1.20 -> 1.13 GB, profiled); backward recomputes those from x, then
    takes autograd's steps through the model's operations in autograd's order, so the gradients are the model's
    bit for bit (tests/test_fast.py). x: (..., H); weight: (H,)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        h = x.float()
        n = h * rstd  # (..., H): the normalised rows again
        grad_weight = (grad_out * n.to(x.dtype)).sum_to_size(weight.shape)  # (H,)
        grad_n = (grad_out * weight).float()
        # n = h * rstd, rstd = (mean(h^2) + eps)^(-1/2): through the product, then through rstd, mean and the square
        grad_rstd = (grad_n * h).sum(-1, keepdim=True)  # (..., 1)
        grad_mean = -0.5 * grad_rstd * rstd.pow(3)  # (..., 1)
        grad_h = grad_n * rstd + grad_mean.expand_as(h) / h.shape[-1] * (2 * h)
        return grad_h.to(x.dtype), grad_weight, None


SWIGLU_MLPS = ("Qwen2MLP", "LlamaMLP", "MistralMLP", "Qwen3MLP")  # each computes down(act(gate(x)) * up(x))
RMS_NORMS = ("Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")  # each computes _RMSNorm's formula


def save_less_for_backward(lm):
    """Every MLP known to be down(silu(gate(x)) * up(x)) with no bias on down ends in _SwiGLUDown, and every RMSNorm
    of a known class is _RMSNorm; any other module is left as the model defines it. Returns how many changed."""
    changed = 0
    for m in lm.modules():
        kind = type(m).__name__
        if kind in SWIGLU_MLPS and getattr(lm.config, "hidden_act", None) == "silu" and m.down_proj.bias is None:
            m.forward = lambda x, m=m: _SwiGLUDown.apply(m.gate_proj(x), m.up_proj(x), m.down_proj.weight)
        elif kind in RMS_NORMS:
            m.forward = lambda x, m=m: _RMSNorm.apply(x, m.weight, m.variance_epsilon)
        else:
            continue
        changed += 1
    return changed


# -----------------------------------------------------------------------------
# the update norm


def adamw_update_sq(optimizer, chunk_numel=2**26):
    """||theta_{t+1} - theta_t||^2 of the AdamW step just taken (this rank's shards), from the optimiser's own
    state, so that no copy of theta_t is needed (for 1.5B parameters that copy was 6 GB, a quarter of the
    training state, and it set the step's peak memory). AdamW's step is
        theta_{t+1} = theta_t (1 - lr wd) - lr u,   u = m_hat / (sqrt(v_hat) + eps),
        m_hat = m_t / (1 - beta1^t),   v_hat = v_t / (1 - beta2^t),
    so theta_t = (theta_{t+1} + lr u) / (1 - lr wd), and the update is
        theta_{t+1} - theta_t = -lr / (1 - lr wd) * (u + wd theta_{t+1}).
    Computed in groups of at most `chunk_numel` elements (temporaries: twice a group), on the device, no wait.
    It is the update AdamW computed, before fp32 rounds it into the weights (a difference of weights would
    carry that rounding, ~1e-7 of each weight, against updates of ~1e-6)."""
    def local(t):  # this rank's shard of an FSDP2 (DTensor) parameter or state
        return t.to_local() if hasattr(t, "to_local") else t

    total = None
    for group in optimizer.param_groups:
        assert not group.get("amsgrad") and not group.get("maximize"), "the formula is AdamW's plain step"
        params = [p for p in group["params"] if p in optimizer.state]
        if not params:
            continue
        lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
        state = [optimizer.state[p] for p in params]
        step = state[0]["step"]  # every parameter of a group takes every step: one count
        step = torch.as_tensor(step, dtype=torch.float64)  # fp32's 1 - 0.999 would be off by 6e-5 of itself
        bc1 = (1 - beta1 ** step).to(params[0].dtype)  # on the device when the step count is (fused AdamW): no wait
        bc2_sqrt = ((1 - beta2 ** step) ** 0.5).to(params[0].dtype)
        start = 0
        while start < len(params):  # groups of tensors of at most chunk_numel elements (at least one tensor)
            end, numel = start, 0
            while end < len(params) and (end == start or numel + local(params[end]).numel() <= chunk_numel):
                numel += local(params[end]).numel()
                end += 1
            theta = [local(p).detach() for p in params[start:end]]
            m = [local(st["exp_avg"]) for st in state[start:end]]
            v = [local(st["exp_avg_sq"]) for st in state[start:end]]
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(m, denom)  # m_t / (sqrt(v_hat) + eps)
            del denom
            torch._foreach_div_(u, bc1)  # u
            if wd:
                torch._foreach_add_(u, theta, alpha=wd)  # u + wd theta_{t+1}
            # each tensor's norm accumulated in fp64: in fp32, 2^24 elements of 0.1 read 0.9% low on this CPU
            sq = torch.stack(torch._foreach_norm(u, 2, dtype=torch.float64)).pow(2).sum() * (lr / (1 - lr * wd)) ** 2
            total = sq if total is None else total + sq
            start = end
    return total
