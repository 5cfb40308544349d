"""Evaluation (PAPER.md §4): sample answers from a Hugging Face model, grade them with math-verify, and report
pass@1 with its SEM, pass@k and generation statistics (response tokens, "Wait" counts). Two generation engines
(--engine): "slots", the default on GPUs (slots refilled as samples stop, each decoding step a CUDA graph replay),
and "generate", the default on CPUs (batches through model.generate).

    python eval.py --model runs/redi/final --out runs/redi/eval                 # MATH-500 x 4 samples
    python eval.py --model runs/redi/best --benchmark math500 aime24 amc23 minerva olympiadbench \
        --samples 16 --prompt lighteval --out runs/redi/eval16        # the paper's final evals, with its prompt
    torchrun --nproc_per_node 8 eval.py --model runs/redi/final --samples 16 --out runs/redi/eval16
    python eval.py --model demo/model --data demo/test.jsonl --max-new-tokens 512 --out runs/demo-eval
    python eval.py --model runs/redi/final --batch-size 64 --out runs/redi/eval     # 64 slots: ~60 GB of KV cache
    python eval.py score runs/redi/eval/results.jsonl     # rebuild summary.json and the table from results alone
    python eval.py report runs/sft runs/redi runs/dpo --out runs/report   # compare runs (table, plots)

--out gets results.jsonl (one line per sample, appended as samples finish; a rerun with the same --out
skips the samples already there), summary.json (per benchmark, plus the average) and config.json.
Under torchrun every rank holds a whole model and takes a share of the problems; rank 0 merges.
"""
import argparse
import datetime
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from math_verify import parse, verify

from common import (JSON_TYPES, TOKENIZER_FILES, bad_fields, check_file, check_model_path, cleanup, die, init_dist,
                    load_model, load_tokenizer, print0, read_json, read_json_lines)
from data import SYSTEM_PROMPT, open_corpus, render_chat

# Hub copies of the paper's benchmarks. Fields checked against each dataset card (none is reachable offline,
# so none of these was loaded here): MATH-500 500 test rows (PAPER.md §4); AIME 2024 30 rows; AMC: the authors'
# "AMC23" is the 83 AMC12 2022-2023 problems of AI-MO/aimo-validation-amc, with integer answers stored as floats
# (the 40-problem AMC 2023 set, e.g. math-ai/amc23, is a different benchmark); Minerva 272 rows; OlympiadBench:
# the 675 text-only English competition-math problems, config OE_TO_maths_en_COMP, whose final_answer is a list
# (its config name and fields come from other projects' loaders; the row count was not checked).
BENCHMARKS = {  # name: (Hub id, config, split, problem field, answer field, id field)
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "unique_id"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "id"),
    "amc23": ("AI-MO/aimo-validation-amc", None, "train", "problem", "answer", "id"),
    "minerva": ("math-ai/minervamath", None, "test", "question", "answer", None),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "question", "final_answer", "id"),
}

# PAPER.md §4: the authors' user prompt (lighteval's MATH template), two spaces after "clearly." included.
LIGHTEVAL_PROMPT = ("Solve the following math problem efficiently and clearly.  The last line of your response "
                    "should be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope "
                    "it is correct' (without quotes) where ANSWER is just the final number or expression that "
                    "solves the problem. Think step by step before answering.\n\n")
THINK_PREFIX = "<think>\n"
# Settings that change what a sample is: a rerun into the same --out must keep them, or the samples would mix.
SAMPLING_KEYS = ("model", "prompt", "think_prefix", "temperature", "top_p", "max_new_tokens",
                 "max_prompt_tokens", "seed")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model
parser.add_argument("--model", required=True, help="model folder or Hub id (a checkpoint from sft.py/redi.py)")
parser.add_argument("--attn-implementation", default="sdpa",
                    help="sdpa, eager, flash_attention_2, ... (engine generate; engine slots brings its own)")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
# problems
parser.add_argument("--benchmark", nargs="+", default=None, choices=list(BENCHMARKS),
                    help="one or more (default math500, PAPER.md §4's intermediate eval, unless --data is given)")
parser.add_argument("--data", default=None, help="a local .jsonl/.parquet of problems, named after its file stem")
parser.add_argument("--problem-field", default="problem", help="--data: field holding the problem")
parser.add_argument("--answer-field", default="answer", help="--data: field holding the gold answer")
parser.add_argument("--id-field", default="id", help="--data: problem id field, if present (else the row number)")
parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark (smoke tests)")
# generation (PAPER.md §4)
parser.add_argument("--prompt", choices=["bare", "lighteval"], default="bare",
                    help="bare: the problem as the user turn, then '<|im_start|>assistant\\n<think>\\n' as in training "
                         "(default); lighteval: the authors' evaluation, behind the paper's numbers: lighteval's MATH "
                         "template around the problem, then '<|im_start|>assistant<think>\\n' (PAPER.md §4)")
parser.add_argument("--no-think-prefix", dest="think_prefix", action="store_false",
                    help="do not start the assistant turn with '<think>\\n' (PAPER.md §4 forces it, as the traces "
                         "begin)")
parser.add_argument("--samples", type=int, default=4,
                    help="n, samples per problem: 4 for intermediate evals, 16 for final ones (not --n: torchrun "
                         "would take it for an abbreviation of its own flags)")
parser.add_argument("--temperature", type=float, default=0.6)
parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; there is no top-k (PAPER.md §4)")
parser.add_argument("--max-new-tokens", type=int, default=30720, help="response budget (authors: 32,768 - 2,048)")
parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                    help="prompt budget; a longer prompt is not generated and its samples count as wrong")
parser.add_argument("--batch-size", type=int, default=32,
                    help="sequences decoded together: engine slots' slots, or engine generate's rows per call "
                         "(32 x 32k tokens of Qwen2.5-Math-1.5B KV cache is ~29 GB)")
parser.add_argument("--engine", choices=["auto", "slots", "generate"], default="auto",
                    help="slots: fixed slots, each refilled as its sample stops, one decoding step captured as a "
                         "CUDA graph; generate: batches through model.generate, each until its longest sample stops. "
                         "Both draw a sample from the same seeded uniforms with the same sampler. auto (default): "
                         "slots on a GPU, generate on a CPU")
parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="engine slots on a GPU: launch every decoding step from Python instead (to measure the "
                         "graphs)")
parser.add_argument("--slot-attention", choices=["window", "flex"], default="window",
                    help="engine slots' decoding attention. window (default): every slot reads the columns of the "
                         "longest live sample, rounded up to a window (one CUDA graph per window); flex: each slot "
                         "reads its own length, in blocks of 128 columns (FlexAttention, compiled on a GPU at the "
                         "first step; one graph). flex is not yet measured on a GPU (README, Generation speed)")
parser.add_argument("--seed", type=int, default=0, help="sample j of a problem always draws the same random numbers")
# grading and output
parser.add_argument("--grade-workers", type=int, default=2, help="math-verify worker processes per rank")
parser.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per answer; slower grades count as wrong")
parser.add_argument("--out", required=True, help="output folder: results.jsonl, summary.json, config.json")

score_parser = argparse.ArgumentParser(prog="eval.py score", description="rebuild summary.json from a results file")
score_parser.add_argument("results", help="a results.jsonl written by eval.py; summary.json is written beside it. "
                          "Each line needs benchmark, problem_id, sample, response, answer, correct, num_tokens and "
                          "finish_reason; grade_timeout is optional (absent: false). A last line cut short by a crash "
                          "is skipped, with a note")
report_parser = argparse.ArgumentParser(prog="eval.py report", description="compare training runs: one table, "
                                        "and Figure-6-style plots of accuracy, LogPS and update norm over steps")
report_parser.add_argument("runs", nargs="+", help="run folders of sft.py/redi.py, each with eval/step_N/summary.json "
                                                   "(eval.py --out RUN/eval/step_N on RUN/ckpt/step_N)")
report_parser.add_argument("--out", required=True, help="writes report.md, report.json and report.png (with "
                                                        "matplotlib); each RUN/best links to that run's best checkpoint")

# -----------------------------------------------------------------------------
# problems


def gold_text(value):
    if isinstance(value, list):  # OlympiadBench: one entry per answer, each in its own $...$
        return ", ".join(str(v).strip().strip("$") for v in value)
    if isinstance(value, float) and value.is_integer():  # AMC's answers are stored as floats
        return str(int(value))
    return str(value)


def load_problems(args):
    """{benchmark: [{"id", "problem", "gold"}]} in dataset order. A row without a string problem or without an answer
    stops the run, naming its line (jsonl) or its row (parquet, Hub; counted from 1)."""
    sources = {}  # name -> (rows, their line numbers or None, problem field, answer field, id field, where, hint)
    if args.data:
        path = check_file(args.data, "--data", "a .jsonl or .parquet file of problems")
        if path.suffix == ".parquet":
            rows, lines = open_corpus(args.data, "train", "--data")[0], None
        else:
            numbered = list(read_json_lines(path, "--data", "a jsonl file of problems"))
            rows, lines = [row for _, row in numbered], [n for n, _ in numbered]
        sources[path.stem] = (rows, lines, args.problem_field, args.answer_field, args.id_field, args.data,
                              "; point --problem-field and --answer-field at the fields that hold them")
    for name in args.benchmark or ([] if args.data else ["math500"]):
        import datasets
        hub_id, config, split, problem_field, answer_field, id_field = BENCHMARKS[name]
        try:
            rows = datasets.load_dataset(hub_id, config, split=split)
        except Exception as e:  # the datasets library raises many kinds for "not found" / offline
            die(f"benchmark {name}: could not load {hub_id} ({e.__class__.__name__}: {e}); offline, pass a local "
                f"copy with --data")
        sources[name] = (rows, None, problem_field, answer_field, id_field, hub_id, "")
    problems = {}
    for name, (rows, lines, problem_field, answer_field, id_field, where, hint) in sources.items():
        fields = {problem_field: (str, "a string"), answer_field: ((str, int, float, list), "a string, number or list")}
        items = []
        for i in range(len(rows) if args.limit is None else min(args.limit, len(rows))):
            row = rows[i]
            wrong = bad_fields(row, fields)
            if wrong:
                die(f"{where}, {f'line {lines[i]}' if lines else f'row {i + 1}'} {wrong}{hint}")
            items.append({"id": str(row.get(id_field, i)) if id_field else str(i), "problem": row[problem_field],
                          "gold": gold_text(row[answer_field])})
        if not items:
            die(f"{where} holds no problems")
        if len({p["id"] for p in items}) < len(items):
            die(f"{where}: the id field {id_field!r} has repeated values; point --id-field at a unique field")
        problems[name] = items
    return problems


# -----------------------------------------------------------------------------
# prompts and sampling


def build_prompt(tokenizer, problem, prompt="bare", think_prefix=True):
    """The model's own chat template with PAPER.md §4's system prompt, up to the assistant turn, then <think>\\n.
    bare: the problem as the user turn and the assistant header as in training, `<|im_start|>assistant\\n<think>\\n`.
    lighteval: what the authors' reported numbers used (PAPER.md §4): lighteval's MATH template around the
    problem, and their edited generation prompt, `<|im_start|>assistant<think>\\n`, with no newline between the
    header and <think>. Without the think prefix both end with the template's own generation prompt."""
    if prompt == "bare":
        return render_chat(tokenizer, problem, None, SYSTEM_PROMPT) + (THINK_PREFIX if think_prefix else "")
    text = render_chat(tokenizer, LIGHTEVAL_PROMPT + problem, None, SYSTEM_PROMPT)
    if not think_prefix:
        return text
    if not text.endswith("\n"):
        die(f"--prompt lighteval: the chat template's generation prompt ends {text[-20:]!r}, not with the newline "
            "that the authors' prompt replaces with <think>\\n")
    return text[:-1] + THINK_PREFIX


def stop_token_ids(tokenizer):
    """The tokenizer's eos, and the end-of-turn / end-of-text tokens of ChatML models when the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    return sorted({tokenizer.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab} - {None})


def _draw(probs, order, u, top_p):
    """probs (B, K) sorted descending, order (B, K) their token ids: the inverse-CDF draw from the nucleus."""
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # the top token always stays
    cdf = probs.cumsum(-1)  # (B, K), ends at the nucleus' mass
    k = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)  # (B,)
    return order.gather(1, k[:, None]).squeeze(1)


def sample_top_p(logits, u, temperature, top_p, prefilter=1024):
    """logits (B, V), u (B,) uniform in [0, 1): one token per row, drawn by inverse CDF from softmax(logits / T)
    restricted to the nucleus: the most likely tokens, each kept while the mass before it is below top_p.
    A trained model's nucleus lies within its few most likely tokens, so only the top `prefilter` are sorted;
    a row whose top tokens hold less than top_p is drawn from a full sort. Either way the same draw."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    token, short = draw_prefiltered(probs, u, top_p, prefilter)
    if short.any():
        token[short] = draw_sorted(probs[short], u[short], top_p)
    return token


def draw_prefiltered(probs, u, top_p, prefilter=1024):
    """The draw from each row's top `prefilter` tokens, and which rows' top tokens hold less than top_p (their draw
    must come from draw_sorted instead). No branch on the device's values, so a CUDA graph can hold it."""
    top, order = probs.topk(min(prefilter, probs.shape[-1]), dim=-1)  # (B, K), sorted
    return _draw(top, order, u, top_p), top.sum(-1) < top_p


def draw_sorted(probs, u, top_p):
    return _draw(*probs.sort(dim=-1, descending=True), u, top_p)


def draw_top_p(probs, u, top_p, prefilter=1024):
    """sample_top_p's draw with no branch, so a CUDA graph can hold it: every row drawn both ways, and the full sort's
    draw kept where the top `prefilter` tokens hold less than top_p; also returns those rows, as draw_prefiltered does.
    Drawing every row from the full sort instead would not always give sample_top_p's token where the nucleus fits:
    topk and sort order tied probabilities differently (on a CPU too; ties are common when logits are bf16), and on a
    GPU a cumsum over 1,024 columns and one over the vocabulary round differently (its kernel's layout depends on the
    row length). Computing the prefiltered draw too costs one topk."""
    token, short = draw_prefiltered(probs, u, top_p, prefilter)
    return torch.where(short, draw_sorted(probs, u, top_p), token), short


class Sampler:
    """A logits processor that samples each row with its own torch.Generator, seeded per (problem, sample), so a
    sample draws the same numbers whichever batch, rank or rerun produces it. It returns scores with one finite entry,
    so generate() runs greedy (do_sample=False) and only this sampler draws: no top-k or other default can slip in."""

    def __init__(self, seeds, temperature, top_p):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(scores.device)  # (B,)
        token = sample_top_p(scores, u, self.temperature, self.top_p)
        return torch.full_like(scores, -math.inf).scatter_(1, token[:, None], 0.0)


def sample_seed(seed, benchmark, problem_id, sample):
    return int(hashlib.sha256(f"{seed}|{benchmark}|{problem_id}|{sample}".encode()).hexdigest()[:15], 16)


def generate_batch(model, jobs, args, pad_id, stop_ids, device):
    """Engine "generate": left-pads the jobs' prompts into one batch and samples with model.generate until every
    row has stopped. Returns per job (new tokens without the stop token, num_tokens including it, finish_reason).
    A job may carry its own "max_new_tokens" (bench.py forces lengths so): its row runs on with the batch and is cut."""
    from transformers import GenerationConfig, LogitsProcessorList
    budgets = [j.get("max_new_tokens", args.max_new_tokens) for j in jobs]
    T = max(len(j["prompt_ids"]) for j in jobs)
    input_ids = torch.full((len(jobs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(jobs), T), dtype=torch.long)
    for b, j in enumerate(jobs):
        input_ids[b, T - len(j["prompt_ids"]):] = torch.tensor(j["prompt_ids"])
        attention_mask[b, T - len(j["prompt_ids"]):] = 1
    config = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), eos_token_id=list(stop_ids) or None,
                              pad_token_id=pad_id, use_cache=True)
    sampler = Sampler([j["seed"] for j in jobs], args.temperature, args.top_p)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=LogitsProcessorList([sampler]))
    results, stops = [], set(stop_ids)
    for row, budget in zip(out[:, T:].tolist(), budgets):  # (B, new tokens); rows that stopped are padded after it
        row = row[:budget]
        end = next((t for t, tok in enumerate(row) if tok in stops), None)
        results.append((row, len(row), "length") if end is None else (row[:end], end + 1, "stop"))
    return results


# -----------------------------------------------------------------------------
# engine "slots": a fixed set of sequence slots, each refilled as soon as its sample stops; one decoding step,
# captured once per attention window as a CUDA graph
#
# Why this design (issue 11, read against transformers 5.17 and 5.24). A decoding step of a 1.5B model reads ~3 GB of
# weights, under 1 ms on an H100/H200, yet model.generate took ~90 ms per step at batch 64: the step is ~1,000 small
# kernels launched from Python, plus HF's per-step machinery. Capturing the whole step in a CUDA graph (gpt-fast's
# approach) replays them with one launch. And a static batch runs until its longest sample stops, while reasoning
# traces run from ~1k to 30k tokens; so a slot whose sample stops takes the next prompt at once.
# - Not HF's static cache + torch.compile: its StaticCache writes every row at one shared position (one
#   cumulative_length), so rows cannot start at different times, and attention would span the whole 32k cache.
# - Not HF's continuous batching (generate_batch): with sdpa it captures no graphs by default, its fast decode path
#   needs flash-attn (not installed on the GPU machines here), it samples with one generator for the whole run (no
#   per-sample seeds), its options changed between 5.17 and 5.24, and measured with defaults it was no faster than
#   generate (852-859 tokens/s against 870 on an H200).
# - So a small engine of our own around the model's ordinary forward: a KV cache with one row per slot (SlotCache),
#   given to the model as its cache; a 4-D mask per step; an attention function registered with HF's
#   AttentionInterface for the duration of a run (slot_attention). The model code is HF's, unchanged.
# Sampling is eval.py's own (draw_prefiltered, draw_sorted, draw_top_p: sample_top_p's draw) with each sample's own
# seeded uniforms, the ones Sampler draws: from the same logits, the same tokens as engine "generate". What is
# reproducible: a rerun of the same jobs with the same engine, slots and machine repeats every token, except with one
# slot on a GPU (on an H100 a one-row cumsum was not bit-for-bit repeatable from run to run; rows > 1 were). The logits
# themselves agree only to rounding across engines, batch mates and hardware (attention kernels, padding and windows
# differ; bf16 on GPUs), and a draw that lands within rounding of a boundary of its CDF flips, after which the sample
# goes its own way: never in the tests here (fp32, vocabularies up to 49k, trained or small); often for a random model
# with a 152k vocabulary, whose CDF steps are ~1/150,000 apart (bench.py reports the share of samples that agree).

SLOT_ATTENTION = "eval_slots"  # the name slot_attention is registered under while a SlotEngine runs


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Prefill (several query positions): the prompt attends to itself, causally, through HF's sdpa function.
    Decoding (one query per row): query (B, H, 1, D) against the slots' cache (B, KV heads, window, D). The G = H / KV
    query heads that share a KV head attend as G query rows of that head, so the cache is read once per KV head
    (transformers 5.17's sdpa copies it G times with repeat_kv whenever there is a mask). With a BlockMask (engine
    slots' attention "flex") the step goes to FlexAttention, which reads each row's own blocks of columns only."""
    if query.shape[2] > 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    B, H, _, D = query.shape
    query = query.reshape(B, key.shape[1], H // key.shape[1], D)  # (B, KV heads, G, D)
    if not isinstance(attention_mask, torch.Tensor):  # a BlockMask. Its grouped-query path would need G to be a
        # power of two to use the decoding kernel (Qwen2.5-Math-1.5B: 12 / 2 = 6); as G query rows it needs nothing
        out = flex_decode(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling)
    return out.reshape(B, 1, H, D), None  # (B, T=1, H, D), as HF's attention functions return


_flex_decoders = {}  # device type -> FlexAttention as the decoding step calls it


def flex_decode(device_type):
    """FlexAttention for the decoding step: compiled on a GPU (Triton's decoding kernel, which skips the blocks of
    columns a row's BlockMask leaves out), eager on a CPU (a reference that computes every column and masks: the tests
    check its results, not its speed). One compiled function serves every step: the shapes never change."""
    if device_type not in _flex_decoders:
        import warnings
        from torch.nn.attention.flex_attention import flex_attention
        if device_type == "cuda":
            _flex_decoders[device_type] = torch.compile(flex_attention, dynamic=False)
        else:
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            _flex_decoders[device_type] = flex_attention
    return _flex_decoders[device_type]


class SlotCache:
    """The model's KV cache (passed as its cache): per layer, keys and values of shape (slots, KV heads, capacity,
    head dim). Slot b's sequence fills row b from column 0 in order, so a token's column is its position. Prefill
    writes prompts into their rows; a decoding step writes each row's new token at that row's own column (pos) and
    gives attention the first `window` columns of every row, of which the step's mask shows each row its own."""

    def __init__(self, config, slots, capacity, dtype, device):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (slots, getattr(config, "num_key_value_heads", None) or heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows = torch.arange(slots, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)  # the engine's buffer: where each row writes
        self.prefill_rows = None  # (n,) the slots a prefill writes, or None while decoding
        self.window = capacity

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:  # (n, KV heads, T, D): right-padded prompts, from column 0
            T = key_states.shape[2]
            keys[self.prefill_rows, :, :T] = key_states
            values[self.prefill_rows, :, :T] = value_states
            return key_states, value_states  # a prompt attends to itself only
        keys[self.rows, :, self.pos] = key_states[:, :, 0]  # (slots, KV heads, D): one new column per row
        values[self.rows, :, self.pos] = value_states[:, :, 0]
        return keys[:, :, :self.window], values[:, :, :self.window]


def slots_supported(model):
    """Engine slots gives every layer the same mask over the whole row, so no layer may use a sliding window."""
    return "sliding_attention" not in (getattr(model.config, "layer_types", None) or [])


FLEX_BLOCK = 128  # columns per block of engine slots' FlexAttention mask (its kernels' block size)


def attention_windows(capacity, step=256):
    """The attention spans a decoding step may use, one CUDA graph each: multiples of 256 up to 2,048, then four per
    doubling, so a step reads at most ~25% more cache columns than its longest live sequence needs. capacity is a
    multiple of 256 (the memory-efficient SDPA kernel wants aligned masks) and is the last window."""
    windows, w = [], step
    while w < capacity:
        windows.append(w)
        w += max(step, 2 ** (w.bit_length() - 1) // 4)
    return windows + [capacity]


class SlotEngine:
    """Engine "slots": `slots` sequences decode together, each from its own cache row; when one stops (a stop token,
    or its token budget), its slot takes the next job. Every decoding step is the same fixed-shape work, so on a GPU
    it is captured once per attention window and replayed; on a CPU it runs eagerly. Reusable: bench.py warms it up
    once and then times it.

    One step: the model's forward on each slot's last token (the cache row gives the rest), softmax(logits / T),
    the draw with the slot's next uniform, and the bookkeeping (the token appended, pos and the token count advanced,
    stop checks) all happen on the device; the host then reads two flags (one sync per step): whether a row was
    "short" (its top 1,024 tokens held less than top_p, so its nucleus needs the full sort), and whether a sample
    stopped. The step comes in two variants, each captured per window:
    - prefiltered (draw_prefiltered): sorts only the top 1,024 tokens. A short row's draw is wrong, so after the step
      the host redraws it from the full sort (_redraw_short: a second sync, and an eager sort). A trained model's rows
      are about never short, so this is the cheap step.
    - full sort (draw_top_p): every row is also drawn from a full sort, kept where the row is short; nothing to
      redraw. A random model's rows are always short (its nucleus is ~95% of the vocabulary), and then one sort
      inside the graph costs less than the host's sync and eager redraw (on an H100, 64 slots of the bench's
      1.5B-sized model: the graph takes 6.6 ms against the prefiltered one's 5.2, the whole step 7.3-7.4 ms against
      7.8-8.1 with the redraw).
    The host runs the full-sort variant after a step that had a short row, else the prefiltered one; both draw
    sample_top_p's token for every row, so the tokens never depend on which one ran. steps, sort_steps and redraws
    count the steps, those of the full-sort variant, and the host's redraws.

    attention: what a decoding step's attention reads. "window": the first `window` columns of every row, the longest
    live sequence rounded up to one of attention_windows (a graph per window and variant), masked per row. "flex":
    each row its own blocks of FLEX_BLOCK columns up to its position: the whole ones, and the one it ends in, masked
    there by mask_mod (FlexAttention; a graph per variant)."""

    prefill_tokens = 16384  # prompt tokens per prefill forward, padding included

    def __init__(self, model, slots, capacity, max_new_tokens, temperature, top_p, stop_ids, pad_id=None,
                 cuda_graphs=True, attention="window"):
        config = model.config
        assert slots_supported(model), "engine slots needs a model whose every layer attends to the full context"
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.slots, self.capacity = slots, -(-capacity // 256) * 256
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.stops = set(stop_ids)
        self.pad_id = pad_id or 0  # the padding after a prompt in a prefill; no prompt ever sees it
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = SlotCache(config, slots, self.capacity, self.dtype, self.device)
        # HF >= 5.24 names the cache argument `cache`, earlier versions `past_key_values`
        import inspect
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        assert attention in ("window", "flex")
        self.attention = attention  # flex: one window, the whole cache, of which each row reads its own blocks
        self.windows = attention_windows(self.capacity) if attention == "window" else [self.capacity]
        self.graphs = {}  # window -> torch.cuda.CUDAGraph of the prefiltered step, captured at the first run
        self.sort_graphs = {}  # window -> the full-sort step's graph, captured with them
        # The step's state, in buffers whose addresses never change (the graphs read and write them in place).
        dev = dict(device=self.device)
        self.columns = torch.arange(self.capacity, **dev)
        self.stop_ids = torch.tensor(sorted(self.stops), dtype=torch.long, **dev)
        self.tokens = torch.zeros(slots, dtype=torch.long, **dev)  # each slot's next input token
        self.pos = self.cache.pos  # (slots,) its column, = its position id
        self.t = torch.zeros(slots, dtype=torch.long, **dev)  # new tokens so far = index of the next uniform
        self.limit = torch.ones(slots, dtype=torch.long, **dev)  # the sample's token budget
        self.active = torch.zeros(slots, dtype=torch.bool, **dev)
        self.uniforms = torch.zeros(slots, max_new_tokens, **dev)  # each sample's seeded stream, u[t] for token t
        self.generated = torch.zeros(slots, max_new_tokens, dtype=torch.long, **dev)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.probs = torch.zeros(slots, vocab, **dev)  # softmax(logits / T) of the last step, fp32
        self.u = torch.zeros(slots, **dev)
        self.short = torch.zeros(slots, dtype=torch.bool, **dev)
        self.stopped = torch.zeros(slots, dtype=torch.bool, **dev)
        self.flags = torch.zeros(2, dtype=torch.bool, **dev)  # any short row, any stopped row
        self.steps = self.busy = 0  # decoding steps run, and slot-steps that carried a sample (utilisation)
        self.sort_steps = self.redraws = 0  # steps run as the full-sort variant, and host redraws after the other
        self.full_steps, self.full_seconds = 0, 0.0  # steps with every slot busy, and their time (refills included)
        if attention == "flex":  # row b reads its columns 0 .. pos[b]: whole blocks, then the rest of a partial one
            from torch.nn.attention.flex_attention import BlockMask
            blocks, pos = self.capacity // FLEX_BLOCK, self.pos
            shape = (slots, 1, 1)  # (rows, heads: the same for all, query blocks: one query)
            self.full_blocks = torch.zeros(shape, dtype=torch.int32, **dev)  # set by each step, from pos
            self.partial_blocks = torch.zeros(shape, dtype=torch.int32, **dev)  # 1 where a block is partly visible
            self.partial_index = torch.zeros(shape + (blocks,), dtype=torch.int32, **dev)  # [..., 0]: which block
            self.block_mask = BlockMask.from_kv_blocks(
                self.partial_blocks, self.partial_index, self.full_blocks,
                torch.arange(blocks, dtype=torch.int32, **dev).expand(shape + (blocks,)).contiguous(),
                BLOCK_SIZE=FLEX_BLOCK, mask_mod=lambda b, h, q, kv: kv <= pos[b],
                seq_lengths=(config.num_attention_heads // self.cache.keys[0].shape[1], self.capacity))  # (G, columns)

    def _step(self, window, full_sort):
        """One decoding step for all slots; no host sync, so a CUDA graph can hold it. Idle slots compute garbage
        at column 0 and advance nothing. full_sort: the variant that draws short rows right (see the class)."""
        self.cache.window = window
        if self.attention == "flex":
            visible = self.pos.view(-1, 1, 1) + 1  # columns 0 .. pos, the new token's included
            self.full_blocks.copy_(visible // FLEX_BLOCK)
            self.partial_blocks.copy_(visible % FLEX_BLOCK != 0)
            self.partial_index[..., 0] = self.full_blocks  # the block after the full ones
            mask = self.block_mask
        else:
            visible = self.columns[:window] <= self.pos[:, None]  # (slots, window): the row's tokens, the new one too
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
            mask = mask[:, None, None, :]
        logits = self.model(input_ids=self.tokens[:, None], position_ids=self.pos[:, None],
                            attention_mask=mask, use_cache=True, logits_to_keep=1,
                            **{self.cache_kw: self.cache}).logits[:, -1]  # (slots, V)
        self.probs.copy_(torch.softmax(logits.float() / self.temperature, dim=-1))  # as sample_top_p computes it
        self.u.copy_(self.uniforms.gather(1, self.t[:, None]).squeeze(1))
        token, short = (draw_top_p if full_sort else draw_prefiltered)(self.probs, self.u, self.top_p)
        self.short.copy_(short & self.active)
        self.generated.scatter_(1, self.t[:, None], token[:, None])
        self.tokens.copy_(token)
        self.t.add_(self.active)
        self.pos.add_(self.active)
        self.stopped.copy_(self.active & (self._is_stop(token) | (self.t >= self.limit)))
        self.flags.copy_(torch.stack([self.short.any(), self.stopped.any()]))

    def _is_stop(self, token):
        return (token[:, None] == self.stop_ids).any(-1)  # (n,); False for all when there are no stop ids

    def _redraw_short(self):
        """After a prefiltered step, the rows whose nucleus is wider than their top 1,024 tokens: the draw from a full
        sort (sample_top_p's fallback, same probabilities and uniform), patched into the step's results. Every slot's
        row is sorted, as the full-sort step does, so that on a GPU the cumsum rounds as there (its kernel's layout
        depends on the number of rows) and a token does not depend on which variant ran."""
        rows = self.short.nonzero().squeeze(1)
        token = draw_sorted(self.probs, self.u, self.top_p)[rows]
        t = self.t[rows]  # already advanced past this token
        self.generated[rows, t - 1] = token
        self.tokens[rows] = token
        self.stopped[rows] = self._is_stop(token) | (t >= self.limit[rows])

    def _prefill(self, assigned):
        """assigned: [(slot, job)]. Each prompt but its last token goes into its slot's row, in right-padded groups
        (padding comes after a prompt, so causal attention never shows it to the prompt); the last prompt token is
        the slot's first decoding input, and that step samples the first new token."""
        groups = [[]]  # at most prefill_tokens per forward, padding included (a longer prompt goes alone)
        for slot, job in assigned:
            group = groups[-1] + [(slot, job)]
            if len(group) > 1 and len(group) * max(len(j["prompt_ids"]) for _, j in group) > self.prefill_tokens:
                groups.append([])
            groups[-1].append((slot, job))
        for group in groups:
            T = max(len(j["prompt_ids"]) for _, j in group) - 1
            if T == 0:  # one-token prompts: the decoding step takes them
                continue
            ids = torch.full((len(group), T), self.pad_id, dtype=torch.long)
            for i, (_, j) in enumerate(group):
                ids[i, :len(j["prompt_ids"]) - 1] = torch.tensor(j["prompt_ids"][:-1])
            self.cache.prefill_rows = torch.tensor([s for s, _ in group], device=self.device)
            try:
                self.model(input_ids=ids.to(self.device), position_ids=torch.arange(T, device=self.device).expand(
                    len(group), T), use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
            finally:
                self.cache.prefill_rows = None
        slots = torch.tensor([s for s, _ in assigned], device=self.device)
        budgets = [j.get("max_new_tokens", self.max_new_tokens) for _, j in assigned]
        self.tokens[slots] = torch.tensor([j["prompt_ids"][-1] for _, j in assigned], device=self.device)
        self.pos[slots] = torch.tensor([len(j["prompt_ids"]) - 1 for _, j in assigned], device=self.device)
        self.t[slots] = 0
        self.limit[slots] = torch.tensor(budgets, device=self.device)
        self.active[slots] = True
        # The sample's uniforms: the same stream Sampler draws one by one from a generator seeded the same way.
        uniforms = torch.zeros(len(assigned), self.max_new_tokens)
        for i, ((_, j), n) in enumerate(zip(assigned, budgets)):
            uniforms[i, :n] = torch.rand(n, generator=torch.Generator().manual_seed(j["seed"]))
        self.uniforms[slots] = uniforms.to(self.device)

    def _capture(self):
        """Two CUDA graphs per attention window, one per variant, captured while every slot is idle (the warm-up runs
        change nothing then). The graphs share one memory pool: they never run at once, and none keeps a tensor
        alive."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: cuBLAS handles, kernel choices
            for w in self.windows:
                self._step(w, False), self._step(w, True)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for w in self.windows:
            for graphs, full_sort in ((self.graphs, False), (self.sort_graphs, True)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(w, full_sort)
                pool = graph.pool()
                graphs[w] = graph

    def generate(self, jobs):
        """Yields (job, (new tokens without the stop token, num_tokens including it, finish_reason)) as samples stop,
        the same triple generate_batch returns. Jobs start in order, each in the first free slot."""
        queue = list(reversed(jobs))
        for j in jobs:
            assert 1 <= len(j["prompt_ids"]) and len(j["prompt_ids"]) + j.get("max_new_tokens", self.max_new_tokens) \
                - 1 <= self.capacity and j.get("max_new_tokens", self.max_new_tokens) <= self.max_new_tokens
        previous = self.model.config._attn_implementation
        from transformers import AttentionInterface
        AttentionInterface.register(SLOT_ATTENTION, slot_attention)
        self.model.set_attn_implementation(SLOT_ATTENTION)
        self.active.zero_(), self.pos.zero_(), self.t.zero_()  # a run abandoned midway leaves busy slots behind
        job_in = [None] * self.slots
        pos = np.zeros(self.slots, dtype=np.int64)  # the host's copy of self.pos: picks the window, no sync
        last = time.perf_counter()
        try:
            with torch.no_grad():
                while self.cuda_graphs and not self.graphs:
                    try:
                        self._capture()
                    except RuntimeError as e:  # an operation the graph cannot hold, in this torch/transformers
                        self.graphs, self.sort_graphs, why = {}, {}, str(e).splitlines()[0] if str(e) else repr(e)
                        if self.attention == "flex":  # FlexAttention would not compile or capture: windows instead
                            print(f"warning: engine slots could not compile or capture its FlexAttention step ({why}); "
                                  "using --slot-attention window", flush=True)
                            self.attention, self.windows = "window", attention_windows(self.capacity)
                        else:
                            print(f"warning: engine slots could not capture its decoding step as a CUDA graph ({why}); "
                                  "decoding eagerly, much slower", flush=True)
                            self.cuda_graphs = False
                full_sort = False  # the next step's variant: the full sort after a step that had a short row
                while queue or any(j is not None for j in job_in):
                    free = [s for s in range(self.slots) if job_in[s] is None]
                    if free and queue:
                        assigned = [(s, queue.pop()) for s in free[:len(queue)]]
                        self._prefill(assigned)
                        for s, j in assigned:
                            job_in[s], pos[s] = j, len(j["prompt_ids"]) - 1
                    window = self.windows[np.searchsorted(self.windows, pos.max() + 1)]
                    if self.cuda_graphs:
                        (self.sort_graphs if full_sort else self.graphs)[window].replay()
                    else:
                        self._step(window, full_sort)
                    busy = [s for s in range(self.slots) if job_in[s] is not None]
                    self.steps, self.busy = self.steps + 1, self.busy + len(busy)
                    pos[busy] += 1
                    any_short, any_stopped = self.flags.tolist()  # the step's one sync
                    now = time.perf_counter()
                    if len(busy) == self.slots:
                        self.full_steps, self.full_seconds = self.full_steps + 1, self.full_seconds + now - last
                    last = now
                    redraw = any_short and not full_sort  # the full-sort step drew its short rows already
                    if redraw:
                        self._redraw_short()
                    self.sort_steps, self.redraws = self.sort_steps + full_sort, self.redraws + redraw
                    full_sort = any_short
                    if not (any_stopped or redraw):
                        continue
                    done = self.stopped.nonzero().squeeze(1).tolist()
                    for s in done:
                        n = int(pos[s]) - len(job_in[s]["prompt_ids"]) + 1  # = t: new tokens, the stop token included
                        tokens = self.generated[s, :n].tolist()
                        result = (tokens[:-1], n, "stop") if tokens[-1] in self.stops else (tokens, n, "length")
                        job, job_in[s], pos[s] = job_in[s], None, 0
                        yield job, result
                    if done:
                        idle = torch.tensor(done, device=self.device)
                        self.active[idle], self.pos[idle], self.t[idle] = False, 0, 0
        finally:
            self.model.set_attn_implementation(previous)


# -----------------------------------------------------------------------------
# grading: the last \boxed{} after the first </think>, checked by math-verify in worker processes


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}) with nested braces, or of `\\boxed 5`; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if not rest.startswith("{"):
        match = re.match(r" +([^\s$]+)", rest)
        return match.group(1) if match else None
    depth, i = 0, 0
    while i < len(rest):
        if rest[i] == "\\":  # \{ and \} are literal braces, not groups
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[1:i]
        i += 1
    return None  # cut off before its closing brace


def extract_answer(response):
    """(answer, status) under the authors' rule (PAPER.md §4): no </think> -> (None, "unclosed"); else their grader reads
    the text after the FIRST </think>, up to a second one if there is one (response.split("</think>")[1], PAPER.md
    §4): no boxed answer there -> (None, "no_answer"); else (its last boxed content, "ok")."""
    parts = response.split("</think>")
    if len(parts) == 1:
        return None, "unclosed"
    answer = last_boxed(parts[1])
    return (None, "no_answer") if answer is None else (answer, "ok")


def verify_answer(answer, gold):
    """math-verify, gold first. Bare LaTeX like (x+1)^2 parses to nothing, so each side is put in $...$ (the
    gold only if it has no unescaped $ of its own). math-verify's SIGALRM timeouts are off: the Grader's is the timeout."""
    gold = gold if re.search(r"(?<!\\)\$", gold) else f"${gold}$"
    return verify(parse(gold, parsing_timeout=None), parse(f"${answer}$", parsing_timeout=None), timeout_seconds=None)


def _grade_worker(conn):
    """Worker process: receives lists of (answer, gold), sends back one bool per item as soon as it is graded."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" warnings: ours is on
    conn.send("ready")
    try:
        while (items := conn.recv()) is not None:
            for answer, gold in items:
                try:
                    conn.send(bool(verify_answer(answer, gold)))
                except Exception:
                    conn.send(False)
    except EOFError:  # the parent went away
        pass


class Grader:
    """A pool of math-verify worker processes with a hard per-answer timeout. math-verify's own timeout uses
    SIGALRM: main thread only, and a Python handler cannot stop one long C-level operation (PAPER.md §4 saw a big
    power like \\boxed{10^{10^{10^{10}}}} do that). So a worker that spends more than `timeout` seconds on one
    answer is killed from outside and replaced; the answer counts as wrong and as a timeout. Work goes out in
    chunks: no process, and no round trip, per answer."""

    def __init__(self, workers=2, timeout=5.0, chunk=32):
        self.ctx = mp.get_context("spawn")  # fork would copy a parent holding a model and thread pools
        self.timeout, self.chunk = timeout, chunk
        self.workers = [self._start() for _ in range(workers)]

    def _start(self):
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_grade_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": conn, "ready": False, "todo": [], "deadline": None}

    def __call__(self, pairs):
        """pairs: list of (answer, gold). Returns [(correct, timed_out)], in order."""
        results = [None] * len(pairs)
        queue = [list(range(i, min(i + self.chunk, len(pairs)))) for i in range(0, len(pairs), self.chunk)]
        while queue or any(w["todo"] for w in self.workers):
            for w in self.workers:
                if w["ready"] and not w["todo"] and queue:
                    w["todo"] = queue.pop()  # indices of the answers this worker is grading, in order
                    w["conn"].send([pairs[i] for i in w["todo"]])
                    w["deadline"] = time.monotonic() + self.timeout
            wait([w["conn"] for w in self.workers], timeout=0.05)
            for k, w in enumerate(self.workers):
                dead = False
                try:
                    while w["conn"].poll():
                        message = w["conn"].recv()
                        if message == "ready":
                            w["ready"] = True
                        else:
                            results[w["todo"].pop(0)] = (message, False)
                            w["deadline"] = time.monotonic() + self.timeout
                except (EOFError, ConnectionError):
                    if not w["ready"]:
                        raise RuntimeError("a grading worker died while starting (can it import eval.py?)")
                    dead = True  # crashed on its current answer: handled like a hang
                if dead or (w["todo"] and time.monotonic() > w["deadline"]):
                    if w["todo"]:
                        results[w["todo"].pop(0)] = (False, True)
                    if w["todo"]:
                        queue.append(w["todo"])  # the rest of its chunk goes to the next free worker
                    w["proc"].kill()
                    w["proc"].join()
                    self.workers[k] = self._start()
        return results

    def close(self):
        for w in self.workers:
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
        self.workers = []


def grade_responses(grader, responses, golds):
    """One dict per response: the extracted answer, correct, grade_timeout. Extraction happens here; only
    answers that exist go to the workers."""
    graded = [{"answer": extract_answer(r)[0], "correct": False, "grade_timeout": False} for r in responses]
    todo = [i for i, g in enumerate(graded) if g["answer"] is not None]
    if todo:
        for i, (correct, timed_out) in zip(todo, grader([(graded[i]["answer"], golds[i]) for i in todo])):
            graded[i]["correct"], graded[i]["grade_timeout"] = correct, timed_out
    return graded


_default_grader = None


def grade_many(responses, golds):
    """Correctness of each response against its gold answer (PAPER.md §4's rule), on a pool started at first use."""
    global _default_grader
    _default_grader = _default_grader or Grader()
    return [g["correct"] for g in grade_responses(_default_grader, responses, golds)]


def grade(response, gold):
    return grade_many([response], [gold])[0]


# -----------------------------------------------------------------------------
# metrics (PAPER.md §4)


def pass_at_k(n, c, k):
    """Unbiased pass@k for one problem with c correct of n samples: 1 - C(n-c, k) / C(n, k), computed as the
    product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def count_wait(text):
    return len(re.findall(r"\bWait\b", text))  # appendix E: the word "Wait", case-sensitive, whole word


def summarize(records):
    """Per-benchmark metrics from result records (dicts as in results.jsonl), and their average over benchmarks.
    Rates are fractions of the benchmark's samples; timeouts and prompt_too_long are counts of samples."""
    table = {}  # benchmark -> problem_id -> sample -> the record's small fields
    for r in records:
        table.setdefault(r["benchmark"], {}).setdefault(r["problem_id"], {})[r["sample"]] = {
            "correct": r["correct"], "tokens": r["num_tokens"], "waits": count_wait(r["response"]),
            "status": extract_answer(r["response"])[1], "finish": r["finish_reason"],
            "timeout": r.get("grade_timeout", OPTIONAL_RESULT_FIELDS["grade_timeout"][1])}
    summary = {}
    for name, problems in table.items():
        n = min(len(samples) for samples in problems.values())
        if any(len(samples) != n for samples in problems.values()):
            print(f"warning: {name}: problems have different numbers of samples; using the first {n} of each")
        rows = [[samples[j] for j in sorted(samples)[:n]] for samples in problems.values()]
        flat = [s for row in rows for s in row]
        correct = np.array([[s["correct"] for s in row] for row in rows], dtype=float)  # (problems, n)
        tokens, waits = sum(s["tokens"] for s in flat), sum(s["waits"] for s in flat)
        ks = sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})
        summary[name] = {
            "n_problems": len(rows), "n_samples": n,
            "pass@1": float(correct.mean()),  # over every problem and sample
            "sem": float(correct.mean(0).std() / math.sqrt(n)),  # std over P_j = accuracy of sample j alone, ddof 0
            "pass@k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in correct.sum(1).astype(int)])) for k in ks},
            "mean_tokens": tokens / len(flat),
            "wait_per_response": waits / len(flat),
            "wait_per_1k_tokens": 1000 * waits / max(tokens, 1),  # over all the benchmark's response tokens
            # generated, but never closed </think> (cut off by the length budget, or stopped without closing)
            "truncated": float(np.mean([s["status"] == "unclosed" and s["finish"] != "prompt_too_long" for s in flat])),
            "no_answer": float(np.mean([s["status"] == "no_answer" for s in flat])),  # no \boxed{} after </think>
            "timeouts": sum(s["timeout"] for s in flat),  # answers whose grading was killed (wrong)
            "prompt_too_long": sum(s["finish"] == "prompt_too_long" for s in flat),  # never generated (wrong)
        }
    if summary:  # the paper's "Avg." column: plain means over benchmarks
        keys = ["pass@1", "mean_tokens", "wait_per_response", "wait_per_1k_tokens", "truncated", "no_answer"]
        average = {k: float(np.mean([s[k] for s in summary.values()])) for k in keys}
        ks = set.intersection(*(set(s["pass@k"]) for s in summary.values()))
        average["pass@k"] = {k: float(np.mean([s["pass@k"][k] for s in summary.values()])) for k in sorted(ks, key=int)}
        summary["average"] = average
    return summary


def print_table(summary):
    print(f"{'benchmark':<16}{'problems':>9}{'n':>4}{'pass@1':>8}{'sem':>7}{'pass@n':>8}{'tokens':>9}"
          f"{'wait/resp':>10}{'wait/1k':>8}{'trunc':>7}{'no_ans':>7}{'timeouts':>9}")
    for name, s in summary.items():
        per_benchmark = name != "average"
        print(f"{name:<16}{s['n_problems'] if per_benchmark else '':>9}{s['n_samples'] if per_benchmark else '':>4}"
              f"{s['pass@1']:>8.1%}" + (f"{s['sem']:>7.1%}{s['pass@k'][str(s['n_samples'])]:>8.1%}"
                                         if per_benchmark else " " * 15)
              + f"{s['mean_tokens']:>9,.0f}{s['wait_per_response']:>10.2f}{s['wait_per_1k_tokens']:>8.2f}"
              f"{s['truncated']:>7.1%}{s['no_answer']:>7.1%}{s['timeouts'] if per_benchmark else '':>9}")


# -----------------------------------------------------------------------------
# results files


# A results line. Required: the fields every version of eval.py wrote. Optional: fields added since, each with the
# value a line without it is read as.
RESULT_FIELDS = {"benchmark": (str, "a string"), "problem_id": ((str, int), "a string or integer"),
                 "sample": (int, "an integer"), "response": (str, "a string"),
                 "answer": ((str, type(None)), "a string or null"), "correct": (bool, "true or false"),
                 "num_tokens": (int, "an integer"), "finish_reason": (str, "a string")}
OPTIONAL_RESULT_FIELDS = {"grade_timeout": ((bool, "true or false"), False),  # absent: no grade known to have timed out
                          "gold": (((str, type(None)), "a string"), None)}  # absent: unknown (no metric reads it)


def iter_results(path):
    """The records of a results file, each checked for RESULT_FIELDS (and the types of the optional ones it has). A
    last line cut short by a crash is skipped with a note; a rerun into the same --out generates its sample again."""
    expected = f"a results.jsonl written by eval.py (fields {', '.join(RESULT_FIELDS)})"
    for n, r in read_json_lines(path, "results file", expected, cut_last_ok=True):
        wrong = bad_fields(r, RESULT_FIELDS) or \
            bad_fields(r, {k: types for k, (types, _) in OPTIONAL_RESULT_FIELDS.items() if k in r})
        if wrong:
            die(f"{path}, line {n} {wrong}; expected {expected}")
        yield r


def write_results(f, jobs, responses, finishes, grades):
    """One line per sample, flushed at once. num_tokens counts the tokens the model generated, its stop token
    included (the forced <think>\\n is prompt); finish_reason is "stop", "length" or "prompt_too_long"."""
    for j, response, (num_tokens, finish), g in zip(jobs, responses, finishes, grades):
        f.write(json.dumps({"benchmark": j["benchmark"], "problem_id": j["problem_id"], "sample": j["sample"],
                            "response": response, "answer": g["answer"], "gold": j["gold"], "correct": g["correct"],
                            "grade_timeout": g["grade_timeout"], "num_tokens": num_tokens,
                            "finish_reason": finish}) + "\n")
    f.flush()


def merge_results(out):
    """Rank 0: results.jsonl plus any results.rank*.jsonl (written by ranks, or left by an interrupted run)
    -> one results.jsonl with each (benchmark, problem_id, sample) once and no broken line. Returns the keys."""
    parts = [p for p in [out / "results.jsonl"] + sorted(out.glob("results.rank*.jsonl")) if p.exists()]
    seen = set()
    with open(out / "results.jsonl.tmp", "w") as f:
        for part in parts:
            for r in iter_results(part):
                key = (r["benchmark"], r["problem_id"], r["sample"])
                if key not in seen:
                    seen.add(key)
                    f.write(json.dumps(r) + "\n")
    os.replace(out / "results.jsonl.tmp", out / "results.jsonl")
    for part in parts[1:]:
        part.unlink()
    return seen


def write_summary(results_path):
    summary = summarize(iter_results(results_path))
    if not summary:
        die(f"{results_path} holds no results")
    (Path(results_path).parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    return summary


# -----------------------------------------------------------------------------
# comparing runs


def read_summary(path):
    """(pass@1, sem, pass@k) of an evaluated checkpoint: its one benchmark's, or the average over its benchmarks."""
    expected = "a summary.json written by eval.py"
    summary = read_json(path, "summary", expected)
    benchmarks = [k for k in summary if k != "average"] if isinstance(summary, dict) else []
    name = benchmarks[0] if len(benchmarks) == 1 else "average"
    if not benchmarks or name not in summary:
        die(f"{path} has no {'benchmark' if not benchmarks else 'average'} entry; expected {expected}")
    s = summary[name]
    wrong = bad_fields(s, {"pass@1": ((int, float), "a number"), "pass@k": (dict, "an object")})
    if not wrong and not (s["pass@k"] and all(k.isdigit() and type(v) in (int, float) for k, v in s["pass@k"].items())):
        wrong = f"has 'pass@k' = {json.dumps(s['pass@k'])[:40]}, not an object of k: number"
    if not wrong and type(s.get("sem")) not in (int, float, type(None)):  # sem is optional
        wrong = f"has 'sem' = {json.dumps(s['sem'])[:40]}, not a number"
    if wrong:
        die(f"{path}: its {name!r} entry {wrong}; expected {expected}")
    return s["pass@1"], s.get("sem"), s["pass@k"]


REPORT_KEYS = ("chosen_logps_per_token", "rejected_logps_per_token", "update_norm")  # what report() reads per step


def read_metrics(path):
    """A run's metrics.jsonl: one object per step with an integer step; each of REPORT_KEYS that line 1 has must be a
    number on every line. A last line cut short by a crash is skipped, with a note."""
    expected = "a metrics.jsonl written by sft.py or redi.py"
    metrics = []
    for n, m in read_json_lines(path, "metrics", expected, cut_last_ok=True):
        first = metrics[0] if metrics else m
        keys = [k for k in REPORT_KEYS if isinstance(first, dict) and k in first]
        wrong = bad_fields(m, {"step": (int, "an integer"), **{k: ((int, float), "a number") for k in keys}})
        if wrong:
            die(f"{path}, line {n} {wrong}; expected {expected}")
        metrics.append(m)
    return metrics


def run_report(run):
    """One run's evaluated checkpoints and training dynamics: {step: (pass@1, sem, pass@k)}, metrics.jsonl, and
    its best checkpoint, the one the paper keeps (PAPER.md §3): the highest intermediate pass@1, the earlier on a
    tie."""
    run = Path(run)
    if not run.is_dir():
        die(f"run {str(run)!r} is not a folder; expected a run folder of sft.py/redi.py with eval/step_N/summary.json")
    evals = {}
    for path in sorted(run.glob("eval/step_*/summary.json")):
        if re.fullmatch(r"step_\d+", path.parent.name):  # not step_final, step_5.bak, ...
            evals[int(path.parent.name[5:])] = read_summary(path)
    if not evals:
        die(f"{run} has no eval/step_N/summary.json: evaluate its checkpoints first")
    step = min(evals, key=lambda k: (-evals[k][0], k))  # among this run's own checkpoints, before step 0 joins
    best = {"step": step, "pass@1": evals[step][0], "sem": evals[step][1],
            "checkpoint": str(run / "ckpt" / f"step_{step:06d}")}
    metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    config = read_json(run / "config.json", "config", "the config.json of an sft.py/redi.py run") \
        if (run / "config.json").exists() else {}
    wrong = bad_fields(config, {"model": (str, "a string")} if isinstance(config, dict) and "model" in config else {})
    if wrong:
        die(f"{run / 'config.json'} {wrong}; expected the config.json of an sft.py/redi.py run")
    # Step 0 is the starting model: when it is an evaluated checkpoint of another run, take its accuracy.
    start = Path(config["model"]).resolve() if "model" in config else None
    start_run = None  # the run whose checkpoint this one starts from: the SFT run of a stage-2 run
    if start and re.fullmatch(r"step_\d+", start.name) \
            and (start.parent.parent / "eval" / start.name / "summary.json").exists():
        start_run = str(start.parent.parent)
        if 0 not in evals:
            evals[0] = run_report(start_run)["evals"][int(start.name[5:])]
    return {"run": str(run), "evals": dict(sorted(evals.items())), "best": best, "metrics": metrics,
            "start_run": start_run}


def seed_table(runs):
    """Runs of the same name (one folder per seed, e.g. sft_seedK/sft and sft_seedK/stage2_seedJ/b_redi) pooled: the
    final pass@1's mean, its spread over SFT seeds (the sd of the means of the runs that start from each SFT run; an
    SFT run is its own start) and over stage-2 seeds (the sd among runs from the same SFT run, averaged over SFT
    runs), its range, and the change from each run's previous checkpoint to its last (3/4 of SFT to the end; halfway
    through stage 2 to the end), which says whether a run had stopped moving. Sample sds (n - 1); "-" for one value."""
    sd = lambda v: f"{np.std(v, ddof=1):.1%}" if len(v) > 1 else "-"  # noqa: E731
    lines = ["| run | runs (SFT seeds x stage-2 seeds) | final pass@1, mean | sd over SFT seeds "
             "| sd over stage-2 seeds | min to max | last - previous checkpoint, mean (min to max) |", "|---" * 7 + "|"]
    by_name = {}
    for r in runs:
        by_name.setdefault(Path(r["run"]).name, []).append(r)
    for name, group in by_name.items():
        by_start = {}
        for r in group:
            by_start.setdefault(r["start_run"] or r["run"], []).append(r["evals"][max(r["evals"])][0])
        finals = [v for vs in by_start.values() for v in vs]
        within = [np.std(v, ddof=1) for v in by_start.values() if len(v) > 1]
        n_stage2 = sorted({len(v) for v in by_start.values()})
        changes = []
        for r in group:
            steps = [s for s in r["evals"] if s > 0]  # step 0 is another run's checkpoint
            if len(steps) > 1:
                changes.append(r["evals"][steps[-1]][0] - r["evals"][steps[-2]][0])
        change = f"{np.mean(changes):+.1%} ({min(changes):+.1%} to {max(changes):+.1%})" if changes else "-"
        lines.append(f"| {name} | {len(by_start)} x {'/'.join(map(str, n_stage2))} | {np.mean(finals):.1%} | "
                     f"{sd([np.mean(v) for v in by_start.values()])} | {f'{np.mean(within):.1%}' if within else '-'} | "
                     f"{min(finals):.1%} to {max(finals):.1%} | {change} |")
    return lines


def report(args):
    """The table: the last checkpoint's pass@1 +- SEM and pass@k per run, and its best checkpoint's; LogPS at the
    first and last step; the largest update; the first step flagged as collapse. Then runs of the same name pooled over
    seeds (seed_table): mean and spread of the final pass@1 over SFT seeds and stage-2 seeds.
    Each run folder gets RUN/best, a link to its best checkpoint (as RUN/final links the last), for run.sh's final
    evaluation; report.json names it too."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        die(f"--out {args.out!r} is a file; expected a folder (it is created if missing)")
    runs = [run_report(r) for r in args.runs]
    lines = ["| run (last step) | pass@1 | pass@k | best checkpoint: pass@1 | chosen LogPS | rejected LogPS "
             "| max update norm | collapse |", "|---" * 8 + "|"]
    for r in runs:
        step = max(r["evals"])
        acc, sem, at_k = r["evals"][step]
        k = max(at_k, key=int)
        m, best = r["metrics"], r["best"]
        logps = lambda key: f"{m[0][key]:.3f} -> {m[-1][key]:.3f}" if m and key in m[0] else ""  # noqa: E731
        collapse = next((str(x["step"]) for x in m if x.get("collapse")), "no" if m and "collapse" in m[0] else "")
        lines.append(f"| {r['run']} (step {step}) | {acc:.1%} +- {sem or 0:.1%} | @{k} {at_k[k]:.1%} | "
                     f"**step {best['step']}: {best['pass@1']:.1%} +- {best['sem'] or 0:.1%}** | "
                     f"{logps('chosen_logps_per_token')} | {logps('rejected_logps_per_token')} | "
                     f"{max((x['update_norm'] for x in m if 'update_norm' in x), default=float('nan')):.3g} | {collapse} |")
        link, target = Path(r["run"]) / "best", Path(best["checkpoint"])
        if target.is_dir():
            link.unlink(missing_ok=True)
            link.symlink_to(target.relative_to(r["run"]))
        else:
            print(f"note: {target} is not there, so {link} was not made")
    lines += [""] + seed_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(matplotlib is not installed: no plots)")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for r in runs:
        m = [x for x in r["metrics"] if "chosen_logps_per_token" in x]
        if not m:  # an SFT run: its last accuracy is step 0 of the runs that start from it
            continue
        steps = sorted(r["evals"])
        [line] = axes[0].plot(steps, [r["evals"][s][0] for s in steps], marker="o", label=r["run"])
        axes[0].plot(r["best"]["step"], r["best"]["pass@1"], marker="*", ms=16, color=line.get_color())  # the best
        for ax, key in zip(axes[1:], ("chosen_logps_per_token", "rejected_logps_per_token", "update_norm")):
            ax.plot([x["step"] for x in m], [x[key] for x in m], label=r["run"])
    for ax, title in zip(axes, ("pass@1 of checkpoints", "chosen LogPS (per token)", "rejected LogPS (per token)",
                                "update norm |theta_t+1 - theta_t|")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    print(f"plots: {out / 'report.png'}")


# -----------------------------------------------------------------------------


def load_for_generation(args, device):
    """Tokenizer and model in eval mode: bf16 on GPUs, fp32 on CPUs. The model's own generation_config (some ship
    top_k, repetition_penalty, ...) is replaced by an empty one so that only PAPER.md §4's sampling applies."""
    from transformers import GenerationConfig
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, attn_implementation=args.attn_implementation,
                       trust_remote_code=args.trust_remote_code, dtype=dtype)
    model.generation_config = GenerationConfig()
    return tokenizer, model.to(device).eval()


def generate_groups(model, jobs, args, pad_id, stop_ids):
    """Yields (jobs, their (tokens, num_tokens, finish_reason), seconds, share of slot-steps busy or None) in groups of
    --batch-size samples: engine generate one batch at a time, engine slots in the order samples stop. The seconds
    count generation only (the caller's grading between groups is not in them)."""
    if args.engine == "generate":
        device = next(model.parameters()).device
        for b in range(0, len(jobs), args.batch_size):
            batch, t0 = jobs[b:b + args.batch_size], time.perf_counter()
            yield batch, generate_batch(model, batch, args, pad_id, stop_ids, device), time.perf_counter() - t0, None
        return
    if not jobs:
        return
    engine = SlotEngine(model, min(args.batch_size, len(jobs)), max(len(j["prompt_ids"]) for j in jobs)
                        + args.max_new_tokens - 1, args.max_new_tokens, args.temperature, args.top_p, stop_ids, pad_id,
                        cuda_graphs=args.cuda_graphs, attention=args.slot_attention)
    group, t0, steps, busy = [], time.perf_counter(), 0, 0

    def finish_group():
        share = (engine.busy - busy) / max(engine.steps - steps, 1) / engine.slots
        return [j for j, _ in group], [r for _, r in group], time.perf_counter() - t0, share

    for job, result in engine.generate(jobs):
        group.append((job, result))
        if len(group) == args.batch_size:
            yield finish_group()
            group, t0, steps, busy = [], time.perf_counter(), engine.steps, engine.busy
    if group:
        yield finish_group()


def check_out_folder(args):
    """A rerun may add samples or benchmarks to --out, but not with different sampling settings."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        die(f"--out {args.out!r} is a file; expected a folder (it is created if missing)")
    path = Path(args.out) / "config.json"
    if path.exists():
        old = read_json(path, "--out's", "the config.json an earlier eval.py run wrote there")
        if not isinstance(old, dict):
            die(f"{path} is {JSON_TYPES.get(type(old))}, not an object; expected the config.json of an eval.py run")
        changed = [k for k in SAMPLING_KEYS if k in old and old[k] != getattr(args, k)]
        if changed:
            die(f"--out {args.out!r} holds samples made with other settings ({', '.join(changed)}); use a new --out")


def run(args):
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or min(args.samples, args.batch_size, args.max_new_tokens) < 1:
        die("--temperature must be > 0, --top-p in (0, 1], --samples, --batch-size and --max-new-tokens >= 1")
    rank, world, device = init_dist()
    # Ranks finish at different times (response lengths vary a lot); this group waits for them without the
    # default collective timeout.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    out = Path(args.out)
    check_out_folder(args)
    problems = load_problems(args)
    tokenizer, model = load_for_generation(args, device)
    if args.engine == "auto":
        args.engine = "slots" if device.type == "cuda" and slots_supported(model) else "generate"
    if args.engine == "slots" and not slots_supported(model):
        die(f"--engine slots: {args.model} has sliding-window attention layers, which engine slots does not handle; "
            f"use --engine generate")
    stop_ids = stop_token_ids(tokenizer)
    args.benchmark, args.stop_token_ids, args.world_size = list(problems), stop_ids, world
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    done = [merge_results(out) if rank == 0 else None]
    dist.broadcast_object_list(done, src=0, group=group)
    done = done[0]

    # Every rank builds the same list: problems sorted by prompt length, dealt round-robin, so ranks get similar
    # mixes and a batch holds prompts of similar length (little padding). Then this rank's unfinished samples.
    prompts = []
    for name, items in problems.items():
        texts = [build_prompt(tokenizer, p["problem"], args.prompt, args.think_prefix) for p in items]
        for p, ids in zip(items, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            prompts.append({"benchmark": name, "problem_id": p["id"], "gold": p["gold"], "prompt_ids": ids})
    prompts.sort(key=lambda p: len(p["prompt_ids"]))
    jobs = [{**p, "sample": j, "seed": sample_seed(args.seed, p["benchmark"], p["problem_id"], j)}
            for p in prompts[rank::world] for j in range(args.samples)
            if (p["benchmark"], p["problem_id"], j) not in done]
    too_long = [j for j in jobs if len(j["prompt_ids"]) > args.max_prompt_tokens]
    jobs = [j for j in jobs if len(j["prompt_ids"]) <= args.max_prompt_tokens]
    n_total = len(prompts) * args.samples
    print0(f"eval {args.model}: {', '.join(f'{k} ({len(v)})' for k, v in problems.items())} x {args.samples} samples = "
           f"{n_total:,}; {len(done):,} already in {out / 'results.jsonl'}; {world} rank(s) on {device.type}; "
           f"rank 0 has {len(jobs):,} to generate; stop tokens {stop_ids}; engine {args.engine}")

    if too_long:
        print(f"rank {rank}: {len(too_long)} samples have prompts over --max-prompt-tokens {args.max_prompt_tokens} "
              f"(longest {max(len(j['prompt_ids']) for j in too_long)}); not generated, they count as wrong", flush=True)
    with open(out / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl"), "a") as f:
        # Over-long prompts are recorded too, so that every benchmark keeps its size.
        write_results(f, too_long, [""] * len(too_long), [(0, "prompt_too_long")] * len(too_long),
                      [{"answer": None, "correct": False, "grade_timeout": False}] * len(too_long))
        grader = Grader(args.grade_workers, args.grade_timeout) if jobs else None
        n_done = n_correct = 0
        for k, (batch, generated, dt, busy) in enumerate(generate_groups(model, jobs, args, tokenizer.pad_token_id,
                                                                         stop_ids)):
            # No skip_special_tokens: a tokenizer may mark </think> special; the stop token is already cut off.
            responses = [(THINK_PREFIX if args.think_prefix else "") + tokenizer.decode(tokens)
                         for tokens, _, _ in generated]
            grades = grade_responses(grader, responses, [j["gold"] for j in batch])
            write_results(f, batch, responses, [g[1:] for g in generated], grades)
            n_done, n_correct = n_done + len(batch), n_correct + sum(g["correct"] for g in grades)
            new_tokens = sum(t for _, t, _ in generated)
            print0(f"batch {k + 1}/{math.ceil(len(jobs) / args.batch_size)} | samples "
                   f"{n_done:,}/{len(jobs):,} (rank 0) | {len(batch)} x {max(len(j['prompt_ids']) for j in batch)} "
                   f"prompt tokens | {new_tokens:,} new tokens in {dt:.1f}s = {new_tokens / dt:,.0f} tok/s"
                   + (f", slots busy {busy:.0%}" if busy is not None else "")
                   + f" | correct so far {n_correct / n_done:.1%}")
        if grader:
            grader.close()
    dist.barrier(group=group)
    if rank == 0:
        merge_results(out)
        write_summary(out / "results.jsonl")
    cleanup()


def main():
    if sys.argv[1:2] == ["score"]:
        write_summary(score_parser.parse_args(sys.argv[2:]).results)
    elif sys.argv[1:2] == ["report"]:
        report(report_parser.parse_args(sys.argv[2:]))
    else:
        args = parser.parse_args()
        check_model_path(args.model, "--model", ("config.json",))
        check_model_path(args.model, "--model", TOKENIZER_FILES)  # the tokenizer is read from the same folder
        run(args)


if __name__ == "__main__":
    main()
