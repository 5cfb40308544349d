"""Evaluation (PAPER.md §4): sample answers from a Hugging Face model, grade them with math-verify, and report
pass@1 with its SEM, pass@k and generation statistics (response tokens, "Wait" counts). Two generation engines
(--engine): "generate", the default on CPUs and the reference (batches through transformers' model.generate), and
"slots", the default on GPUs (engine.py: slots refilled as samples stop, each decoding step a CUDA graph replay).
Both draw every token with engine.py's top-p sampler from the sample's own seeded uniforms: the same tokens.

    python eval.py --model runs/redi/final --out runs/redi/eval                 # MATH-500 x 4 samples
    python eval.py --model runs/redi/best --benchmark math500 aime24 amc23 minerva olympiadbench \
        --samples 16 --prompt lighteval --out runs/redi/eval16        # the paper's final evals, with its prompt
    torchrun --nproc_per_node 8 eval.py --model runs/redi/final --samples 16 --out runs/redi/eval16
    python eval.py --model demo/model --data demo/test.jsonl --max-new-tokens 512 --out runs/demo-eval
    python eval.py --model runs/redi/best --data rllm/aime.json rllm/amc.json rllm/math.json rllm/minerva.json \
        rllm/olympiad_bench.json --samples 16 --prompt lighteval --out runs/redi/eval16-rllm  # the authors' answer keys
    python eval.py --model runs/redi/ckpt/step_000100 --prompt lighteval --no-think-prefix --answer-from whole \
        --out runs/redi/eval/step_000100             # the authors' intermediate evals: lighteval's prompt and grading
    python eval.py --model runs/redi/final --batch-size 64 --out runs/redi/eval     # 64 slots: ~60 GB of KV cache
    python eval.py score runs/redi/eval/results.jsonl     # rebuild summary.json and the table from results alone
    python eval.py report runs/sft runs/redi runs/dpo --out runs/report   # compare runs: report.py's table, plots

--out gets results.jsonl (one line per sample, appended as samples finish; a rerun with the same --out
skips the samples already there, and Ctrl-C keeps them), summary.json (per benchmark, plus the average, over the
command's benchmarks and samples) and config.json. A rerun must have the same weights (their fingerprint, not the
--model path) and the same sampling and grading settings. Under torchrun every rank holds a whole model and takes a
share of the problems; rank 0 merges.
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
import signal
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
from engine import Sampler, SlotEngine, slots_supported

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
# Settings that change what a sample is or how it is graded: a rerun into the same --out must keep them, or the
# results would mix. "weights" is the fingerprint of what --model holds (weights_fingerprint), not its path.
SAMPLE_KEYS = ("weights", "prompt", "think_prefix", "temperature", "top_p", "max_new_tokens", "max_prompt_tokens",
               "seed", "answer_from")
SUMMARY_SETTINGS = ("prompt", "think_prefix", "answer_from")  # recorded in summary.json: how its pass@1 was made


def checked(kind, ok, words):
    """An argparse type for a number flag: a value that is not a finite `kind` satisfying ok stops before any work
    (exit 2, "argument --flag: must be WORDS, not 'TEXT'")."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {words}, not {text!r}")
        return value
    return convert


COUNT = checked(int, lambda v: v >= 1, "an integer >= 1")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model
parser.add_argument("--model", required=True, help="model folder or Hub id (a checkpoint from sft.py/redi.py)")
parser.add_argument("--attn-implementation", default="sdpa",
                    help="sdpa, eager, flash_attention_2, ... (engine generate; engine slots brings its own)")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
# problems
parser.add_argument("--benchmark", nargs="+", default=None, choices=list(BENCHMARKS),
                    help="one or more (default math500, PAPER.md §4's intermediate eval, unless --data is given)")
parser.add_argument("--data", nargs="+", default=None,
                    help="local files of problems, each a benchmark named after its file stem: .jsonl, .parquet, or "
                         ".json holding one array of objects (the authors' rllm answer files, e.g. minerva.json). A "
                         "JSON list in the answer field holds alternatives, any of which counts; each is stripped, and "
                         "one with $...$ in it is read as math-verify reads it ('$69$,$84$' is the set {69, 84})")
parser.add_argument("--problem-field", default="problem", help="--data: field holding the problem")
parser.add_argument("--answer-field", default="answer", help="--data: field holding the gold answer")
parser.add_argument("--id-field", default="id",
                    help="--data: problem id field, where a row has it (else the row number, from 0); rllm's files: "
                         "unique_id (math), idx (minerva), id (olympiad_bench), none (aime, amc)")
parser.add_argument("--limit", type=COUNT, default=None,
                    help="only the first N problems of each benchmark (smoke tests)")
# generation (PAPER.md §4)
parser.add_argument("--prompt", choices=["bare", "lighteval"], default="bare",
                    help="bare: the problem as the user turn, then '<|im_start|>assistant\\n<think>\\n' as in training "
                         "(default); lighteval: the authors' evaluation, behind the paper's numbers: lighteval's MATH "
                         "template around the problem, then '<|im_start|>assistant<think>\\n' (PAPER.md §4)")
parser.add_argument("--no-think-prefix", dest="think_prefix", action="store_false",
                    help="do not start the assistant turn with '<think>\\n' (the authors' final evaluations force it, "
                         "as the traces begin; their intermediate ones did not, PAPER.md §4)")
parser.add_argument("--samples", type=COUNT, default=4,
                    help="n, samples per problem: 4 for intermediate evals, 16 for final ones (not --n: torchrun "
                         "would take it for an abbreviation of its own flags)")
parser.add_argument("--temperature", type=checked(float, lambda v: v > 0, "a number > 0"), default=0.6)
parser.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=0.95,
                    help="nucleus sampling; there is no top-k (PAPER.md §4)")
parser.add_argument("--max-new-tokens", type=COUNT, default=30720,
                    help="response budget (the authors' final evaluations: 32,768 - 2,048; their intermediate ones: a "
                         "32,768-token window)")
parser.add_argument("--max-prompt-tokens", type=COUNT, default=2048,
                    help="prompt budget; a longer prompt is not generated and its samples count as wrong")
parser.add_argument("--batch-size", type=COUNT, default=32,
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
parser.add_argument("--seed", type=checked(int, lambda v: v >= 0, "an integer >= 0"), default=0,
                    help="sample j of a problem always draws the same random numbers")
# grading and output
parser.add_argument("--answer-from", choices=["think", "whole"], default="think",
                    help="think (default): the authors' final evaluations, the last \\boxed{} after the first "
                         "</think>, and no </think> scores 0; whole: their intermediate evaluations (lighteval), "
                         "math-verify's own extraction over the whole response (PAPER.md §4)")
parser.add_argument("--grade-workers", type=COUNT, default=2, help="math-verify worker processes per rank")
parser.add_argument("--grade-timeout", type=checked(float, lambda v: v > 0, "a number of seconds > 0"), default=5.0,
                    help="seconds per answer; slower grades count as wrong")
parser.add_argument("--out", required=True, help="output folder: results.jsonl, summary.json, config.json")

score_parser = argparse.ArgumentParser(prog="eval.py score", description="rebuild summary.json from a results file")
score_parser.add_argument("results", help="a results.jsonl written by eval.py; summary.json is written beside it. "
                          "Each line needs benchmark, problem_id, sample, response, answer, correct, num_tokens and "
                          "finish_reason; grade_timeout is optional (absent: false). A last line cut short by a crash "
                          "is skipped, with a note; a sample on two lines stops it. Every sample in the file counts; "
                          "the prompt and grading that summary.json records are those of the config.json beside it")

# -----------------------------------------------------------------------------
# problems


def gold_answers(value):
    """A gold answer as its alternatives, any of which counts. A list holds alternatives (the authors' Minerva key has
    2-3 for 75 of 272 problems); each is stripped (theirs end in "\\n"), and AMC's integer answers, stored as floats,
    lose the ".0". OlympiadBench's list holds ONE string with the parts of a multi-part answer ('$69$,$84$'): one
    alternative, which math-verify reads as the set {69, 84} (verify_answer)."""
    values = value if isinstance(value, list) else [value]
    return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip() for v in values]


def read_problem_file(path):
    """(rows, their line numbers or None) of a --data file: .parquet, .jsonl, or .json holding one array of objects
    (the authors' rllm answer files); a .json that does not start with "[" is read as JSON lines."""
    if path.suffix == ".parquet":
        return open_corpus(str(path), "train", "--data")[0], None
    if path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
        return read_json(path, "--data", "a JSON array of problem objects"), None
    numbered = list(read_json_lines(path, "--data", "a jsonl file of problems"))
    return [row for _, row in numbered], [n for n, _ in numbered]


def load_problems(args):
    """{benchmark: [{"id", "problem", "gold": [alternatives]}]} in dataset order. A row without a string problem or
    without an answer stops the run, naming its line (jsonl) or its row (json array, parquet, Hub; counted from 1)."""
    sources = {}  # name -> (rows, their line numbers or None, problem field, answer field, id field, where, hint)
    for data in args.data or []:
        path = check_file(data, "--data", "a .jsonl, .json or .parquet file of problems")
        if path.stem in sources:
            die(f"--data {sources[path.stem][5]} and {data} are both named {path.stem!r} (benchmarks are named "
                f"after their file stems); rename one")
        rows, lines = read_problem_file(path)
        sources[path.stem] = (rows, lines, args.problem_field, args.answer_field, args.id_field, data,
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
        fields = {problem_field: (str, "a string"),
                  answer_field: ((str, int, float, list), "a string, number or list of them")}
        items = []
        for i in range(len(rows) if args.limit is None else min(args.limit, len(rows))):
            row = rows[i]
            wrong = bad_fields(row, fields)
            gold = None if wrong else row[answer_field]
            if isinstance(gold, list) and not (gold and all(type(v) in (str, int, float) for v in gold)):
                wrong = f"has {answer_field!r} = {json.dumps(gold)[:40]}, not a non-empty list of strings or numbers"
            if wrong:
                die(f"{where}, {f'line {lines[i]}' if lines else f'row {i + 1}'} {wrong}{hint}")
            items.append({"id": str(row.get(id_field, i)) if id_field else str(i), "problem": row[problem_field],
                          "gold": gold_answers(gold)})
        if not items:
            die(f"{where} holds no problems")
        if len({p["id"] for p in items}) < len(items):
            die(f"{where}: the id field {id_field!r} has repeated values; point --id-field at a unique field")
        problems[name] = items
    return problems


# -----------------------------------------------------------------------------
# prompts, stop tokens and each sample's seed


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


def sample_seed(seed, benchmark, problem_id, sample):
    """The seed of sample j of a problem: it draws the same uniforms whichever engine, batch, rank or rerun makes it."""
    return int(hashlib.sha256(f"{seed}|{benchmark}|{problem_id}|{sample}".encode()).hexdigest()[:15], 16)


# -----------------------------------------------------------------------------
# generation: engine "generate" (transformers' model.generate, the reference), then engine "slots" (engine.py)


def load_generation_model(args, device):
    """The model in eval mode: bf16 on GPUs, fp32 on CPUs. Its own generation_config (some ship top_k,
    repetition_penalty, ...) is replaced by an empty one so that only PAPER.md §4's sampling applies."""
    from transformers import GenerationConfig
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, attn_implementation=args.attn_implementation,  # a damaged file: one sentence
                       trust_remote_code=args.trust_remote_code, dtype=dtype)
    model.generation_config = GenerationConfig()
    return model.to(device).eval()


def load_for_generation(args, device):
    """Tokenizer and model (tools/bench.py loads both at once)."""
    return load_tokenizer(args.model, args.trust_remote_code), load_generation_model(args, device)


def generate_batch(model, jobs, args, pad_id, stop_ids, device):
    """Engine "generate": left-pads the jobs' prompts into one batch and samples with model.generate until every
    row has stopped. Returns per job (new tokens without the stop token, num_tokens including it, finish_reason).
    A job may carry its own "max_new_tokens" (tools/bench.py forces lengths so): its row runs on with the batch and
    is cut."""
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


def generate_groups(model, jobs, args, pad_id, stop_ids):
    """Yields (jobs, their (tokens, num_tokens, finish_reason), seconds, share of slot-steps busy or None) in groups of
    --batch-size samples: engine generate one batch at a time, engine slots in the order samples stop. The seconds
    count generation only (the caller's grading between groups is not in them)."""
    if args.engine == "generate":  # the reference
        device = next(model.parameters()).device
        for b in range(0, len(jobs), args.batch_size):
            batch, t0 = jobs[b:b + args.batch_size], time.perf_counter()
            yield batch, generate_batch(model, batch, args, pad_id, stop_ids, device), time.perf_counter() - t0, None
        return
    if jobs:
        engine = SlotEngine(model, min(args.batch_size, len(jobs)), max(len(j["prompt_ids"]) for j in jobs)
                            + args.max_new_tokens - 1, args.max_new_tokens, args.temperature, args.top_p, stop_ids,
                            pad_id, cuda_graphs=args.cuda_graphs, attention=args.slot_attention)
        yield from engine.groups(jobs, args.batch_size)


# -----------------------------------------------------------------------------
# grading: the last \boxed{} after the first </think> (or math-verify's pick from the whole response), checked by
# math-verify against each alternative of the gold answer, in worker processes


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
    """(answer, status) under the authors' rule (PAPER.md §4): no </think> -> (None, "unclosed"); else their grader
    reads the text after the FIRST </think>, up to a second one if there is one (response.split("</think>")[1],
    PAPER.md §4): no boxed answer there -> (None, "no_answer"); else (its last boxed content, "ok")."""
    parts = response.split("</think>")
    if len(parts) == 1:
        return None, "unclosed"
    answer = last_boxed(parts[1])
    return (None, "no_answer") if answer is None else (answer, "ok")


def verify_answer(text, gold, whole=False):
    """(correct, the answer math-verify read or None): math-verify, gold first, against each alternative of gold (a
    string or a list; any match counts). Bare LaTeX like (x+1)^2 parses to nothing, so an extracted answer is put in
    $...$, and so is a gold alternative with no unescaped $ of its own; one with $ is parsed as it is ('$69$,$84$':
    the set {69, 84}). whole: text is the whole response, and math-verify's default extraction (lighteval's) picks
    the answer. math-verify's SIGALRM timeouts are off: the Grader's is the timeout."""
    answer = parse(text if whole else f"${text}$", parsing_timeout=None)
    golds = [g if re.search(r"(?<!\\)\$", g) else f"${g}$" for g in (gold if isinstance(gold, list) else [gold])]
    correct = any(verify(parse(g, parsing_timeout=None), answer, timeout_seconds=None) for g in golds)
    return correct, (str(answer[-1]) if answer else None)


def _grade_worker(conn):
    """Worker process: receives lists of verify_answer's arguments, sends back (correct, answer) per item as soon as
    it is graded."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" warnings: ours is on
    conn.send("ready")
    try:
        while (items := conn.recv()) is not None:
            for item in items:
                try:
                    correct, answer = verify_answer(*item)
                    conn.send((bool(correct), answer))
                except Exception:
                    conn.send((False, None))
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
        # Ctrl-C signals every process of the terminal's group. A worker is born ignoring SIGINT (an ignored signal
        # stays ignored across exec, so also while it imports): only the parent stops, and it closes the workers.
        # The parent blocks SIGINT meanwhile: one that comes then waits (Linux keeps a blocked signal pending even
        # while it is ignored) and is raised once the handler is back, instead of being lost with the run going on
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGINT, sigint)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.close()
        return {"proc": proc, "conn": conn, "ready": False, "todo": [], "deadline": None}

    def __call__(self, pairs):
        """pairs: list of verify_answer's arguments, (answer, gold) or (response, gold, whole). Returns
        [(correct, timed_out, the answer math-verify read or None)], in order."""
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
                            correct, answer = message
                            results[w["todo"].pop(0)] = (correct, False, answer)
                            w["deadline"] = time.monotonic() + self.timeout
                except (EOFError, ConnectionError):
                    if not w["ready"]:
                        raise RuntimeError("a grading worker died while starting (can it import eval.py?)")
                    dead = True  # crashed on its current answer: handled like a hang
                if dead or (w["todo"] and time.monotonic() > w["deadline"]):
                    if w["todo"]:
                        results[w["todo"].pop(0)] = (False, True, None)
                    if w["todo"]:
                        queue.append(w["todo"])  # the rest of its chunk goes to the next free worker
                    w["proc"].kill()
                    w["proc"].join()
                    self.workers[k] = self._start()
        return results

    def close(self):
        """Idle workers are told to stop; one still grading (the run was interrupted) is killed."""
        for w in self.workers:
            if w["todo"]:
                w["proc"].kill()
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
        self.workers = []


def grade_responses(grader, responses, golds, answer_from="think"):
    """One dict per response: the answer, correct, grade_timeout. golds: each a string or a list of alternatives.
    think: the authors' final evaluations (PAPER.md §4), the last boxed answer after the first </think>, extracted
    here; only answers that exist go to the workers. whole: their intermediate evaluations (lighteval), every whole
    response goes to the workers, and the answer is what math-verify's own extraction read in it."""
    whole = answer_from == "whole"
    graded = [{"answer": None if whole else extract_answer(r)[0], "correct": False, "grade_timeout": False}
              for r in responses]
    todo = list(range(len(responses))) if whole else [i for i, g in enumerate(graded) if g["answer"] is not None]
    items = [(responses[i], golds[i], True) if whole else (graded[i]["answer"], golds[i]) for i in todo]
    for i, (correct, timed_out, answer) in zip(todo, grader(items) if items else []):
        graded[i].update(correct=correct, grade_timeout=timed_out, **({"answer": answer} if whole else {}))
    return graded


_default_grader = None


def grade_many(responses, golds, answer_from="think"):
    """Correctness of each response against its gold answer (PAPER.md §4's rule), on a pool started at first use."""
    global _default_grader
    _default_grader = _default_grader or Grader()
    return [g["correct"] for g in grade_responses(_default_grader, responses, golds, answer_from)]


def grade(response, gold, answer_from="think"):
    return grade_many([response], [gold], answer_from)[0]


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


def summarize(records, answer_from="think"):
    """Per-benchmark metrics from result records (dicts as in results.jsonl), and their average over benchmarks.
    Rates are fractions of the benchmark's samples; timeouts and prompt_too_long are counts of samples. answer_from:
    how the records were graded, which says what no_answer means."""
    table = {}  # benchmark -> problem_id -> sample -> the record's small fields
    for r in records:
        timeout, finish = r.get("grade_timeout", OPTIONAL_RESULT_FIELDS["grade_timeout"][1]), r["finish_reason"]
        status = extract_answer(r["response"])[1]
        table.setdefault(r["benchmark"], {}).setdefault(r["problem_id"], {})[r["sample"]] = {
            "correct": r["correct"], "tokens": r["num_tokens"], "waits": count_wait(r["response"]),
            "status": status, "finish": finish, "timeout": timeout,
            # think: closed </think> but no \boxed{} after it; whole: math-verify read no answer in the response
            "no_answer": status == "no_answer" if answer_from == "think" else
            r["answer"] is None and not timeout and finish != "prompt_too_long"}
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
            "no_answer": float(np.mean([s["no_answer"] for s in flat])),
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
                          # absent: unknown (no metric reads it); a list: the alternatives of a gold answer
                          "gold": (((str, list, type(None)), "a string, a list of them or null"), None)}


def iter_results(path):
    """(line number, record) for each record of a results file, each checked for RESULT_FIELDS (and the types of the
    optional ones it has). A last line cut short by a crash is skipped with a note; a rerun into the same --out
    generates its sample again."""
    expected = f"a results.jsonl written by eval.py (fields {', '.join(RESULT_FIELDS)})"
    for n, r in read_json_lines(path, "results file", expected, cut_last_ok=True):
        wrong = bad_fields(r, RESULT_FIELDS) or \
            bad_fields(r, {k: types for k, (types, _) in OPTIONAL_RESULT_FIELDS.items() if k in r})
        if wrong:
            die(f"{path}, line {n} {wrong}; expected {expected}")
        yield n, r


def write_results(f, jobs, responses, finishes, grades):
    """One line per sample, flushed at once. num_tokens counts the tokens the model generated, its stop token
    included (the forced <think>\\n is prompt); finish_reason is "stop", "length" or "prompt_too_long". gold is a
    string, or the list of alternatives when there are several."""
    for j, response, (num_tokens, finish), g in zip(jobs, responses, finishes, grades):
        gold = j["gold"][0] if len(j["gold"]) == 1 else j["gold"]
        f.write(json.dumps({"benchmark": j["benchmark"], "problem_id": j["problem_id"], "sample": j["sample"],
                            "response": response, "answer": g["answer"], "gold": gold, "correct": g["correct"],
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
            for _, r in iter_results(part):
                key = (r["benchmark"], r["problem_id"], r["sample"])
                if key not in seen:
                    seen.add(key)
                    f.write(json.dumps(r) + "\n")
    os.replace(out / "results.jsonl.tmp", out / "results.jsonl")
    for part in parts[1:]:
        part.unlink()
    return seen


def recorded_settings(results_path):
    """The settings of SUMMARY_SETTINGS that the config.json beside a results file records (`score`); None for
    those it lacks, except answer_from: eval.py graded by the </think> rule before it had the flag."""
    path = Path(results_path).parent / "config.json"
    config = read_json(path, "config", "the config.json of an eval.py run") if path.is_file() else {}
    config = {"answer_from": "think", **config} if isinstance(config, dict) else {"answer_from": "think"}
    return {k: config.get(k) for k in SUMMARY_SETTINGS}


def write_summary(results_path, settings, keep=lambda r: True):
    """summary.json beside the results: the metrics over the records keep() takes, and the settings (SUMMARY_SETTINGS)
    they were made with. A sample on two lines (two runs' results concatenated) stops it, naming both."""
    lines, records = {}, []
    for n, r in iter_results(results_path):
        key = (r["benchmark"], r["problem_id"], r["sample"])
        if key in lines:
            die(f"{results_path}, lines {lines[key]} and {n} both hold sample {r['sample']} of {r['benchmark']} "
                f"problem {r['problem_id']!r}; expected each sample once (are two runs' results concatenated?)")
        lines[key] = n
        if keep(r):
            records.append(r)
    summary = summarize(records, settings["answer_from"])
    if not summary:
        die(f"{results_path} holds no results")
    (Path(results_path).parent / "summary.json").write_text(json.dumps({**summary, "settings": settings}, indent=2)
                                                            + "\n")
    print_table(summary)
    return summary


# -----------------------------------------------------------------------------
# the run


def weights_fingerprint(model):
    """What made a folder's samples: for a local --model, a SHA-256 over its config.json and weight files' contents,
    symlinks resolved (RUN/final stands for the checkpoint it points at now, and a copy of the same weights matches);
    for a Hub id, the id. It reads the weights once, a few seconds per GB (the load that follows finds them cached)."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    path = path.resolve()
    weights = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.match("pytorch_model*.bin"))
    digest = hashlib.sha256()
    for file in [path / "config.json"] + weights:
        with open(file, "rb") as f:
            digest.update(f"{file.name} {hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def check_out_folder(args):
    """--out must be a folder that can be written, or be creatable; checked before the model loads. A rerun may add
    samples or benchmarks to it, but not from other weights (args.weights) or with other sampling or grading
    settings."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        die(f"--out {args.out!r} is a file; expected a folder (it is created if missing)")
    existing = next(p for p in [out, *out.parents] if p.exists())  # --out, or the folder it will be made in
    if not existing.is_dir():
        die(f"--out {args.out!r} is under {str(existing)!r}, which is a file; expected a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"--out {args.out!r}: {str(existing)!r} cannot be written (permission denied); pick another --out")
    results = [p for p in [out / "results.jsonl", *out.glob("results.rank*.jsonl")] if p.is_file() and p.stat().st_size]
    path = out / "config.json"
    if not results or not path.is_file():  # no samples to mix with
        return
    old = read_json(path, "--out's", "the config.json an earlier eval.py run wrote there")
    if not isinstance(old, dict):
        die(f"{path} is {JSON_TYPES.get(type(old))}, not an object; expected the config.json of an eval.py run")
    if "weights" in old and old["weights"] != args.weights:
        die(f"--out {args.out!r} holds samples of other weights than --model {args.model!r} now has; use a new --out")
    old = {"answer_from": "think", **old}  # written before --answer-from existed: graded by the </think> rule
    keys = SAMPLE_KEYS if "weights" in old else ("model",) + SAMPLE_KEYS[1:]  # older ones name the model by path only
    changed = [k for k in keys if k in old and old[k] != getattr(args, k)]
    if changed:
        die(f"--out {args.out!r} holds samples made with other settings ({', '.join(changed)}); use a new --out")


def run(args):
    rank, world, device = init_dist()
    # Ranks finish at different times (response lengths vary a lot); this group waits for them without the
    # default collective timeout.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    out = Path(args.out)
    # Everything a user can get wrong is checked before the model loads and before --out gets a file
    fingerprint = [weights_fingerprint(args.model) if rank == 0 else None]  # one rank reads the weights for it
    dist.broadcast_object_list(fingerprint, src=0, group=group)
    args.weights = fingerprint[0]
    check_out_folder(args)
    problems = load_problems(args)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if tokenizer.chat_template is None:
        die(f"--model {args.model!r} has no chat template (in tokenizer_config.json or chat_template.jinja); eval.py "
            f"writes every prompt in the model's own template")
    # Every rank builds the same list: problems sorted by prompt length, dealt round-robin, so ranks get similar
    # mixes and a batch holds prompts of similar length (little padding).
    prompts = []
    for name, items in problems.items():
        texts = [build_prompt(tokenizer, p["problem"], args.prompt, args.think_prefix) for p in items]
        for p, ids in zip(items, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            prompts.append({"benchmark": name, "problem_id": p["id"], "gold": p["gold"], "prompt_ids": ids})
    prompts.sort(key=lambda p: len(p["prompt_ids"]))

    model = load_generation_model(args, device)
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

    # This command's samples (--out may hold more: other benchmarks, more samples); this rank's unfinished ones.
    wanted = {(p["benchmark"], p["problem_id"], j) for p in prompts for j in range(args.samples)}
    jobs = [{**p, "sample": j, "seed": sample_seed(args.seed, p["benchmark"], p["problem_id"], j)}
            for p in prompts[rank::world] for j in range(args.samples)
            if (p["benchmark"], p["problem_id"], j) not in done]
    too_long = [j for j in jobs if len(j["prompt_ids"]) > args.max_prompt_tokens]
    jobs = [j for j in jobs if len(j["prompt_ids"]) <= args.max_prompt_tokens]
    print0(f"eval {args.model}: {', '.join(f'{k} ({len(v)})' for k, v in problems.items())} x {args.samples} samples = "
           f"{len(wanted):,}; {len(wanted & done):,} already in {out / 'results.jsonl'}; {world} rank(s) on "
           f"{device.type}; rank 0 has {len(jobs):,} to generate; stop tokens {stop_ids}; engine {args.engine}")

    if too_long:
        print(f"rank {rank}: {len(too_long)} samples have prompts over --max-prompt-tokens {args.max_prompt_tokens} "
              f"(longest {max(len(j['prompt_ids']) for j in too_long)}); not generated, they count as wrong",
              flush=True)
    with open(out / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl"), "a") as f:
        # Over-long prompts are recorded too, so that every benchmark keeps its size.
        write_results(f, too_long, [""] * len(too_long), [(0, "prompt_too_long")] * len(too_long),
                      [{"answer": None, "correct": False, "grade_timeout": False}] * len(too_long))
        grader = Grader(args.grade_workers, args.grade_timeout) if jobs else None
        n_done = n_correct = 0
        try:
            for k, (batch, generated, dt, busy) in enumerate(generate_groups(model, jobs, args,
                                                                             tokenizer.pad_token_id, stop_ids)):
                # No skip_special_tokens: a tokenizer may mark </think> special; the stop token is already cut off.
                responses = [(THINK_PREFIX if args.think_prefix else "") + tokenizer.decode(tokens)
                             for tokens, _, _ in generated]
                grades = grade_responses(grader, responses, [j["gold"] for j in batch], args.answer_from)
                write_results(f, batch, responses, [g[1:] for g in generated], grades)
                n_done, n_correct = n_done + len(batch), n_correct + sum(g["correct"] for g in grades)
                new_tokens = sum(t for _, t, _ in generated)
                slots = f", slots busy {busy:.0%}" if busy is not None else ""
                print0(f"batch {k + 1}/{math.ceil(len(jobs) / args.batch_size)} | samples {n_done:,}/{len(jobs):,} "
                       f"(rank 0) | {len(batch)} x {max(len(j['prompt_ids']) for j in batch)} prompt tokens | "
                       f"{new_tokens:,} new tokens in {dt:.1f}s = {new_tokens / dt:,.0f} tok/s{slots} | "
                       f"correct so far {n_correct / n_done:.1%}")
        finally:  # also on Ctrl-C: the workers go with the run
            if grader:
                grader.close()
    dist.barrier(group=group)
    if rank == 0:
        merge_results(out)
        # The summary describes this command: its benchmarks, samples 0..n-1 (seeded per index: exactly what a run
        # with this --samples draws), its settings; results.jsonl keeps every sample.
        write_summary(out / "results.jsonl", {k: getattr(args, k) for k in SUMMARY_SETTINGS},
                      keep=lambda r: (r["benchmark"], str(r["problem_id"]), r["sample"]) in wanted)
    cleanup()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop), raised wherever the run is, so that it ends as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


def interrupted(out):
    """The one line a run stopped by Ctrl-C or SIGTERM prints: what it keeps for the rerun."""
    parts = [p for p in [out / "results.jsonl", *sorted(out.glob("results.rank*.jsonl"))] if p.is_file()]
    if not parts:
        return "interrupted before any sample was finished; rerun the same command to start again"
    finished = 0
    for part in parts:
        with open(part, "rb") as f:
            finished += sum(line.endswith(b"\n") and bool(line.strip()) for line in f)  # not a line cut mid-write
    where = out / "results.jsonl" if len(parts) == 1 else out / "results*.jsonl"
    return f"interrupted: {finished:,} finished samples are kept in {where}; rerun the same command to continue"


def main():
    if sys.argv[1:2] == ["score"]:  # every sample in the file counts; the settings are its config.json's
        results = score_parser.parse_args(sys.argv[2:]).results
        write_summary(results, recorded_settings(results))
    elif sys.argv[1:2] == ["report"]:  # comparing runs is report.py's; this entry point stays for run.sh
        import report
        report.main(sys.argv[2:], prog="eval.py report")
    else:
        args = parser.parse_args()
        check_model_path(args.model, "--model", ("config.json",))
        check_model_path(args.model, "--model", TOKENIZER_FILES)  # the tokenizer is read from the same folder
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            run(args)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: every sample written so far is a whole line
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one does not cut this short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print0(interrupted(Path(args.out)))
            cleanup()
            raise SystemExit(143 if isinstance(stop, Terminated) else 130)


if __name__ == "__main__":
    main()
