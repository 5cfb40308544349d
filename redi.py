"""Stage 2: REDI on (problem, correct trace, incorrect trace) triplets, D_Pref (PAPER.md §3), with DPO and
SimPO beside it as baselines. Initialised from the SFT checkpoint.

    python redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi            # alpha 0.8, LR 1e-6
    torchrun --nproc_per_node 8 redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi
    ... --alpha 1.0                    # symmetric REDI (Eq. 4)
    ... --loss dpo                     # DPO (Eq. 2): beta 0.001, LR 2e-7, the paper's best
    ... --loss simpo                   # SimPO (Eq. 3): beta 2, gamma 1, LR 5e-7, the paper's best
Resume after a crash with the same command plus --resume.

Notation: lp(y) = sum over the response tokens of log pi(y_t | x, y_<t); |y| = response length.
A new objective is one loss function and one entry in OBJECTIVES; its flags, LR default, reference
log-probs and logging follow from the entry.
"""
import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (StepTimer, accumulate, accumulation_steps, add_training_args, build_model, check_finite, cleanup,
                    clip_and_step, die, end_step, global_sum, init_dist, load_tokenizer, lr_at, peak_memory_gb,
                    print0, sequence_logps, start_run, to_host)
from data import batch_for_step, check_chat_template, encode_chats, micro_batches, pack, read_jsonl

# -----------------------------------------------------------------------------
# the objectives: per-pair tensors (B,) in, per-pair losses (B,) out


class Pairs(NamedTuple):
    """What every objective is written in: per-pair quantities of a micro-batch, each (B,)."""
    chosen_logps: torch.Tensor    # lp(y_w)
    rejected_logps: torch.Tensor  # lp(y_l)
    chosen_lens: torch.Tensor     # |y_w|
    rejected_lens: torch.Tensor   # |y_l|
    ref_chosen_logps: torch.Tensor = None    # lp_ref(y_w): only for objectives that need a reference
    ref_rejected_logps: torch.Tensor = None  # lp_ref(y_l)


def redi_loss(p, alpha):
    """Eq. 5: length-normalised likelihood of the correct trace up, alpha times that of the incorrect
    trace down. alpha = 1 is symmetric REDI (Eq. 4); alpha = 0 is SFT on the chosen trace."""
    return -p.chosen_logps / p.chosen_lens + alpha * p.rejected_logps / p.rejected_lens


def dpo_loss(p, beta):
    """Eq. 2, against the reference (the starting SFT model)."""
    return -F.logsigmoid(beta * ((p.chosen_logps - p.ref_chosen_logps) - (p.rejected_logps - p.ref_rejected_logps)))


def simpo_loss(p, beta, gamma):
    """Eq. 3, pure SimPO (no extra NLL term)."""
    return -F.logsigmoid(beta * (p.chosen_logps / p.chosen_lens - p.rejected_logps / p.rejected_lens) - gamma)


def normalised_margin(p):
    """Per-token log-prob of the chosen trace minus that of the rejected one."""
    return p.chosen_logps / p.chosen_lens - p.rejected_logps / p.rejected_lens


def reference_margin(p):
    """DPO's implicit reward margin (over beta): how much more the chosen trace gained than the rejected."""
    return (p.chosen_logps - p.ref_chosen_logps) - (p.rejected_logps - p.ref_rejected_logps)


@dataclass(frozen=True)
class Objective:
    loss: Callable          # (Pairs, **hparams) -> (B,) per-pair losses
    margin: Callable        # (Pairs) -> (B,): logged as "margin"; "reward_accuracy" = share of pairs above 0
    hparams: dict           # its hyperparameters, each a --flag, with the paper's values as defaults
    lr: float               # the default peak LR: the paper's setting for this objective
    needs_reference: bool = False  # lp_ref of the starting model, computed once before training


OBJECTIVES = {  # PAPER.md §3
    "redi": Objective(redi_loss, normalised_margin, {"alpha": 0.8}, lr=1e-6),  # the final Qwen-REDI-1.5B run
    "dpo": Objective(dpo_loss, reference_margin, {"beta": 0.001}, lr=2e-7, needs_reference=True),  # best of beta 1e-3/1e-2/1e-1
    "simpo": Objective(simpo_loss, normalised_margin, {"beta": 2.0, "gamma": 1.0}, lr=5e-7),  # best; also (10, 5, 3e-7)
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="the SFT checkpoint to start from (folder or Hub id)")
parser.add_argument("--data", required=True, help="pref.jsonl from `data.py prepare` (problem, chosen, rejected)")
parser.add_argument("--loss", choices=OBJECTIVES, default="redi", help="the objective (default: %(default)s)")
for _name in dict.fromkeys(h for o in OBJECTIVES.values() for h in o.hparams):
    _defaults = ", ".join(f"{k} {o.hparams[_name]}" for k, o in OBJECTIVES.items() if _name in o.hparams)
    parser.add_argument(f"--{_name}", type=float, default=None, help=f"default: {_defaults} (PAPER.md §3)")
parser.add_argument("--max-prompt-length", type=int, default=800,
                    help="longer prompts keep their last tokens, as the authors' keep_end truncation (PAPER.md §3)")
parser.add_argument("--max-response-length", type=int, default=19000,
                    help="longer responses keep their first tokens (PAPER.md §3)")
parser.add_argument("--ref-cache", default=None,
                    help="reference log-probs file (default: beside --data, named by a hash of model and data)")
parser.add_argument("--collapse-drop", type=float, default=0.5,
                    help="collapse warning: chosen and rejected LogPS both this many nats/token below their start ...")
parser.add_argument("--collapse-surge", type=float, default=3.0,
                    help="... while update_norm / lr exceeds this multiple of its median so far")
# PAPER.md §3: one epoch over D_Pref, 32 pairs per step (1,661 steps), a checkpoint every 200 steps (the authors'
# recipe); the LR follows --loss
add_training_args(parser, lr=None, epochs=1, batch_size=32, save_every=200)


def resolve_objective(args):
    """The chosen objective, with its unset hyperparameters and LR at their defaults. A hyperparameter
    flag that the objective does not take is an error, not silently ignored."""
    objective = OBJECTIVES[args.loss]
    for name in dict.fromkeys(h for o in OBJECTIVES.values() for h in o.hparams):
        if name not in objective.hparams and getattr(args, name) is not None:
            parser.error(f"--{name} does not apply to --loss {args.loss} (its hyperparameters: "
                         f"{', '.join('--' + h for h in objective.hparams) or 'none'})")
    for name, default in objective.hparams.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.lr is None:
        args.lr = objective.lr
    return objective


# -----------------------------------------------------------------------------
# data: one pair = (prompt ids, chosen response ids, rejected response ids)


def load_pairs(path, tokenizer, max_prompt, max_response, append_eos=True):
    """An empty response is trained on, as the authors' trainers do (PAPER.md §1): |y| is then the
    template's closing tokens and the EOS."""
    rows = read_jsonl(path, ["problem", "chosen", "rejected"])
    pairs, skipped, cut_prompt, cut_response = [], {"chosen == rejected": 0, "prompt/response split broken": 0}, 0, 0
    for i in range(0, len(rows), 1024):
        block = rows[i:i + 1024]
        problems = [r["problem"] for r in block]
        chosen = encode_chats(tokenizer, problems, [r["chosen"] for r in block], append_eos=append_eos)
        rejected = encode_chats(tokenizer, problems, [r["rejected"] for r in block], append_eos=append_eos)
        for row, c, r in zip(block, chosen, rejected):
            if row["chosen"] == row["rejected"]:
                skipped["chosen == rejected"] += 1
            elif c is None or r is None:
                skipped["prompt/response split broken"] += 1
            else:
                prompt, y_w, y_l = c[0][:c[1]], c[0][c[1]:], r[0][r[1]:]
                cut_prompt += len(prompt) > max_prompt
                cut_response += len(y_w) > max_response or len(y_l) > max_response
                pairs.append((prompt[-max_prompt:], y_w[:max_response], y_l[:max_response]))
    print0(f"data: {len(rows):,} rows, {len(pairs):,} pairs used; prompts cut to their last {max_prompt:,} "
           f"tokens: {cut_prompt:,}; pairs with a response cut to {max_response:,} tokens: {cut_response:,}")
    if any(skipped.values()):
        print0("warning: skipped bad rows: " + ", ".join(f"{k}: {v:,}" for k, v in skipped.items() if v))
    return pairs


def pack_pairs(pairs):
    """B pairs -> one packed row of 2B sequences: prompt + chosen, then prompt + rejected, pair by pair."""
    return pack([seq for p, w, l in pairs for seq in ((p + w, len(p)), (p + l, len(p)))])


def pair_logps(model, batch):
    """One forward for the chosen and rejected traces of a packed micro-batch together. Returns Pairs."""
    lp = sequence_logps(model, batch).view(-1, 2)  # (B, 2): chosen, rejected
    lens = batch.lengths.view(-1, 2).to(lp.dtype)  # (B, 2)
    return Pairs(lp[:, 0], lp[:, 1], lens[:, 0], lens[:, 1])


# -----------------------------------------------------------------------------
# reference log-probs (DPO): computed once, with the starting model, before any update


def ref_cache_path(args):
    """Named by what determines the values: the starting weights, the data, the truncation."""
    h = hashlib.sha256()
    model = Path(args.model)
    files = sorted(model.glob("*.safetensors")) + sorted(model.glob("*.bin")) if model.is_dir() else []
    h.update(json.dumps([str(model.resolve()) if model.is_dir() else args.model,
                         [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                         args.max_prompt_length, args.max_response_length, args.append_eos]).encode())
    with open(args.data, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return Path(args.ref_cache or Path(args.data).with_name(f"ref_logps_{h.hexdigest()[:16]}.pt"))


@torch.no_grad()
def reference_logps(model, pairs, args, device):
    """(N, 2) float64 CPU tensor of lp_ref(y_w), lp_ref(y_l). Every rank runs the same number of forwards
    (FSDP gathers are collectives); ranks with nothing left repeat their last batch and discard it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]) + len(pairs[i][2]))
    mine = order[rank::world]
    n_batches = -(-len(order[0::world]) // args.micro_batch_size)
    indices, values = [], []
    model.eval()
    for b in range(n_batches):
        idx = mine[b * args.micro_batch_size:(b + 1) * args.micro_batch_size] or mine[-1:] or order[:1]
        p = pair_logps(model, pack_pairs([pairs[i] for i in idx]).to(device))
        indices += idx
        values.append(torch.stack([p.chosen_logps, p.rejected_logps], -1))  # (B, 2), stays on the device
        if b % 50 == 0 or b == n_batches - 1:
            print0(f"reference log-probs: batch {b + 1}/{n_batches}")
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(zip(indices, torch.cat(values).double().cpu().tolist())))
    merged = {i: v for part in gathered for i, v in part.items()}
    return torch.tensor([merged[i] for i in range(len(pairs))], dtype=torch.float64)


def load_or_compute_reference(model, pairs, args, device):
    path = ref_cache_path(args)
    if path.exists():
        ref = torch.load(path)
        if ref.shape == (len(pairs), 2):
            print0(f"reference log-probs: loaded {path}")
            return ref
        print0(f"reference log-probs: {path} holds {ref.shape[0]} pairs, not {len(pairs)}; recomputing")
    ref = reference_logps(model, pairs, args, device)
    if dist.get_rank() == 0:
        torch.save(ref, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    print0(f"reference log-probs: computed with {args.model}, cached in {path}")
    return ref


# -----------------------------------------------------------------------------
# one optimiser step


def train_step(model, optimizer, batches, ref, lr, objective, args, device):
    """One optimiser step over this rank's micro-batches: (data.Packed on the device, the pairs' indices)
    each. ref: (N, 2) reference log-probs on the device, or None. Returns the step's global statistics,
    by name, as 0-d tensors on the device."""
    hparams = {name: getattr(args, name) for name in objective.hparams}
    sums = dict.fromkeys(("loss", "chosen_logps_per_token", "rejected_logps_per_token", "margin",
                          "reward_accuracy", "tokens"), 0)  # this rank's sums over its pairs
    for batch, idx in accumulate(model, batches):
        p = pair_logps(model, batch)
        if objective.needs_reference:
            ref_w, ref_l = ref[idx].to(p.chosen_logps.dtype).unbind(-1)
            p = p._replace(ref_chosen_logps=ref_w, ref_rejected_logps=ref_l)
        # the mean over the global batch (all micro-batches, all ranks); right only because common.shard_model
        # has FSDP sum the gradients over ranks (not average them)
        loss = objective.loss(p, **hparams).sum() / args.batch_size
        loss.backward()
        with torch.no_grad():
            margin = objective.margin(p)
            for name, value in (("loss", loss), ("chosen_logps_per_token", p.chosen_logps / p.chosen_lens),
                                ("rejected_logps_per_token", p.rejected_logps / p.rejected_lens),
                                ("margin", margin), ("reward_accuracy", (margin > 0).float())):
                sums[name] = sums[name] + value.sum()
            sums["tokens"] += batch.input_ids.shape[1]
    totals = dict(zip(sums, global_sum(list(sums.values()), device)))  # one collective for all of them
    grad_norm, update_norm = clip_and_step(model, optimizer, lr, args.max_grad_norm, args.plain)
    per_pair = {k: v / args.batch_size for k, v in totals.items() if k not in ("loss", "tokens")}
    return {"loss": totals["loss"], "grad_norm": grad_norm, "update_norm": update_norm, **per_pair,
            "tokens": totals["tokens"]}


# -----------------------------------------------------------------------------


def main():
    args = parser.parse_args()
    objective = resolve_objective(args)
    rank, world, device = init_dist()
    accumulation = accumulation_steps(args, world)
    tokenizer = load_tokenizer(args.model)
    check_chat_template(tokenizer, append_eos=args.append_eos)
    pairs = load_pairs(args.data, tokenizer, args.max_prompt_length, args.max_response_length, args.append_eos)
    lengths = [2 * len(p) + len(w) + len(l) for p, w, l in pairs]
    steps_per_epoch = len(pairs) // args.batch_size
    if steps_per_epoch == 0:
        die(f"--data has {len(pairs)} usable pairs, fewer than one global batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    model, optimizer, n_params = build_model(args, device)
    # The reference is the starting model itself, evaluated before any update: no second model.
    ref = load_or_compute_reference(model, pairs, args, device).to(device) if objective.needs_reference else None
    start_step, metrics = start_run(args, model, optimizer)
    setting = ", ".join(f"{name} {getattr(args, name)}" for name in objective.hparams)
    print0(f"{args.loss} ({setting}, lr {args.lr}) from {args.model}: "
           f"{n_params / 1e6:.1f}M parameters, {world} rank(s) on {device.type}; {len(pairs):,} pairs, "
           f"{total_steps} steps; batch {args.batch_size} pairs = {args.micro_batch_size} x {accumulation} x {world} ranks")

    history = [r for r in map(json.loads, metrics.path.read_text().splitlines())] if rank == 0 else []
    collapsed = any(r.get("collapse") for r in history)
    model.train()
    timer = StepTimer()
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, args.lr, args.warmup_frac)
        batches = [(pack_pairs([pairs[i] for i in idx]).to(device), idx)
                   for idx in micro_batches(batch_for_step(step, len(pairs), args.batch_size, args.seed),
                                            lengths, args.micro_batch_size, rank, world)]
        stats = to_host(train_step(model, optimizer, batches, ref, lr, objective, args, device), device)  # the one wait
        check_finite(stats["loss"], step + 1, args.out)

        dt = timer.lap()
        record = {"step": step + 1, "lr": lr, **stats, "tokens_per_s": stats["tokens"] / dt,
                  "peak_mem_gb": peak_memory_gb(device), "step_time_s": dt}
        record["collapse"] = rank == 0 and is_collapsing(history, record, args)  # the history lives on rank 0
        history.append(record)
        if record["collapse"] and not collapsed:
            collapsed = True
            print0(f"WARNING: collapse at step {step + 1}: chosen and rejected LogPS fell from "
                   f"{history[0]['chosen_logps_per_token']:.3f} / {history[0]['rejected_logps_per_token']:.3f} to "
                   f"{record['chosen_logps_per_token']:.3f} / {record['rejected_logps_per_token']:.3f} while the "
                   f"update norm surged (the paper's collapse signature, Fig. 3-6); consider a lower LR or alpha")
        line = (f"step {step + 1:5d}/{total_steps} | loss {stats['loss']:.4f} | lr {lr:.2e} | "
                f"gnorm {stats['grad_norm']:6.3f} | upd {stats['update_norm']:.2e} | "
                f"logps w {stats['chosen_logps_per_token']:7.4f} l {stats['rejected_logps_per_token']:7.4f} | "
                f"acc {stats['reward_accuracy']:4.0%} | tok/s {record['tokens_per_s']:8,.0f} | "
                f"mem {record['peak_mem_gb']:5.1f}G | {dt:5.1f}s" + (" | COLLAPSE" if record["collapse"] else ""))
        if end_step(args, step + 1, total_steps, record, line, model, optimizer, tokenizer, metrics):
            break
        timer.lap()  # checkpoint time is not step time
    cleanup()


def is_collapsing(history, record, args):
    """The paper's collapse signature: chosen and rejected LogPS both far below where the run started
    while the size of the update (per unit of learning rate, so warmup and decay do not trigger it)
    surges past its median so far. A warning, not a stop."""
    if len(history) < 5 or record["lr"] == 0:  # the first step's LR is 0 (warmup from 0): no update to compare
        return False
    start, per_lr = history[0], sorted(r["update_norm"] / r["lr"] for r in history if r["lr"] > 0)
    drop_w = start["chosen_logps_per_token"] - record["chosen_logps_per_token"]
    drop_l = start["rejected_logps_per_token"] - record["rejected_logps_per_token"]
    surge = record["update_norm"] / record["lr"] > args.collapse_surge * per_lr[len(per_lr) // 2]
    return bool(drop_w > args.collapse_drop and drop_l > args.collapse_drop and surge)


if __name__ == "__main__":
    main()
