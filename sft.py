"""Stage 1: supervised fine-tuning on the teacher's correct traces, D_SFT (SPEC 2, Eq. 1).

    L_SFT = - (1 / #response tokens in the step) * sum over those tokens of log pi(y_t | x, y_<t)

One process (CPU or one GPU), or FSDP2 over several with torchrun:
    python sft.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft.jsonl --out runs/sft
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft.jsonl \
        --out runs/sft --epochs 5 --max-position-embeddings 32768 --rope-theta 300000 --grad-checkpointing
Resume after a crash with the same command plus --resume.
"""
import argparse
import os

from common import (Metrics, StepTimer, all_reduce_sum, check_finite, cleanup, clip_and_step, die,
                    init_dist, latest_checkpoint, load_model, load_tokenizer, load_train_state, lr_at,
                    make_optimizer, peak_memory_gb, print0, save_checkpoint, save_config, shard_model)
from data import batch_for_step, check_chat_template, collate, encode_chats, micro_batches, read_jsonl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model and data
parser.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B", help="base model: Hub id or folder (SPEC 2)")
parser.add_argument("--data", required=True, help="sft.jsonl from `data.py prepare` (fields problem, response)")
parser.add_argument("--out", required=True, help="output folder: config, metrics.jsonl, ckpt/step_*")
parser.add_argument("--max-position-embeddings", type=int, default=None,
                    help="override the config's context window (authors: 32768 for Qwen2.5-Math, SPEC 2)")
parser.add_argument("--rope-theta", type=float, default=None, help="override RoPE theta (authors: 300000, SPEC 2)")
parser.add_argument("--attn-implementation", default="sdpa", help="sdpa, eager, flash_attention_2, ...")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
# optimisation (SPEC 2)
parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--warmup-frac", type=float, default=0.1, help="linear warmup over this share of steps, then linear decay to 0")
parser.add_argument("--epochs", type=int, default=3, help="3 = the paper's ablation start point, 5 = its final SFT model")
parser.add_argument("--batch-size", type=int, default=128, help="global batch in sequences = micro-batch x accumulation x ranks")
parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward on one rank")
parser.add_argument("--max-grad-norm", type=float, default=1.0)
parser.add_argument("--max-length", type=int, default=32768, help="longer sequences are cut to this many tokens")
parser.add_argument("--seed", type=int, default=0, help="data order")
# memory
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer's activations in backward")
parser.add_argument("--logprob-chunk", type=int, default=1024, help="tokens per LM-head chunk (bounds the logits' memory)")
# output
parser.add_argument("--save-every", type=int, default=200, help="checkpoint every N optimiser steps (and at the end)")
parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
parser.add_argument("--stop-at-step", type=int, default=None,
                    help="checkpoint and exit after this step without changing the schedule (time-limited jobs)")


def load_sft_examples(path, tokenizer, max_length):
    """(input_ids, n_prompt) per usable row; rows whose prompt/response split is broken are skipped."""
    rows = read_jsonl(path, ["problem", "response"])
    examples, broken, cut = [], 0, 0
    for i in range(0, len(rows), 1024):
        block = rows[i:i + 1024]
        for enc in encode_chats(tokenizer, [r["problem"] for r in block], [r["response"] for r in block]):
            if enc is None:
                broken += 1
                continue
            ids, n_prompt = enc
            if len(ids) > max_length:
                ids, cut = ids[:max_length], cut + 1
            if n_prompt < len(ids):
                examples.append((ids, n_prompt))
            else:
                broken += 1  # the prompt alone fills max_length: nothing to learn from
    print0(f"data: {len(rows):,} rows, {len(examples):,} used, {cut:,} cut to {max_length:,} tokens, "
           f"{broken:,} skipped (prompt/response split broken, or no response left)")
    return examples


def main():
    args = parser.parse_args()
    rank, world, device = init_dist()
    accumulation, rem = divmod(args.batch_size, args.micro_batch_size * world)
    if rem or accumulation == 0:
        die(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size} "
            f"x {world} ranks")
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {args.out}/ckpt, starting from --model")

    tokenizer = load_tokenizer(args.model)
    check_chat_template(tokenizer)
    examples = load_sft_examples(args.data, tokenizer, args.max_length)
    lengths = [len(ids) for ids, _ in examples]
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        die(f"--data has {len(examples)} usable examples, fewer than one global batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch

    lm = load_model(str(ckpt or args.model), args.max_position_embeddings, args.rope_theta,
                    args.attn_implementation, args.trust_remote_code)
    n_params = sum(p.numel() for p in lm.parameters())
    model = shard_model(lm, device, args.logprob_chunk, args.grad_checkpointing)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start_step = load_train_state(model, optimizer, ckpt) if ckpt else 0
    save_config(args, args.out)
    metrics = Metrics(args.out, resume_step=start_step)
    print0(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {world} rank(s) on {device.type}; "
           f"{len(examples):,} examples, {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
           f"batch {args.batch_size} = {args.micro_batch_size} x {accumulation} accumulation x {world} ranks"
           + (f"; resuming after step {start_step} from {ckpt}" if ckpt else ""))

    if start_step >= total_steps:
        print0(f"{ckpt} is already the last step ({total_steps}); nothing to do")
        return cleanup()
    model.train()
    timer = StepTimer()
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, args.lr, args.warmup_frac)
        batch = [collate([examples[i] for i in mb], tokenizer.pad_token_id)
                 for mb in micro_batches(batch_for_step(step, len(examples), args.batch_size, args.seed),
                                         lengths, args.micro_batch_size, rank, world)]
        # Global counts over every micro-batch of every rank: the loss is a mean over the step's tokens.
        step_tokens, real_tokens, padded_tokens = all_reduce_sum(
            [sum(float(m.sum()) for _, _, m in batch), sum(float(a.sum()) for _, a, _ in batch),
             sum(a.numel() for _, a, _ in batch)], device)

        loss_sum = 0.0  # this rank's share of the step's loss
        for input_ids, attention_mask, loss_mask in batch:
            logps = model(input_ids.to(device), attention_mask.to(device), loss_mask.to(device))  # (B, T)
            loss = -logps.sum() / step_tokens  # token-level mean over the whole optimiser step, all ranks
            loss.backward()
            loss_sum += loss.item()
        loss = all_reduce_sum([loss_sum], device)[0]
        check_finite(loss, step + 1, args.out)
        grad_norm = clip_and_step(model, optimizer, lr, args.max_grad_norm)

        dt = timer.lap()
        record = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens": int(real_tokens), "tokens_per_s": real_tokens / dt,
                  "real_token_frac": real_tokens / padded_tokens, "peak_mem_gb": peak_memory_gb(device),
                  "step_time_s": dt}
        metrics.log(record)
        print0(f"step {step + 1:5d}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:6.3f} | "
               f"tok/s {record['tokens_per_s']:9,.0f} | real {record['real_token_frac']:4.0%} | "
               f"mem {record['peak_mem_gb']:5.1f}G | {dt:5.1f}s")
        done = step + 1 == total_steps or step + 1 == args.stop_at_step
        if (step + 1) % args.save_every == 0 or done:
            path = save_checkpoint(model, optimizer, tokenizer, args, args.out, step + 1)
            print0(f"saved {path}")
            timer.lap()  # checkpoint time is not step time
        if step + 1 == args.stop_at_step:
            break
    if rank == 0 and step + 1 == total_steps:  # OUT/final -> the last checkpoint, for the next stage
        final = os.path.join(args.out, "final")
        if os.path.islink(final):
            os.remove(final)
        os.symlink(os.path.relpath(path, args.out), final)
    cleanup()


if __name__ == "__main__":
    main()
