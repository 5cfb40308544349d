"""Plumbing shared by sft.py, redi.py, eval.py and data.py: processes, checked reading of input files, models,
log-probs, optimiser, checkpoints.

Nothing here knows about a particular loss; the training scripts read top to bottom and call in. The speed
machinery (hand-written backwards, packed attention, the update norm from AdamW's state) is in fast.py; with
--plain the scripts run without it, and token_logps below is the definition of the log-probs that both paths
compute.
"""
import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fast import HeadLogprobs, adamw_update_sq, register_packed_sdpa, save_less_for_backward

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
    if attn_implementation == "packed_sdpa":
        register_packed_sdpa()
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
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or damaged .safetensors file
        die(f"--model {path!r}: could not load the weights ({e.__class__.__name__}: {e})")
    if not hasattr(getattr(model, "model", None), "layers"):
        die(f"--model {path!r} is a {type(model).__name__}, whose decoder layers are not at model.model.layers")
    return model


def token_logps(logits, targets):
    """The definition of the log-probs every loss here is written in: log pi(y_t | x, y_<t) is the log-softmax of
    the logits over the full vocabulary, at the token y_t, in fp32 (fp64 for an fp64 model). The plain path
    (--plain) computes exactly this; the fast path (fast.HeadLogprobs: the LM head in chunks, with a hand-written
    backward) must equal it, and tests/test_fast.py checks that it does. logits: (R, V); targets: (R,). Returns (R,)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 is upcast
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (R,)


class TokenLogprobs(nn.Module):
    """Wraps a causal LM so that forward returns log pi(y_t | x, y_<t) (token_logps) for the response tokens of a
    packed batch (data.Packed) only.

    Memory by design: the decoder runs once; the LM head then runs on response positions only, in
    chunks of `chunk_size` tokens (fast.HeadLogprobs), so neither forward nor backward ever holds more than
    one (chunk, vocab) slice of logits. (32k tokens x 151,936 vocab in fp32 would be ~20 GB.) With `plain`, the
    head runs on all response positions at once and token_logps takes the whole (R, vocab) logits. Being an
    nn.Module is what lets FSDP2 gather the head's weights: FSDP gathers a module's parameters only when
    that module is called, and this wrapper is the root.
    """

    def __init__(self, lm, chunk_size=256, plain=False):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.plain = plain

    def forward(self, input_ids, position_ids, pred_at, targets, seq_bounds=None):
        """input_ids, position_ids: (1, N); pred_at, targets: (R,); seq_bounds: a tuple of host ints, as in
        data.Packed. Returns (R,) float32 (float64 for a float64 model): the log-prob of each response token."""
        # seq_bounds is no argument of the model's forward: it reaches the attention function (fast.packed_sdpa)
        # only because transformers passes the keyword arguments it does not know from the model's forward, through
        # each decoder layer, on to attention. The other implementations find the sequences from the position ids.
        packed = {"seq_bounds": seq_bounds} if self.lm.config._attn_implementation == "packed_sdpa" else {}
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               **packed).last_hidden_state[0]  # (N, H)
        h = hidden.index_select(0, pred_at)  # (R, H): the hidden state at t predicts token t + 1
        head = self.lm.get_output_embeddings()
        if self.plain:  # (R,), through the whole (R, V) logits; a copy, as FSDP warns when its root returns a view
            return token_logps(head(h), targets).clone()
        # the same values, chunk by chunk. The head's weight is the FSDP root's unsharded parameter (tied or not):
        # autograd adds the gradient returned by HeadLogprobs.backward to it as to any other use of it
        return HeadLogprobs.apply(h, head.weight, head.bias, targets, self.chunk_size)  # (R,)


def sequence_logps(model, batch):
    """lp(y) of each sequence of a packed batch: the sum of log pi(y_t | x, y_<t) over its response tokens. (S,)"""
    return sequence_sums(model(*batch.model_inputs), batch)  # (R,) -> (S,)


def sequence_sums(values, batch):
    """Per-token values of a packed batch's response tokens (R,), summed over each sequence: (S,)."""
    return values.new_zeros(batch.lengths.shape[0]).index_add_(0, batch.seq_of, values)


def shard_model(lm, device, chunk_size=256, grad_checkpointing=False, compile=False, plain=False):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, head). GPUs compute in
    bf16 on fp32 master weights and reduce gradients in fp32; CPUs stay fp32. With `compile`, each
    decoder layer's forward is compiled before sharding (the layers are identical, so one graph serves
    all of them; a packed row's number of sequences is part of the graph, so each new count compiles once more).
    Compiling the module's __call__ instead traced FSDP's hooks and captured almost nothing (8 operator calls
    against 318 in a 4-layer CPU probe). Without activation checkpointing the MLPs and norms save less for
    backward (fast.save_less_for_backward); with it, a layer keeps only its input anyway, and they run as the model
    defines them, as they always do with `plain`."""
    if grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not plain:
        save_less_for_backward(lm)
    if compile:  # the layer's own forward (checkpointing's wrapper, if on), not its __call__: FSDP's hooks stay eager
        for layer in lm.model.layers:  # dynamic: packed rows change length every micro-batch; one graph serves
            layer.forward = torch.compile(layer.forward, dynamic=True)  # every layer, and each count of sequences
    model = TokenLogprobs(lm, chunk_size, plain)
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
    # sft.py and redi.py divide their losses by the global batch (response tokens, pairs: every micro-batch of every
    # rank), which is right only because FSDP sums the gradients over ranks here instead of averaging them, as it
    # does by default (the step would then be 1 / ranks of theirs).
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
    """Linear warmup over the first W = ceil(warmup_frac * total_steps) steps, then linear decay to 0
    (PAPER.md §2), as the authors' HF Trainer schedule (transformers' get_linear_schedule_with_warmup):
    `step` counts optimiser steps from 0, and step s uses peak * s / W while s < W, so the first update has
    LR 0 and the peak is reached at step W."""
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return peak_lr * step / warmup
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


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


def local_shard(t):
    """This rank's part of an FSDP2 (DTensor) parameter; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_and_step(model, optimizer, lr, max_grad_norm, plain=False):
    """Set the LR, clip the global gradient norm (across all shards), step, zero. Returns the gradient
    norm before clipping and the norm of the update theta_{t+1} - theta_t over all parameters (the
    paper's "gradient update size", Figures 3-7), both global, as 0-d tensors on the device: nothing
    here waits for the device. With `plain`, the update is the difference of the weights after and before the
    step (a copy of this rank's shards of theta_t: the model's size again); otherwise fast.adamw_update_sq computes
    it from AdamW's state, without the copy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    before = [local_shard(p).detach().clone() for p in model.parameters()] if plain else None  # theta_t
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if plain:
        update_sq = torch.stack([(local_shard(p).detach() - theta).double().pow(2).sum()
                                 for p, theta in zip(model.parameters(), before)]).sum()
    else:
        update_sq = adamw_update_sq(optimizer)
    dist.all_reduce(update_sq)  # sum over ranks' shards
    return grad_norm, update_sq.sqrt()


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


def checked(kind, ok, words):
    """An argparse type: kind(text), kept when ok(value). Anything else stops the script before any work with
    argparse's one line, "argument --x: expected WORDS, got 'TEXT'" (exit 2). NaN fails every check below."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
nonnegative = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
finite = checked(float, math.isfinite, "a finite number")
fraction = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

# The settings --resume may change: they change how a step is computed (or when it is saved, or what is warned
# about), not what it computes, beyond rounding. Every other setting must equal the run's config.json. The last
# three are redi.py's: where the reference log-probs are cached, and the collapse warning's thresholds.
FREE_ON_RESUME = ("out", "resume", "micro_batch_size", "grad_checkpointing", "compile", "logprob_chunk", "plain",
                  "attn_implementation", "save_every", "stop_at_step", "keep_last", "trust_remote_code",
                  "ref_cache", "collapse_drop", "collapse_surge")


def add_training_args(parser, *, lr, epochs, batch_size, save_every):
    """The flags sft.py and redi.py share. Each stage passes its own paper defaults (PAPER.md §2, PAPER.md §3)."""
    g = parser.add_argument_group("model")
    g.add_argument("--out", required=True, help="output folder: config.json, metrics.jsonl, ckpt/step_N")
    g.add_argument("--max-position-embeddings", type=positive_int, default=None,
                   help="override the config's context window (authors: 32768 for Qwen2.5-Math, PAPER.md §2)")
    g.add_argument("--rope-theta", type=positive, default=None,
                   help="override RoPE theta (authors: 300000, PAPER.md §2)")
    g.add_argument("--attn-implementation", default=None,
                   help="packed_sdpa (default; fast.py): SDPA's causal kernel on each packed sequence in turn, no "
                        "mask; flash_attention_2 (needs the flash-attn package): its variable-length kernel; sdpa "
                        "(the default with --plain), eager, flex_attention: transformers' block-diagonal mask, "
                        "quadratic in the packed row's length")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
    g.add_argument("--no-append-eos", dest="append_eos", action="store_false", help="do not append the tokenizer's "
                   "EOS after each conversation (the authors' TRL trainers do; stage 2 trains it and counts it in "
                   "|y|, SFT keeps it untrained unless --train-eos: PAPER.md §1)")
    g = parser.add_argument_group("optimisation (AdamW, PAPER.md §2)")
    g.add_argument("--lr", type=nonnegative, default=lr,
                   help="peak learning rate (default: %(default)s)" if lr else "peak learning rate (default: see --loss)")
    g.add_argument("--weight-decay", type=nonnegative, default=1e-4)
    g.add_argument("--warmup-frac", type=fraction, default=0.1,
                   help="linear warmup over this share of the steps, then linear decay to 0")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="global batch = micro-batch x accumulation x ranks (default: %(default)s)")
    g.add_argument("--micro-batch-size", type=positive_int, default=1, help="examples per forward on one rank")
    g.add_argument("--max-grad-norm", type=positive, default=1.0, help="gradient clipping (authors' framework default)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="data order")
    g = parser.add_argument_group("memory")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer's activations in backward")
    g.add_argument("--logprob-chunk", type=positive_int, default=256,
                   help="tokens per LM-head chunk: 256 x 151,936 fp32 logits are 156 MB, one chunk held at a time "
                        "(tools/bench.py redi_ii on CPU: 1,024 peaked 0.4 GB higher; on a GPU larger chunks mean fewer "
                        "launches). Not used with --plain, which takes a micro-batch's response tokens at once")
    g = parser.add_argument_group("speed")
    g.add_argument("--plain", action="store_true",
                   help="run without fast.py's machinery: the model's own modules, transformers' sdpa attention over "
                        "the packed row, full-vocabulary log_softmax + gather for the log-probs, and the update norm "
                        "as the difference of the weights before and after the step. For reading, checking and "
                        "forking; slower and more memory; the same losses and gradients to rounding "
                        "(tests/test_fast.py). --attn-implementation then defaults to sdpa; it may name another of "
                        "transformers' implementations, not fast.py's packed_sdpa")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (the first step compiles, and again for each new count of "
                        "sequences in a row). Off: not yet measured faster on a GPU (README, Speed and memory)")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=positive_int, default=save_every,
                   help="checkpoint every N optimiser steps and at the end (and when SIGTERM stops the run)")
    g.add_argument("--stop-at-step", type=positive_int, default=None,
                   help="checkpoint and exit after this step, schedule unchanged (time-limited jobs)")
    g.add_argument("--keep-last", type=positive_int, default=None,
                   help="after each checkpoint, delete all but the newest N (default: keep all); never the ones "
                        "OUT/final and OUT/best link to")
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    free = ", ".join(flags[k] for k in FREE_ON_RESUME if k in flags and k not in ("out", "resume"))
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest usable checkpoint in --out (a damaged one is skipped, with a note). "
                        "Every setting that defines the run's numbers must equal its config.json, or the run stops "
                        "before any work; these may differ: " + free + ". A longer schedule cannot extend a run: "
                        "the LR schedule depends on the total steps")


def accumulation_steps(args, world_size):
    """Checked before any work: micro-batches x accumulation x ranks must make the global batch."""
    accumulation, rem = divmod(args.batch_size, args.micro_batch_size * world_size)
    if rem or accumulation == 0:
        die(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size} "
            f"x {world_size} ranks")
    return accumulation


def build_model(args, device):
    """The starting model, sharded, and its AdamW. Returns (model, optimizer, n_parameters). Resolves
    --attn-implementation's default in args, so that config.json records the attention that ran."""
    if args.plain and args.attn_implementation == "packed_sdpa":
        die("--plain runs transformers' own attention and --attn-implementation packed_sdpa is fast.py's; "
            "drop one of the two")
    if args.attn_implementation is None:
        args.attn_implementation = "sdpa" if args.plain else "packed_sdpa"
    lm = load_model(args.model, args.max_position_embeddings, args.rope_theta, args.attn_implementation,
                    args.trust_remote_code)
    n_params = sum(p.numel() for p in lm.parameters())
    model = shard_model(lm, device, args.logprob_chunk, args.grad_checkpointing, args.compile, args.plain)
    return model, make_optimizer(model, args.lr, args.weight_decay), n_params


def open_run_folder(args, parser):
    """--out, checked on every rank before any work: it and OUT/ckpt must be folders that can be written (they are
    created here, and a probe file written and removed, so a read-only place stops now, not at the first
    checkpoint). A run already there (logged steps or checkpoints) continues only with --resume, so its history is
    never cut by a rerun; and only with the settings that define its numbers. From here Ctrl-C stops at once with one
    line naming the latest checkpoint (exit 130)."""
    out = Path(args.out)
    _check_writable(out, args.out)
    _check_writable(out / "ckpt", args.out)
    signal.signal(signal.SIGINT, lambda signum, frame: _interrupted(out))
    checkpoints = _checkpoints(out)
    logged = sum(1 for line in (out / "metrics.jsonl").open("rb") if line.strip()) \
        if (out / "metrics.jsonl").is_file() else 0
    if not args.resume and (checkpoints or logged):
        held = f"{logged} logged steps" + (f", checkpoints up to {checkpoints[-1].name}" if checkpoints else "")
        die(f"--out {args.out!r} holds a run ({held}); add --resume to continue it, or use a new --out")
    if args.resume and checkpoints:
        _check_same_settings(args, parser, out, checkpoints[-1])


def _check_writable(folder, out):
    """folder (--out or OUT/ckpt) exists after this, as a folder that can be written; or the run stops."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the folder, or where it will be made
    if existing == folder and not folder.is_dir():
        die(f"--out {out!r} is a file; expected a folder for the run (it is created if missing)" if folder == Path(out)
            else f"--out {out!r} holds a file named {folder.name!r}; expected a folder of checkpoints there")
    if not existing.is_dir():
        die(f"--out {out!r} is under {str(existing)!r}, which is a file; expected a folder path")
    probe = folder / f".write_probe.rank{dist.get_rank()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        die(f"--out {out!r}: {str(folder)!r} cannot be written ({e.strerror or e}); pick another --out")


def _check_same_settings(args, parser, out, newest):
    """--resume with a checkpoint: every setting outside FREE_ON_RESUME must equal the run's config.json (or, without
    one, the newest checkpoint's run_config.json). A setting that the file predates is not compared."""
    path = out / "config.json" if (out / "config.json").is_file() else newest / "run_config.json"
    if not path.is_file():
        print0(f"note: --resume: {out} has no config.json; the settings cannot be compared with the run's")
        return
    old = read_json(path, "--resume's", "the config.json its run wrote")
    if not isinstance(old, dict):
        die(f"{path} is {JSON_TYPES.get(type(old))}, not an object; expected the config.json its run wrote")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    changed = [_describe(actions[k], v, old[k]) for k, v in vars(args).items()
               if k in actions and k in old and k not in FREE_ON_RESUME and not _same(k, v, old[k])]
    if changed:
        die(f"--resume: the run in {str(out)!r} was made with other settings: {'; '.join(changed)}; they define its "
            "numbers (a longer schedule cannot extend a run either: the LR schedule depends on the total steps), so "
            "resume with the run's settings or use a new --out")


def _same(key, new, old):
    if new == old:
        return True
    if key in ("model", "data") and isinstance(old, str) and Path(new).exists() and Path(old).exists():
        return Path(new).resolve() == Path(old).resolve()  # one folder or file, named two ways
    return False


def _describe(action, new, old):
    """A setting that differs from the run's, in words: "--epochs 5 (the run has 3)"."""
    flag = action.option_strings[0]
    if isinstance(action.const, bool):  # a switch: --train-eos, --no-append-eos
        return f"{flag} (the run ran without it)" if new == action.const else f"no {flag} (the run ran with it)"
    return f"{flag} {'unset' if new is None else new} (the run has {'unset' if old is None else old})"


def _interrupted(out):
    """Ctrl-C: one line, no traceback, exit 130 (128 + SIGINT) at once. A checkpoint being written stays a .tmp
    folder, which --resume never picks."""
    ckpt = latest_checkpoint(out)
    print0(f"interrupted (Ctrl-C); latest checkpoint: {ckpt}, which the same command with --resume continues from"
           if ckpt else "interrupted (Ctrl-C); no checkpoint yet")
    os._exit(130)


_sigterm = False  # set by SIGTERM, a scheduler's notice of preemption; read at the end of each step


def _on_sigterm(signum, frame):
    global _sigterm
    _sigterm = True


def preempted():
    """True on every rank when any rank has had SIGTERM. torchrun forwards the signal to every rank, but a scheduler
    may reach only some: with several ranks this is one extra collective per step (a MAX over one number), after
    the step's wait on the device, so that they all stop at the same step."""
    if dist.get_world_size() == 1:
        return _sigterm
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flag = torch.tensor([float(_sigterm)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def start_run(args, model, optimizer, total_steps):
    """Restores the newest usable checkpoint when --resume finds one; saves the resolved config. A run resumed
    after its last step is complete: OUT/final is made again if it is gone. From here SIGTERM stops the run at the
    end of the current step, with a checkpoint (end_step). Returns (first step to run, Metrics)."""
    start_step, ckpt = _restore(model, optimizer, args.out) if args.resume else (0, None)
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {args.out}/ckpt, starting from --model")
    elif ckpt:
        print0(f"resuming after step {start_step} of {total_steps} from {ckpt}")
    if start_step > total_steps:
        die(f"--resume: {ckpt} is at step {start_step}, past this schedule's {total_steps} steps; has --data changed "
            "since the run started? Use a new --out")
    if dist.get_rank() == 0:
        write_atomically(Path(args.out) / "config.json", json.dumps(vars(args), indent=2) + "\n")
        if ckpt and start_step == total_steps:
            _link(Path(args.out) / "final", ckpt.relative_to(args.out))
            print0(f"the run is complete: {args.out}/final -> {ckpt}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    return start_step, Metrics(args.out, start_step)


def end_step(args, step, total_steps, record, line, model, optimizer, tokenizer, metrics):
    """Log the step (rank 0), checkpoint every --save-every steps, at the end, and when SIGTERM has asked the run to
    stop (it then exits with status 143). Returns True when the run should stop here (last step, or --stop-at-step)."""
    metrics.log(record)
    print0(line)
    done = step == total_steps or step == args.stop_at_step
    stop = not done and preempted()
    if step % args.save_every == 0 or done or stop:
        path = save_checkpoint(model, optimizer, tokenizer, args, args.out, step)
        print0(f"saved {path}")
        if step == total_steps and dist.get_rank() == 0:  # OUT/final -> the last checkpoint, for the next stage
            _link(Path(args.out) / "final", path.relative_to(args.out))
        if args.keep_last and dist.get_rank() == 0:
            prune_checkpoints(args.out, args.keep_last)
    if stop:
        print0(f"stopped by SIGTERM after step {step} of {total_steps}, checkpoint {path} saved; the same command "
               "with --resume continues from it")
        cleanup()
        raise SystemExit(143)  # 128 + SIGTERM, as a shell reports a process the signal ended
    return done


def check_finite(stats, step, out_dir):
    """Stop before a step is logged or saved when its loss, gradient norm or update norm is not finite: the update
    may have made the weights NaN already, and no checkpoint may hold them. The three are on the host after the
    step's one wait, so checking costs nothing."""
    for name, words in (("loss", "the loss"), ("grad_norm", "the gradient norm"), ("update_norm", "the update norm")):
        if not math.isfinite(stats[name]):
            die(f"{words} is {stats[name]} at step {step}; stopped before this step is logged or saved (latest "
                f"checkpoint, finite: {latest_checkpoint(out_dir) or 'none'}): lower the learning rate or check the "
                "data")


class Metrics:
    """OUT/metrics.jsonl, one JSON object per optimiser step, written by rank 0 and flushed at once.
    On resume, lines past the checkpoint's step (logged before a crash) are dropped first."""

    def __init__(self, out_dir, resume_step=0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if not self.rank0:
            return
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):  # cut short by the crash being resumed from
                    print0(f"note: dropped a damaged line of {self.path} (past the checkpoint, written during a crash?)")
        write_atomically(self.path, "".join(l + "\n" for l in kept))  # Ctrl-C mid-write leaves the old file whole

    def log(self, record):
        if self.rank0:
            # strict JSON: a number that is not finite is written as null (NaN and Infinity are no JSON values)
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


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
    # A checkpoint is finite. check_finite stops a run before a non-finite step gets here; this is the second line of
    # defence, one pass over the gathered CPU tensors on rank 0 (cheap next to writing them), its verdict sent to all
    not_finite = [[k.removeprefix("lm.") for k, v in weights.items() if not torch.isfinite(v).all()]
                  if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(not_finite, src=0)
    if not_finite[0]:
        die(f"not writing checkpoint {final}: {len(not_finite[0])} tensors hold non-finite values ({not_finite[0][0]} "
            f"first); latest checkpoint, finite: {latest_checkpoint(out_dir) or 'none'}")
    if dist.get_rank() == 0:
        lm = model.lm
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k.removeprefix("lm."): v.contiguous() for k, v in weights.items()}
        if lm.config.tie_word_embeddings:  # the head is the embedding matrix; safetensors stores it once
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})  # written 0600: made readable below
        lm.config.dtype = next(iter(weights.values())).dtype
        lm.config.save_pretrained(tmp)
        if lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        torch.save({"step": step, "optimizer": optim_state, "rng": rngs}, tmp / "train_state.pt")
        for name in ("model.safetensors", "train_state.pt"):  # as readable as the other files: 0666 minus the umask
            os.chmod(tmp / name, 0o666 & ~_umask())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _umask():
    """The process's umask: reading it means setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path, text):
    """Write under a .tmp name, then rename: a crash or Ctrl-C mid-write leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _link(link, target):
    """link -> target, replacing what link was, never leaving it missing."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _checkpoints(out_dir):
    """The checkpoint folders under OUT/ckpt, oldest first; .tmp folders are being written (or were, at a crash)."""
    return sorted(p for p in (Path(out_dir) / "ckpt").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(out_dir):
    """The newest complete checkpoint folder under OUT/ckpt, or None."""
    found = [p for p in _checkpoints(out_dir) if (p / "train_state.pt").exists()]
    return found[-1] if found else None


def prune_checkpoints(out_dir, keep_last):
    """--keep-last: delete all checkpoints but the newest keep_last, never one that OUT/final or OUT/best (report.py's
    link to the best evaluated checkpoint) points to. Rank 0."""
    out = Path(out_dir)
    linked = {(out / name).resolve() for name in ("final", "best") if (out / name).is_symlink()}
    for ckpt in _checkpoints(out)[:-keep_last]:
        if ckpt.resolve() not in linked:
            shutil.rmtree(ckpt)
            print0(f"removed {ckpt} (--keep-last {keep_last})")


def _read_checkpoint(ckpt):
    """Rank 0: ((weights, train state), None) of a checkpoint folder, or (None, what is wrong with it) when a file is
    damaged (a copy cut short, a bad disk) or the weights are not finite (written before checkpoints were checked)."""
    from safetensors.torch import load_file
    try:
        weights = load_file(ckpt / "model.safetensors")
    except (OSError, SafetensorError) as e:
        return None, f"its model.safetensors cannot be read ({e})"
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        return None, f"its weights are not finite ({bad[0]})"
    try:
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
    except Exception as e:  # a damaged pickle or zip raises many kinds (EOFError, RuntimeError, UnpicklingError, ...)
        return None, f"its train_state.pt cannot be read ({e.__class__.__name__}: {e})"
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys():
        return None, "its train_state.pt holds no step, optimizer and rng"
    return (weights, state), None


def _restore(model, optimizer, out_dir):
    """Weights, optimiser and this rank's RNG from the newest usable checkpoint: rank 0 reads the files, newest first,
    skipping with a note one that cannot be read; then the tensors are broadcast and each rank keeps its shards.
    Returns (its step, its folder), or (0, None) when there is no checkpoint; stops when none can be read."""
    weights, state, chosen, found = {}, {}, None, []
    if dist.get_rank() == 0:
        found = [p for p in _checkpoints(out_dir) if (p / "train_state.pt").exists()]
        for ckpt in reversed(found):
            read, wrong = _read_checkpoint(ckpt)
            if read:
                (weights, state), chosen = read, ckpt
                break
            print0(f"note: --resume skips {ckpt}: {wrong}")
        weights = {"lm." + k: v for k, v in weights.items()}
        if weights and model.lm.config.tie_word_embeddings:
            weights["lm.lm_head.weight"] = weights["lm.model.embed_tokens.weight"]
    header = [{"step": state.get("step"), "rng": state.get("rng"), "ckpt": chosen, "found": len(found)}]
    dist.broadcast_object_list(header, src=0)
    if header[0]["ckpt"] is None:
        if header[0]["found"]:
            die(f"--resume: none of the {header[0]['found']} checkpoints in {Path(out_dir) / 'ckpt'} can be read (see "
                "the notes above); start again in a new --out")
        return 0, None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=options)
    rngs = header[0]["rng"]
    if len(rngs) == dist.get_world_size():
        _set_rng_state(rngs[dist.get_rank()])
    else:
        print0(f"note: checkpoint was written by {len(rngs)} ranks, this run has {dist.get_world_size()}; "
               "RNG states not restored (training itself draws no random numbers)")
    return header[0]["step"], header[0]["ckpt"]
