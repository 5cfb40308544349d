"""Stage 1: supervised fine-tuning on the teacher's correct traces, D_SFT (PAPER.md §2, Eq. 1).

    L_SFT = - (1 / #response tokens in the step) * sum over those tokens of log pi(y_t | x, y_<t)

One process (CPU or one GPU), or FSDP2 over several with torchrun:
    python sft.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft.jsonl --out runs/sft
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft.jsonl \
        --out runs/sft --epochs 5 --max-position-embeddings 32768 --rope-theta 300000 --grad-checkpointing
Resume after a crash with the same command plus --resume.
"""
import argparse

import torch

from common import (StepTimer, accumulate, accumulation_steps, add_training_args, build_model, check_finite, cleanup,
                    clip_and_step, die, end_step, global_sum, init_dist, load_tokenizer, lr_at, open_run_folder,
                    peak_memory_gb, positive_int, print0, start_run, to_host)
from data import (batch_for_step, check_chat_template, cut_texts, encode_chats, max_token_chars, micro_batches, pack,
                  read_jsonl)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B", help="base model: Hub id or folder (PAPER.md §2)")
parser.add_argument("--data", required=True, help="sft.jsonl from `data.py prepare` (fields problem, response)")
parser.add_argument("--max-length", type=positive_int, default=32768,
                    help="longer sequences are cut to this many tokens (PAPER.md §2)")
parser.add_argument("--train-eos", action="store_true",
                    help="also train the EOS appended after each conversation. Off by default, as in the authors' "
                         "SFT: their collator drops the label of every pad token, and their pad token is the EOS, so "
                         "the EOS is in the input but never a target (PAPER.md §2). Stage 2 trains it either way")
# PAPER.md §2: LR 5e-5, batch 128 sequences; 3 epochs = the paper's ablation start point, 5 = its final SFT model
add_training_args(parser, lr=5e-5, epochs=3, batch_size=128, save_every=200)


def load_sft_examples(path, tokenizer, max_length, append_eos=True, train_eos=False):
    """(input_ids, n_prompt, n_trained) per usable row: the response is input_ids[n_prompt:], and its first
    n_trained tokens are trained. Unless train_eos, a sequence that ends with the EOS keeps it as input without
    training it (PAPER.md §2). Rows whose prompt/response split is broken are skipped."""
    rows = read_jsonl(path, ["problem", "response"])
    examples, broken, cut = [], 0, 0
    chars = max_token_chars(tokenizer)  # texts far over max_length are cut before tokenising (data.cut_texts)
    for i in range(0, len(rows), 1024):
        block = rows[i:i + 1024]
        problems = cut_texts([r["problem"] for r in block], max_length, chars)  # the first tokens are kept: exact
        responses = cut_texts([r["response"] for r in block], max_length, chars)
        for enc in encode_chats(tokenizer, problems, responses, append_eos=append_eos):
            if enc is None:
                broken += 1
                continue
            ids, n_prompt = enc
            if len(ids) > max_length:
                ids, cut = ids[:max_length], cut + 1
            n_trained = len(ids) - n_prompt - (not train_eos and ids[-1] == tokenizer.eos_token_id)
            if n_trained > 0:
                examples.append((ids, n_prompt, n_trained))
            else:
                broken += 1  # the prompt alone fills max_length: nothing to learn from
    print0(f"data: {len(rows):,} rows, {len(examples):,} used, {cut:,} cut to {max_length:,} tokens, "
           f"{broken:,} skipped (prompt/response split broken, or no response left)")
    return examples


def train_step(model, optimizer, batches, lr, args, device):
    """One optimiser step over this rank's micro-batches (data.Packed, on the device). Returns the step's
    global loss, gradient norm, update norm and token count as 0-d tensors on the device."""
    # The loss is a mean over the response tokens of the whole optimiser step: every micro-batch of every
    # rank. Their count is known on the host before any forward (a tensor's shape, not its values). Dividing
    # by the global count is right only because common.shard_model has FSDP sum the gradients over ranks (not
    # average them).
    step_tokens, tokens = global_sum([sum(b.targets.shape[0] for b in batches),
                                      sum(b.input_ids.shape[1] for b in batches)], device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # this rank's share of the step's loss
    for b in accumulate(model, batches):
        loss = -model(*b.model_inputs).sum() / step_tokens
        loss.backward()
        loss_sum += loss.detach()
    loss = global_sum([loss_sum], device)[0]
    grad_norm, update_norm = clip_and_step(model, optimizer, lr, args.max_grad_norm, args.plain)
    return {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm, "tokens": tokens}


def main():
    args = parser.parse_args()
    rank, world, device = init_dist()
    accumulation = accumulation_steps(args, world)
    open_run_folder(args, parser)
    tokenizer = load_tokenizer(args.model)
    check_chat_template(tokenizer, append_eos=args.append_eos)
    examples = load_sft_examples(args.data, tokenizer, args.max_length, args.append_eos, args.train_eos)
    lengths = [len(ids) for ids, *_ in examples]
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        die(f"--data has {len(examples)} usable examples, fewer than one global batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    model, optimizer, n_params = build_model(args, device)
    start_step, metrics = start_run(args, model, optimizer, total_steps)
    print0(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {world} rank(s) on {device.type}; "
           f"{len(examples):,} examples, {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
           f"batch {args.batch_size} = {args.micro_batch_size} x {accumulation} accumulation x {world} ranks")

    model.train()
    timer = StepTimer()
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, args.lr, args.warmup_frac)
        batches = [pack([examples[i] for i in mb]).to(device)
                   for mb in micro_batches(batch_for_step(step, len(examples), args.batch_size, args.seed),
                                           lengths, args.micro_batch_size, rank, world)]
        stats = to_host(train_step(model, optimizer, batches, lr, args, device), device)  # the step's one wait
        check_finite(stats, step + 1, args.out)  # before anything of this step is logged or saved

        dt = timer.lap()
        record = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "lr": lr, **stats,
                  "tokens_per_s": stats["tokens"] / dt, "peak_mem_gb": peak_memory_gb(device), "step_time_s": dt}
        line = (f"step {step + 1:5d}/{total_steps} | loss {stats['loss']:.4f} | lr {lr:.2e} | "
                f"gnorm {stats['grad_norm']:6.3f} | tok/s {record['tokens_per_s']:9,.0f} | "
                f"mem {record['peak_mem_gb']:5.1f}G | {dt:5.1f}s")
        if end_step(args, step + 1, total_steps, record, line, model, optimizer, tokenizer, metrics):
            break
        timer.lap()  # checkpoint time is not step time
    cleanup()


if __name__ == "__main__":
    main()
