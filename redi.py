"""Stage 2: REDI on (problem, correct trace, incorrect trace) triplets, D_Pref (SPEC 3), with DPO and
SimPO beside it as baselines. Initialised from the SFT checkpoint.

    python redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi            # alpha 0.8
    torchrun --nproc_per_node 8 redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi
    ... --alpha 1.0                                   # symmetric REDI (Eq. 4)
    ... --loss dpo --lr 2e-7                          # DPO, beta 0.001 (Eq. 2)
    ... --loss simpo --lr 5e-7                        # SimPO, beta 2, gamma 1 (Eq. 3)
Resume after a crash with the same command plus --resume.

Notation: lp(y) = sum over the response tokens of log pi(y_t | x, y_<t); |y| = response length.
"""
import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (StepTimer, accumulation_steps, add_training_args, all_reduce_sum, build_model, check_finite,
                    cleanup, clip_and_step, die, end_step, init_dist, load_tokenizer, lr_at, peak_memory_gb,
                    print0, start_run)
from data import batch_for_step, check_chat_template, collate, encode_chats, micro_batches, read_jsonl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="the SFT checkpoint to start from (folder or Hub id)")
parser.add_argument("--data", required=True, help="pref.jsonl from `data.py prepare` (problem, chosen, rejected)")
parser.add_argument("--loss", choices=["redi", "dpo", "simpo"], default="redi")
parser.add_argument("--alpha", type=float, default=0.8, help="REDI: weight of the rejected term (SPEC 3: 0.8; 1.0 = symmetric)")
parser.add_argument("--beta", type=float, default=None,
                    help="DPO: 0.001 (best of 0.001/0.01/0.1), SimPO: 2.0 by default (SPEC 3; SimPO's other: beta 10, gamma 5)")
parser.add_argument("--gamma", type=float, default=1.0, help="SimPO target margin (SPEC 3)")
parser.add_argument("--max-prompt-length", type=int, default=800,
                    help="longer prompts keep their last tokens, as the authors' keep_end truncation (SPEC 3)")
parser.add_argument("--max-response-length", type=int, default=19000, help="longer responses keep their first tokens (SPEC 3)")
parser.add_argument("--ref-cache", default=None,
                    help="DPO: file for the reference log-probs (default: beside --data, named by a hash of model and data)")
parser.add_argument("--collapse-drop", type=float, default=0.5,
                    help="collapse warning: chosen and rejected LogPS both this many nats/token below their start ...")
parser.add_argument("--collapse-surge", type=float, default=3.0,
                    help="... while update_norm / lr exceeds this multiple of its median so far")
# SPEC 3: REDI final run alpha 0.8 at LR 1e-6; one epoch over D_Pref, 32 pairs per step (1,661 steps)
add_training_args(parser, lr=1e-6, epochs=1, batch_size=32, save_every=100)


# -----------------------------------------------------------------------------
# the objectives: per-pair tensors (B,) in, per-pair losses (B,) out


def redi_loss(chosen_logps, rejected_logps, chosen_lens, rejected_lens, alpha):
    """Eq. 5: length-normalised likelihood of the correct trace up, alpha times that of the incorrect
    trace down. alpha = 1 is symmetric REDI (Eq. 4); alpha = 0 is SFT on the chosen trace."""
    return -chosen_logps / chosen_lens + alpha * rejected_logps / rejected_lens


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 2, against the reference (the starting SFT model)."""
    return -F.logsigmoid(beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)))


def simpo_loss(chosen_logps, rejected_logps, chosen_lens, rejected_lens, beta, gamma):
    """Eq. 3, pure SimPO (no extra NLL term)."""
    return -F.logsigmoid(beta * (chosen_logps / chosen_lens - rejected_logps / rejected_lens) - gamma)


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


def collate_pairs(pairs, pad_id):
    """B pairs -> 2B sequences in one batch, chosen first: rows [0, B) chosen, [B, 2B) rejected."""
    return collate([(p + w, len(p)) for p, w, _ in pairs] + [(p + l, len(p)) for p, _, l in pairs], pad_id)


def pair_logps(model, input_ids, attention_mask, loss_mask, device):
    """One forward for chosen and rejected together. Returns lp(y_w), lp(y_l), |y_w|, |y_l|, each (B,)."""
    logps = model(input_ids.to(device), attention_mask.to(device), loss_mask.to(device))  # (2B, T)
    lp, lens = logps.sum(-1), loss_mask.to(device).sum(-1).float()  # (2B,)
    B = input_ids.shape[0] // 2
    return lp[:B], lp[B:], lens[:B], lens[B:]


# -----------------------------------------------------------------------------
# DPO's reference log-probs: computed once, with the starting model, before any update


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
def reference_logps(model, pairs, args, pad_id, device):
    """(N, 2) tensor of lp_ref(y_w), lp_ref(y_l). Every rank runs the same number of forwards (FSDP
    gathers are collectives); ranks with nothing left repeat their last batch and discard it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]) + len(pairs[i][2]))
    mine = order[rank::world]
    n_batches = -(-len(order[0::world]) // args.micro_batch_size)
    out = {}
    model.eval()
    for b in range(n_batches):
        idx = mine[b * args.micro_batch_size:(b + 1) * args.micro_batch_size] or mine[-1:] or order[:1]
        w, l, _, _ = pair_logps(model, *collate_pairs([pairs[i] for i in idx], pad_id), device)
        out.update({i: (float(x), float(y)) for i, x, y in zip(idx, w, l)})
        if b % 50 == 0 or b == n_batches - 1:
            print0(f"reference log-probs: batch {b + 1}/{n_batches}")
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    merged = {i: v for part in gathered for i, v in part.items()}
    return torch.tensor([merged[i] for i in range(len(pairs))], dtype=torch.float64)


def load_or_compute_reference(model, pairs, args, pad_id, device):
    path = ref_cache_path(args)
    if path.exists():
        ref = torch.load(path)
        if ref.shape == (len(pairs), 2):
            print0(f"reference log-probs: loaded {path}")
            return ref
        print0(f"reference log-probs: {path} holds {ref.shape[0]} pairs, not {len(pairs)}; recomputing")
    ref = reference_logps(model, pairs, args, pad_id, device)
    if dist.get_rank() == 0:
        torch.save(ref, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    print0(f"reference log-probs: computed with {args.model}, cached in {path}")
    return ref


# -----------------------------------------------------------------------------


def main():
    args = parser.parse_args()
    if args.beta is None:
        args.beta = {"dpo": 0.001, "simpo": 2.0}.get(args.loss)
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
    # DPO's reference is the starting model itself, evaluated before any update: no second model.
    ref = load_or_compute_reference(model, pairs, args, tokenizer.pad_token_id, device) if args.loss == "dpo" else None
    start_step, metrics = start_run(args, model, optimizer)
    setting = {"redi": f"alpha {args.alpha}", "dpo": f"beta {args.beta}", "simpo": f"beta {args.beta}, gamma {args.gamma}"}
    print0(f"{args.loss} ({setting[args.loss]}) from {args.model}: "
           f"{n_params / 1e6:.1f}M parameters, {world} rank(s) on {device.type}; {len(pairs):,} pairs, "
           f"{total_steps} steps; batch {args.batch_size} pairs = {args.micro_batch_size} x {accumulation} x {world} ranks")

    history = [r for r in map(json.loads, metrics.path.read_text().splitlines())] if rank == 0 else []
    collapsed = any(r.get("collapse") for r in history)
    model.train()
    timer = StepTimer()
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, args.lr, args.warmup_frac)
        batch_idx = micro_batches(batch_for_step(step, len(pairs), args.batch_size, args.seed),
                                  lengths, args.micro_batch_size, rank, world)
        stats = torch.zeros(7, dtype=torch.float64)  # this rank's sums, all-reduced below
        for idx in batch_idx:
            input_ids, attention_mask, loss_mask = collate_pairs([pairs[i] for i in idx], tokenizer.pad_token_id)
            chosen_logps, rejected_logps, chosen_lens, rejected_lens = pair_logps(
                model, input_ids, attention_mask, loss_mask, device)
            if args.loss == "redi":
                losses = redi_loss(chosen_logps, rejected_logps, chosen_lens, rejected_lens, args.alpha)
                margin = chosen_logps / chosen_lens - rejected_logps / rejected_lens
            elif args.loss == "simpo":
                losses = simpo_loss(chosen_logps, rejected_logps, chosen_lens, rejected_lens, args.beta, args.gamma)
                margin = chosen_logps / chosen_lens - rejected_logps / rejected_lens
            else:
                ref_w, ref_l = ref[idx].to(device, torch.float32).unbind(-1)
                losses = dpo_loss(chosen_logps, rejected_logps, ref_w, ref_l, args.beta)
                margin = (chosen_logps - ref_w) - (rejected_logps - ref_l)
            loss = losses.sum() / args.batch_size  # mean over the global batch of pairs (all micro-batches, all ranks)
            loss.backward()
            with torch.no_grad():
                stats += torch.tensor([loss.item(), float((chosen_logps / chosen_lens).sum()),
                                       float((rejected_logps / rejected_lens).sum()), float(margin.sum()),
                                       float((margin > 0).sum()), float(attention_mask.sum()),
                                       attention_mask.numel()], dtype=torch.float64)
        loss, chosen_lp, rejected_lp, margin, accuracy, real_tokens, padded_tokens = all_reduce_sum(stats.tolist(), device)
        check_finite(loss, step + 1, args.out)
        grad_norm, update_norm = clip_and_step(model, optimizer, lr, args.max_grad_norm)

        dt = timer.lap()
        n = args.batch_size
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "update_norm": update_norm,
                  "chosen_logps_per_token": chosen_lp / n, "rejected_logps_per_token": rejected_lp / n,
                  "margin": margin / n, "reward_accuracy": accuracy / n, "tokens": int(real_tokens),
                  "tokens_per_s": real_tokens / dt, "real_token_frac": real_tokens / padded_tokens,
                  "peak_mem_gb": peak_memory_gb(device), "step_time_s": dt}
        record["collapse"] = rank == 0 and is_collapsing(history, record, args)  # the history lives on rank 0
        history.append(record)
        if record["collapse"] and not collapsed:
            collapsed = True
            print0(f"WARNING: collapse at step {step + 1}: chosen and rejected LogPS fell from "
                   f"{history[0]['chosen_logps_per_token']:.3f} / {history[0]['rejected_logps_per_token']:.3f} to "
                   f"{record['chosen_logps_per_token']:.3f} / {record['rejected_logps_per_token']:.3f} while the "
                   f"update norm surged (the paper's collapse signature, Fig. 3-6); consider a lower LR or alpha")
        line = (f"step {step + 1:5d}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:6.3f} | "
                f"upd {update_norm:.2e} | logps w {record['chosen_logps_per_token']:7.4f} "
                f"l {record['rejected_logps_per_token']:7.4f} | acc {record['reward_accuracy']:4.0%} | "
                f"tok/s {record['tokens_per_s']:8,.0f} | mem {record['peak_mem_gb']:5.1f}G | {dt:5.1f}s"
                + (" | COLLAPSE" if record["collapse"] else ""))
        if end_step(args, step + 1, total_steps, record, line, model, optimizer, tokenizer, metrics):
            break
        timer.lap()  # checkpoint time is not step time
    cleanup()


def is_collapsing(history, record, args):
    """The paper's collapse signature: chosen and rejected LogPS both far below where the run started
    while the size of the update (per unit of learning rate, so warmup and decay do not trigger it)
    surges past its median so far. A warning, not a stop."""
    if len(history) < 5:
        return False
    start, per_lr = history[0], sorted(r["update_norm"] / r["lr"] for r in history)
    drop_w = start["chosen_logps_per_token"] - record["chosen_logps_per_token"]
    drop_l = start["rejected_logps_per_token"] - record["rejected_logps_per_token"]
    surge = record["update_norm"] / record["lr"] > args.collapse_surge * per_lr[len(per_lr) // 2]
    return bool(drop_w > args.collapse_drop and drop_l > args.collapse_drop and surge)


if __name__ == "__main__":
    main()
