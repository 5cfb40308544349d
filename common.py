"""Plumbing shared by sft.py, redi.py, eval.py and data.py: processes, checked reading of input files, models,
log-probs, optimiser, checkpoints.

Nothing here knows about a particular loss; the training scripts read top to bottom and call in.
"""
import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# -----------------------------------------------------------------------------
# processes


def init_dist():
    """One code path for every launch: torchrun sets RANK/WORLD_SIZE; plain `python` gets a 1-rank group.
    Returns (rank, world_size, device). GPUs use NCCL, CPUs use gloo."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    else:
        local_rank = 0
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def peak_memory_gb(device):
    """GPU: allocator peak since start. CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def die(message):
    """Stop on an error the user can fix: one clear sentence, no traceback, non-zero exit."""
    print0(f"error: {message}")
    cleanup()
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# reading input files, for every script: a problem with one stops the run with one sentence naming the file
# and its 1-based line (STYLE 8), never a traceback

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
              float: "a number", type(None): "null"}
def check_file(path, flag, expected):
    """path as a Path, if it is an existing file; else stop. expected: what it should be, in words."""
    path = Path(path)
    if path.is_dir():
        die(f"{flag} {str(path)!r} is a folder; expected {expected}")
    if not path.is_file():
        die(f"{flag} {str(path)!r} does not exist; expected {expected}")
    return path


def decode_line(line):
    """One line of a JSON-lines file, as bytes -> (value, None), or (None, what is wrong with it)."""
    try:
        return json.loads(line.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text (byte {e.start + 1} of the line)"
    except json.JSONDecodeError as e:
        return None, f"is not JSON ({e.msg}, column {e.colno})"


def read_json_lines(path, flag, expected, cut_last_ok=False):
    """Yields (line number, value) for each non-blank line of a JSON-lines file; a line that is not UTF-8 or not
    JSON stops the run. With cut_last_ok, one exception: a last line without its newline, which is what a crash
    mid-write leaves (its writer reruns what it held), is skipped with a note saying where."""
    path = check_file(path, flag, expected)
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, wrong = decode_line(line)
            if wrong and cut_last_ok and not line.endswith(b"\n"):  # only the last line can lack its newline
                print0(f"note: {path}, line {n}, the last, is cut short (as a crash mid-write leaves it); skipped")
            elif wrong:
                die(f"{path}, line {n} {wrong}; expected {expected}, one JSON object per line")
            else:
                yield n, value


def read_json(path, flag, expected):
    """A JSON file (summary.json, config.json); a file that is not UTF-8 or not JSON stops the run."""
    path = check_file(path, flag, expected)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        die(f"{path}, line {line} is not UTF-8 text; expected {expected}")
    except json.JSONDecodeError as e:
        die(f"{path}, line {e.lineno} is not JSON ({e.msg}, column {e.colno}); expected {expected}")


def bad_fields(row, fields):
    """What is wrong with a row's fields, in words (or None). fields: name -> (accepted types, the same in words).
    JSON's true/false is never taken for a number."""
    if not isinstance(row, dict):
        return f"is {JSON_TYPES.get(type(row), 'not an object')}, not an object"
    for name, (types, words) in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        value = row.get(name, ...)
        if value is ...:
            return f"lacks the field {name!r} ({words})"
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"has {name!r} = {json.dumps(value)[:40]}, not {words}"
    return None


# -----------------------------------------------------------------------------
# models


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_model_path(path, flag, files):
    """Stop when a local --model/--tokenizer is a file, or a folder with none of `files` in it. A path that does not
    exist is left to the loader: it may be a Hub id."""
    p = Path(path)
    if p.is_file():
        die(f"{flag} {path!r} is a file; expected a model folder (as save_pretrained writes it) or a Hub id")
    if p.is_dir() and not any((p / name).is_file() for name in files):
        die(f"{flag} {path!r} is a folder with no {' or '.join(files)}; expected a model folder (as save_pretrained "
            "writes it) or a Hub id")


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    check_model_path(path, "--tokenizer/--model", TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"--tokenizer/--model {path!r} is not a tokenizer folder or Hub id ({e.__class__.__name__}: {e})")
    if tok.pad_token_id is None:  # only ever used to fill padded positions, which are masked out
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, max_position_embeddings=None, rope_theta=None, attn_implementation="sdpa",
               trust_remote_code=False, dtype=torch.float32):
    """A Hugging Face causal LM with its decoder layers at `model.model.layers`, in fp32 (master
    weights; FSDP casts to bf16 for compute on GPUs). The two overrides are how the authors widened
    Qwen2.5-Math's 4k window to 32k (PAPER.md §2)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    check_model_path(path, "--model", ("config.json",))
    _register_packed_sdpa()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"--model {path!r} is not a model folder or Hub id with a config.json ({e.__class__.__name__}: {e})")
    if max_position_embeddings:
        config.max_position_embeddings = max_position_embeddings
    if rope_theta:
        if getattr(config, "rope_parameters", None) is not None:  # transformers >= 5
            config.rope_parameters["rope_theta"] = rope_theta
        else:
            config.rope_theta = rope_theta
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"--model {path!r}: could not load the weights ({e.__class__.__name__}: {e})")
    if not hasattr(getattr(model, "model", None), "layers"):
        die(f"--model {path!r} is a {type(model).__name__}, whose decoder layers are not at model.model.layers")
    return model


def packed_sdpa(module, query, key, value, attention_mask, seq_bounds=None, **kwargs):
    """Attention for a packed row (data.Packed): PyTorch's SDPA with its causal kernel, run on each sequence of
    the row in turn, so attention never crosses sequences and no (tokens x tokens) mask is ever built (the
    block-diagonal mask transformers makes for `sdpa` from restarting position ids holds N^2 entries: 2.5 GB
    more than this for one 11,443-token pair on this project's CPU benchmark model). seq_bounds: the host-side
    start of each sequence and the row's end. query: (1, heads, N, head_dim). Returns (1, N, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    bounds = seq_bounds or (0, query.shape[2])
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    # split, not a slice per sequence: a slice's backward writes its gradient into a zero tensor of the whole
    # row, S times over; split's backward is one concatenation (S = 32 sequences in 6,400 tokens, attention
    # forward + backward on one CPU thread: 55 ms against 114; S = 128 in 32,768: 335 against 1,584)
    outs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, dim=1), None


def _register_packed_sdpa():
    """Makes "packed_sdpa" an attn_implementation that from_pretrained accepts; its mask builder returns None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("packed_sdpa", packed_sdpa)
    AttentionMaskInterface.register("packed_sdpa", lambda *args, **kwargs: None)


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) of each row through the LM head, chunk by chunk, as one autograd node with a hand-written
    backward. h: (R, H); weight: (V, H); bias: (V,) or None; targets: (R,). Returns (R,) in fp32 (fp64 for fp64).

    Why not autograd through F.linear + cross_entropy, each chunk under activation checkpointing (the earlier
    path): its backward re-runs the chunk's forward under autograd, then cross-entropy's backward, so three (chunk,
    V) fp32 buffers live at once (156 MB each at 256 x 151,936), and every chunk adds the checkpoint's Python
    hooks and several autograd nodes (host time, which bounds a GPU's step). Here forward saves only the inputs and
    each row's logsumexp (R floats), and backward recomputes one chunk's logits at a time and turns them into
    their gradient in place: one fp32 buffer (plus its bf16 copy on a GPU; tests/test_sft.py measures it) and one
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


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(g) * u): the end of a Llama-style MLP (Qwen2's), saving only g and u for backward.

    Why: autograd through the model's own MLP keeps four (tokens, intermediate) tensors per layer until backward:
    g, silu(g), u and their product (the down projection's input), the largest part of the activations (55% of
    them in one 8,704-token pair on the CPU benchmark model, profiled). Backward here recomputes silu(g) and the
    product from g and u: two elementwise operations, no matmul. The same operations in the same order as the
    model's forward and autograd's backward, so values and gradients are bit for bit the model's
    (tests/test_sft.py). g, u: (..., I); weight: (H, I)."""

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
    normalised rows; backward recomputes those from x, then takes autograd's steps through the model's operations
    in autograd's order, so the gradients are the model's bit for bit (tests/test_sft.py). x: (..., H); weight: (H,)."""

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


class TokenLogprobs(nn.Module):
    """Wraps a causal LM so that forward returns log pi(y_t | x, y_<t) for the response tokens of a packed
    batch (data.Packed) only.

    Memory by design: the decoder runs once; the LM head then runs on response positions only, in
    chunks of `chunk_size` tokens (_HeadLogprobs), so neither forward nor backward ever holds more than
    one (chunk, vocab) slice of logits. (32k tokens x 151,936 vocab in fp32 would be ~20 GB.) Being an
    nn.Module is what lets FSDP2 gather the head's weights: FSDP gathers a module's parameters only when
    that module is called, and this wrapper is the root.
    """

    def __init__(self, lm, chunk_size=256):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, position_ids, pred_at, targets, seq_bounds=None):
        """input_ids, position_ids: (1, N); pred_at, targets: (R,); seq_bounds: a tuple of host ints, as in
        data.Packed. Returns (R,) float32 (float64 for a float64 model): the log-prob of each response token."""
        packed = {"seq_bounds": seq_bounds} if self.lm.config._attn_implementation == "packed_sdpa" else {}
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               **packed).last_hidden_state[0]  # (N, H)
        h = hidden.index_select(0, pred_at)  # (R, H): the hidden state at t predicts token t + 1
        # the head's weight is the FSDP root's unsharded parameter (tied or not): autograd adds the gradient
        # returned by _HeadLogprobs.backward to it as to any other use of it
        head = self.lm.get_output_embeddings()
        return _HeadLogprobs.apply(h, head.weight, head.bias, targets, self.chunk_size)  # (R,)


def sequence_logps(model, batch):
    """lp(y) of each sequence of a packed batch: (S,) sums of its response tokens' log-probs."""
    token_logps = model(*batch.model_inputs)  # (R,)
    return token_logps.new_zeros(batch.lengths.shape[0]).index_add_(0, batch.seq_of, token_logps)  # (S,)


def shard_model(lm, device, chunk_size=256, grad_checkpointing=False, compile=False):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, head). GPUs compute in
    bf16 on fp32 master weights and reduce gradients in fp32; CPUs stay fp32. With `compile`, each
    decoder layer's forward is compiled before sharding (the layers are identical, so one graph serves
    all of them; a packed row's number of sequences is part of the graph, so each new count compiles once more).
    Compiling the module's __call__ instead traced FSDP's hooks and captured almost nothing (8 operator calls
    against 318 in a 4-layer CPU probe). Without activation checkpointing the MLPs and norms save less for
    backward (save_less_for_backward); with it, a layer keeps only its input anyway, and they run as the model
    defines them."""
    if grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        save_less_for_backward(lm)
    if compile:  # the layer's own forward (checkpointing's wrapper, if on), not its __call__: FSDP's hooks stay eager
        for layer in lm.model.layers:  # dynamic: packed rows change length every micro-batch; one graph serves
            layer.forward = torch.compile(layer.forward, dynamic=True)  # every layer, and each count of sequences
    model = TokenLogprobs(lm, chunk_size)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    world = dist.get_world_size()
    mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
    # Each layer frees its gathered (bf16) weights after its forward and gathers them again for its backward, also
    # on one rank, where keeping them would hold a bf16 copy of every layer (2.6 GB at 1.5B) until the backward.
    # The root (embeddings, head) is needed again at once by the backward: kept.
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    # Losses are normalised by global counts (tokens or pairs) in the training scripts, so the
    # gradient must be the plain sum over ranks, not FSDP's default average.
    for unit in [*lm.model.layers, model]:  # the setting is per FSDP unit
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM collective (gloo has no PREMUL_SUM)
    return model


# -----------------------------------------------------------------------------
# optimisation


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """AdamW per PAPER.md §2. Biases and norm gains (1-d tensors) get no weight decay, as in the HF Trainer
    the authors trained with."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)  # one kernel for all parameters


def lr_at(step, total_steps, peak_lr, warmup_frac=0.1):
    """Linear warmup over the first `warmup_frac` of the steps, then linear decay to 0 (PAPER.md §2).
    `step` counts optimiser steps from 0; the first step already uses a non-zero rate."""
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    return peak_lr * (total_steps - step) / (total_steps - warmup)


def accumulate(model, batches):
    """Yields a step's micro-batches for forward and backward. With more than one rank, FSDP sums the gradients
    over ranks once per step, in the last micro-batch's backward, and keeps the earlier micro-batches' unsharded
    sum until then (fp32, the model's size: 6.3 GB at 1.5B) instead of a reduce-scatter after every micro-batch.
    On one rank there is nothing to reduce, and that sum would be a second copy of the gradients: each backward
    then reduces as it goes, as before."""
    one_rank = dist.get_world_size() == 1
    for i, batch in enumerate(batches):
        model.set_requires_gradient_sync(one_rank or i == len(batches) - 1)
        yield batch


def clip_and_step(model, optimizer, lr, max_grad_norm):
    """Set the LR, clip the global gradient norm (across all shards), step, zero. Returns the gradient
    norm before clipping and the norm of the update theta_{t+1} - theta_t over all parameters (the
    paper's "gradient update size", Figures 3-7), both global, as 0-d tensors on the device: nothing
    here waits for the device (the foreach ops launch a few kernels for all ~340 tensors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_sq = adamw_update_sq(optimizer)
    dist.all_reduce(update_sq)  # sum over ranks' shards
    return grad_norm, update_sq.sqrt()


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
            sq = torch.stack(torch._foreach_norm(u)).double().pow(2).sum() * (lr / (1 - lr * wd)) ** 2
            total = sq if total is None else total + sq
            start = end
    return total


def global_sum(values, device):
    """Sum 0-d tensors (or numbers) over ranks in one collective; called on every rank. Returns a
    (len(values),) float64 tensor on the device (no wait for it)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t


def to_host(stats, device):
    """A step's statistics, {name: 0-d tensor or number}, to {name: float} with one device-to-host copy:
    the step's only wait on the device."""
    values = torch.stack([torch.as_tensor(v, device=device).double() for v in stats.values()]).tolist()
    return dict(zip(stats, values))


# -----------------------------------------------------------------------------
# what both training stages share: flags, set-up, the end of a step


def add_training_args(parser, *, lr, epochs, batch_size, save_every):
    """The flags sft.py and redi.py share. Each stage passes its own paper defaults (PAPER.md §2, PAPER.md §3)."""
    g = parser.add_argument_group("model")
    g.add_argument("--out", required=True, help="output folder: config.json, metrics.jsonl, ckpt/step_N")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="override the config's context window (authors: 32768 for Qwen2.5-Math, PAPER.md §2)")
    g.add_argument("--rope-theta", type=float, default=None, help="override RoPE theta (authors: 300000, PAPER.md §2)")
    g.add_argument("--attn-implementation", default="packed_sdpa",
                   help="packed_sdpa (default): SDPA's causal kernel on each packed sequence in turn, no mask; "
                        "flash_attention_2 (needs the flash-attn package): its variable-length kernel; sdpa, eager, "
                        "flex_attention: transformers' block-diagonal mask, quadratic in the packed row's length")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
    g.add_argument("--no-append-eos", dest="append_eos", action="store_false", help="do not append the tokenizer's "
                   "EOS after each conversation (the authors' TRL trainers do: it is trained, and counted in |y|)")
    g = parser.add_argument_group("optimisation (AdamW, PAPER.md §2)")
    g.add_argument("--lr", type=float, default=lr,
                   help="peak learning rate (default: %(default)s)" if lr else "peak learning rate (default: see --loss)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-frac", type=float, default=0.1, help="linear warmup over this share of the steps, then linear decay to 0")
    g.add_argument("--epochs", type=int, default=epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch = micro-batch x accumulation x ranks (default: %(default)s)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="examples per forward on one rank")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (authors' framework default)")
    g.add_argument("--seed", type=int, default=0, help="data order")
    g = parser.add_argument_group("memory")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer's activations in backward")
    g.add_argument("--logprob-chunk", type=int, default=256,
                   help="tokens per LM-head chunk: 256 x 151,936 fp32 logits are 156 MB, one chunk held at a time (bench.py "
                        "redi_ii on CPU: 1,024 peaked 0.4 GB higher; on a GPU larger chunks mean fewer launches)")
    g = parser.add_argument_group("speed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (the first step compiles, and again for each new count of "
                        "sequences in a row). Off: not yet measured faster on a GPU (README, Speed and memory)")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N optimiser steps and at the end")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, schedule unchanged (time-limited jobs)")


def accumulation_steps(args, world_size):
    """Checked before any work, with --out: micro-batches x accumulation x ranks must make the global batch."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        die(f"--out {args.out!r} is a file; expected a folder for the run (it is created if missing)")
    accumulation, rem = divmod(args.batch_size, args.micro_batch_size * world_size)
    if rem or accumulation == 0:
        die(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size} "
            f"x {world_size} ranks")
    return accumulation


def build_model(args, device):
    """The starting model, sharded, and its AdamW. Returns (model, optimizer, n_parameters)."""
    lm = load_model(args.model, args.max_position_embeddings, args.rope_theta, args.attn_implementation,
                    args.trust_remote_code)
    n_params = sum(p.numel() for p in lm.parameters())
    model = shard_model(lm, device, args.logprob_chunk, args.grad_checkpointing, args.compile)
    return model, make_optimizer(model, args.lr, args.weight_decay), n_params


def start_run(args, model, optimizer):
    """Restores the newest complete checkpoint when --resume finds one; saves the resolved config.
    Returns (first step to run, Metrics)."""
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {args.out}/ckpt, starting from --model")
    start_step = _restore(model, optimizer, ckpt) if ckpt else 0
    if ckpt:
        print0(f"resuming after step {start_step} from {ckpt}")
    if dist.get_rank() == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    return start_step, Metrics(args.out, start_step)


def end_step(args, step, total_steps, record, line, model, optimizer, tokenizer, metrics):
    """Log the step (rank 0), checkpoint every --save-every steps and at the end. Returns True when the
    run should stop here (last step, or --stop-at-step)."""
    metrics.log(record)
    print0(line)
    done = step == total_steps or step == args.stop_at_step
    if step % args.save_every == 0 or done:
        path = save_checkpoint(model, optimizer, tokenizer, args, args.out, step)
        print0(f"saved {path}")
        if step == total_steps and dist.get_rank() == 0:  # OUT/final -> the last checkpoint, for the next stage
            final = Path(args.out) / "final"
            final.unlink(missing_ok=True)
            final.symlink_to(path.relative_to(args.out))
    return done


def check_finite(loss, step, out_dir):
    if not math.isfinite(loss):
        die(f"the loss is {loss} at step {step}; stopping before any checkpoint of this step is written, so none is "
            f"corrupted (latest good checkpoint: {latest_checkpoint(out_dir) or 'none'}). "
            "Lower the learning rate or check the data.")


class Metrics:
    """OUT/metrics.jsonl, one JSON object per optimiser step, written by rank 0 and flushed at once.
    On resume, lines past the checkpoint's step (logged before a crash) are dropped first."""

    def __init__(self, out_dir, resume_step=0):
        self.path = Path(out_dir) / "metrics.jsonl"
        if dist.get_rank() != 0:
            return
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):  # cut short by the crash being resumed from
                    print0(f"note: dropped a damaged line of {self.path} (past the checkpoint, written during a crash?)")
        self.path.write_text("".join(l + "\n" for l in kept))

    def log(self, record):
        if dist.get_rank() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class StepTimer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self):
        t, self.t0 = self.t0, time.perf_counter()
        return self.t0 - t


# -----------------------------------------------------------------------------
# checkpoints


def _rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(model, optimizer, tokenizer, args, out_dir, step):
    """OUT/ckpt/step_NNNNNN: a Hugging Face model folder (config, model.safetensors with the fp32
    master weights, tokenizer) that AutoModelForCausalLM.from_pretrained loads, plus train_state.pt
    (optimiser, step, every rank's RNG) for --resume. Called on every rank (the gathers are
    collectives). Written under a .tmp name and renamed when complete, so a crash mid-write never
    leaves a folder that latest_checkpoint() would pick."""
    from safetensors.torch import save_file
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all, on CPU
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_state())
    final = Path(out_dir) / "ckpt" / f"step_{step:06d}"
    if dist.get_rank() == 0:
        lm = model.lm
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k.removeprefix("lm."): v.contiguous() for k, v in weights.items()}
        if lm.config.tie_word_embeddings:  # the head is the embedding matrix; safetensors stores it once
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        lm.config.dtype = next(iter(weights.values())).dtype
        lm.config.save_pretrained(tmp)
        if lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        torch.save({"step": step, "optimizer": optim_state, "rng": rngs}, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(out_dir):
    """The newest complete checkpoint folder under OUT/ckpt, or None. .tmp folders are incomplete."""
    found = sorted(p for p in (Path(out_dir) / "ckpt").glob("step_*")
                   if p.is_dir() and not p.name.endswith(".tmp") and (p / "train_state.pt").exists())
    return found[-1] if found else None


def _restore(model, optimizer, ckpt):
    """Weights, optimiser and this rank's RNG from a checkpoint: rank 0 reads the files, then the
    tensors are broadcast and each rank keeps its shards. Returns the checkpoint's step."""
    from safetensors.torch import load_file
    weights, state = {}, {}
    if dist.get_rank() == 0:
        weights = {"lm." + k: v for k, v in load_file(ckpt / "model.safetensors").items()}
        if model.lm.config.tie_word_embeddings:
            weights["lm.lm_head.weight"] = weights["lm.model.embed_tokens.weight"]
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
    header = [{"step": state.get("step"), "rng": state.get("rng")}]
    dist.broadcast_object_list(header, src=0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=options)
    rngs = header[0]["rng"]
    if len(rngs) == dist.get_world_size():
        _set_rng_state(rngs[dist.get_rank()])
    else:
        print0(f"note: checkpoint was written by {len(rngs)} ranks, this run has {dist.get_world_size()}; "
               "RNG states not restored (training itself draws no random numbers)")
    return header[0]["step"]
