"""Data for both stages: raw teacher traces -> D_SFT and D_Pref (PAPER.md §1), and the tokenisation and
length-sorted batching that sft.py and redi.py share.

    python data.py prepare --input open-r1/OpenR1-Math-Raw --tokenizer Qwen/Qwen2.5-Math-1.5B --out data/
    python data.py prepare --input raw.jsonl --tokenizer path/to/model --out data/   # local jsonl/parquet

prepare writes DIR/sft.jsonl (problem, response), DIR/pref.jsonl (problem, chosen, rejected),
DIR/stats.json, and prints what it kept and dropped, by reason.
"""
import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from common import (JSON_TYPES, TOKENIZER_FILES, bad_fields, check_model_path, checked, decode_line, die, positive_int,
                    read_json_lines)

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."  # PAPER.md §1
LABELS = {  # PAPER.md §1: correct = Llama judge AND Math-Verify; which Math-Verify column is a choice
    "reparsed": "math_verify_reparsed_answer",  # authors' code (reproduces 77,629 / 53,175)
    "answer": "math_verify_answer",
}
# A ChatML template in the shape of Qwen2.5-Math's own: a default system turn, <|im_end|>\n after
# every turn. Used for demo.py's student and the tests (real runs use the base model's template).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# -----------------------------------------------------------------------------
# tokenisation, shared by prepare, sft.py, redi.py and eval.py


def render_chat(tokenizer, problem, response=None, system_prompt=SYSTEM_PROMPT):
    """The chat-templated text: the prompt up to and including the assistant header when response is
    None, else the whole conversation including the assistant turn's closing tokens."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)


def encode_chats(tokenizer, problems, responses, system_prompt=SYSTEM_PROMPT, append_eos=True):
    """Tokenise (problem, response) conversations in one batched call. For each, returns
    (input_ids, n_prompt): the response is input_ids[n_prompt:], i.e. every token after the generation
    prompt, the closing <|im_end|> and what follows it included, then the tokenizer's EOS (PAPER.md §1's |y|).
    The EOS is appended because the authors' trainers (TRL 0.17's SFT and DPO) append it after the
    templated conversation (PAPER.md §1: stage 2 trains and counts it, SFT keeps it as input only, which
    sft.py decides); append_eos=False leaves it off.
    Returns None for a conversation whose prompt tokens are not a prefix of its full tokens (a merge
    across the boundary): training on it would teach a split the model never sees when it generates."""
    if not problems:
        return []
    prompts = [render_chat(tokenizer, p, None, system_prompt) for p in problems]
    fulls = [render_chat(tokenizer, p, r, system_prompt) for p, r in zip(problems, responses)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for prompt, full, p_ids, f_ids in zip(prompts, fulls, prompt_ids, full_ids):
        if append_eos and f_ids[-1:] != [eos]:  # TRL's SFT rule: unless the conversation already ends with it
            f_ids = f_ids + [eos]
        ok = full.startswith(prompt) and f_ids[:len(p_ids)] == p_ids
        out.append((f_ids, len(p_ids)) if ok else None)
    return out


CUT_MARGIN = 64  # tokens beyond the limit that a text cut by characters keeps (cut_texts)


def max_token_chars(tokenizer):
    """L, the most characters one token covers: the longest string in the vocabulary, added tokens included. A
    byte-level BPE writes each byte as one character of its vocabulary, so a token covers at most L bytes, hence
    at most L characters: a text of n characters is at least n / L tokens."""
    return max(map(len, tokenizer.get_vocab()))


def cut_texts(texts, max_tokens, max_chars_per_token):
    """Each text cut to (max_tokens + CUT_MARGIN) * L characters (L: max_token_chars) before it is tokenised, for a
    caller that keeps at most its first max_tokens tokens: one huge row (a 50 MB response) is then never tokenised
    whole just to be cut. The cut text has at least max_tokens + CUT_MARGIN tokens, and its first max_tokens are
    the whole text's: only tokens at the cut may differ. Not for a text whose end is kept (redi.py's prompts): a
    byte-pair encoder splits a long run (of spaces, say) into tokens from its left end, so cutting the start can
    change every token of the run up to the end."""
    n = (max_tokens + CUT_MARGIN) * max_chars_per_token
    return [t[:n] for t in texts]


def authors_lengths(tokenizer, role, texts):
    """Token counts as the authors' length filter made them (PAPER.md §1): each text chat-templated as
    the only message of a conversation, in this role, without a generation prompt, + 1. They count the
    prompt as [user] alone and each response as [assistant] alone, so a template that inserts a default
    system turn (Qwen2.5-Math's does) puts that turn and the assistant header into the response's count,
    and the prompt's count has no assistant header."""
    if not texts:
        return []
    chats = [tokenizer.apply_chat_template([{"role": role, "content": t}], tokenize=False, add_generation_prompt=False)
             for t in texts]
    return [len(ids) + 1 for ids in tokenizer(chats, add_special_tokens=False)["input_ids"]]


def check_chat_template(tokenizer, system_prompt=SYSTEM_PROMPT, append_eos=True):
    """Stop before any work if the template cannot give a clean prompt/response split: no template,
    a prompt rendered differently once an answer follows, an answer rewritten (templates that strip
    the thinking from assistant turns do this), or prompt tokens that are not a prefix; or if there is
    no EOS token to append."""
    if not getattr(tokenizer, "chat_template", None):
        die(f"tokenizer {tokenizer.name_or_path!r} has no chat template; use the base model's tokenizer "
            "(Qwen2.5-Math ships one)")
    if append_eos and tokenizer.eos_token_id is None:
        die(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to append after each conversation; set "
            "eos_token in its tokenizer_config.json, or pass --no-append-eos")
    problem, response = "What is $1+1$?", "<think>\nOne plus one is two.\n</think>\n\nSo $\\boxed{2}$."
    prompt = render_chat(tokenizer, problem, None, system_prompt)
    full = render_chat(tokenizer, problem, response, system_prompt)
    if system_prompt not in prompt or problem not in prompt:
        die("the chat template drops the system prompt or the problem from the prompt")
    if not full.startswith(prompt):
        die("the chat template renders the prompt differently when an assistant turn follows, so the "
            f"response cannot be separated from it:\n  prompt: {prompt!r}\n  full:   {full!r}")
    if not full[len(prompt):].startswith(response):
        die("the chat template rewrites the assistant turn (does it strip <think>...</think>?): "
            f"{full[len(prompt):]!r}")
    if encode_chats(tokenizer, [problem], [response], system_prompt, append_eos)[0] is None:
        die("with this chat template the prompt's tokens are not a prefix of the conversation's tokens")


# -----------------------------------------------------------------------------
# the prepared files


def read_jsonl(path, fields):
    """The rows of a prepared jsonl file (--data of sft.py and redi.py), each with the string fields named. Any bad
    line stops the run: `data.py prepare` wrote this file, so a bad line means it was damaged or is another file."""
    expected = f"a jsonl file written by `data.py prepare` (string fields {', '.join(fields)})"
    rows = []
    for n, row in read_json_lines(path, "--data", expected):
        wrong = bad_fields(row, {name: (str, "a string") for name in fields})
        if wrong:
            die(f"{path}, line {n} {wrong}; expected {expected}")
        rows.append(row)
    if not rows:
        die(f"--data {str(path)!r} holds no rows; expected {expected}")
    return rows


# -----------------------------------------------------------------------------
# batching prepared data (sft.py, redi.py)


def batch_for_step(step, n_examples, batch_size, seed):
    """Example indices of the global batch for optimiser step `step` (0-based). Each epoch visits a
    fresh permutation; the last partial batch of an epoch is dropped (PAPER.md §3: 53,175 // 32 = 1,661
    steps). A pure function of its arguments, so resuming at a step needs no saved data position.
    The generator is seeded with the pair (seed, epoch): every (seed, epoch) gets its own stream, so two
    seeds never share an epoch's order (seeding with seed + epoch would make seed 1's first epoch seed 0's second)."""
    per_epoch = n_examples // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def micro_batches(indices, lengths, micro_batch_size, rank, world_size):
    """This rank's micro-batches of one global batch, longest first. Sorting by length before cutting gives
    each micro-batch sequences of similar length; dealing the cuts out round-robin gives every rank a similar
    mix of lengths, so no rank waits long for the others at the step's collectives. Longest first: the
    micro-batch with the most activations runs before the step has any gradient (fp32, the model's size:
    6.3 GB at 1.5B), not on top of it."""
    order = sorted(indices, key=lambda i: lengths[i], reverse=True)
    cuts = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return cuts[rank::world_size]


class Packed(NamedTuple):
    """Sequences laid end to end in one row: no padding, so no position is computed for nothing. Attention
    stays within each sequence: fast.packed_sdpa (the default) runs SDPA on each sequence of the row by
    seq_bounds; for other attention implementations position_ids restart at 0 where a sequence starts, from
    which transformers builds a block-diagonal causal mask (sdpa, eager, flex_attention) or calls its
    variable-length kernel (flash_attention_2). The response positions are found here, on the host, so the
    forward needs no data-dependent indexing (each such index would wait on the device)."""
    input_ids: torch.Tensor     # (1, N) the S sequences, concatenated
    position_ids: torch.Tensor  # (1, N) 0, 1, ... within each sequence
    pred_at: torch.Tensor       # (R,) positions t whose next token t + 1 is a response token
    targets: torch.Tensor       # (R,) that next token
    seq_of: torch.Tensor        # (R,) which of the S sequences it belongs to
    lengths: torch.Tensor       # (S,) response tokens per sequence: |y|
    seq_bounds: tuple           # (S + 1,) host ints: where each sequence starts, then N (for fast.packed_sdpa)

    def to(self, device):
        return Packed(*(t.to(device, non_blocking=True) for t in self[:-1]), self.seq_bounds)

    @property
    def model_inputs(self):
        """The arguments of common.TokenLogprobs.forward."""
        return self.input_ids, self.position_ids, self.pred_at, self.targets, self.seq_bounds


def pack(sequences):
    """sequences: list of (input_ids, n_prompt), the response being input_ids[n_prompt:], or of (input_ids,
    n_prompt, n_trained): only the first n_trained response tokens are targets, the rest stay in the row as
    input (sft.py's untrained EOS). Returns a Packed."""
    ids, positions, pred_at, seq_of, lengths, bounds = [], [], [], [], [], []
    for s, (tokens, n_prompt, *trained) in enumerate(sequences):
        n_trained = trained[0] if trained else len(tokens) - n_prompt
        assert 1 <= n_prompt and 1 <= n_trained <= len(tokens) - n_prompt, "a sequence needs a prompt and a target"
        start = len(ids)
        bounds.append(start)
        ids += tokens
        positions += range(len(tokens))
        pred_at += range(start + n_prompt - 1, start + n_prompt - 1 + n_trained)
        seq_of += [s] * n_trained
        lengths.append(n_trained)
    bounds = tuple(bounds) + (len(ids),)
    ids = torch.tensor([ids])
    pred_at = torch.tensor(pred_at)
    return Packed(ids, torch.tensor([positions]), pred_at, ids[0, pred_at + 1], torch.tensor(seq_of),
                  torch.tensor(lengths), bounds)


# -----------------------------------------------------------------------------
# prepare: OpenR1-Math-Raw -> D_SFT, D_Pref (PAPER.md §1)

REQUIRED = ("problem", "source", "generations", "correctness")  # problem_is_valid too, when filtering


class JsonlRows:
    """Random access to the lines of a jsonl file without holding it in memory (the raw corpus is
    tens of GB): byte offsets are indexed once, rows parsed on demand. A row that is not UTF-8 or not
    JSON reads as None, which check_row counts as bad_json."""

    def __init__(self, path):
        self.path, self.offsets, self.line_numbers = path, [], []  # line_numbers: 1-based, blank lines skipped
        with open(path, "rb") as f:
            pos = 0
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.offsets.append(pos)
                    self.line_numbers.append(n)
                pos += len(line)
        self.file = open(path, "rb")

    def __len__(self):
        return len(self.offsets)

    def read(self, i):
        """(row, None), or (None, what is wrong with the line)."""
        self.file.seek(self.offsets[i])
        return decode_line(self.file.readline())

    def __getitem__(self, i):
        return self.read(i)[0]

    def columns(self, sample=1000):
        keys = set()
        for i in range(min(sample, len(self))):
            row = self[i]
            keys |= set(row) if isinstance(row, dict) else set()
        return keys


def open_corpus(src, split, flag="--input"):
    """A local .jsonl/.json file, a .parquet file or folder, or a Hub dataset id. Returns an object with len() and
    [i] -> dict, the set of column names, and the words that say where a missing one was looked for. A jsonl file's
    columns are its first 1,000 rows' fields; its first row must be a JSON object, or the file is no JSON-lines
    corpus at all (a later row that is not one is skipped and counted as bad_json)."""
    path = Path(src)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        die(f"{flag} {src!r} does not exist")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        rows = JsonlRows(path)
        lines = rows.line_numbers
        if lines:
            first, wrong = rows.read(0)
            if wrong:
                die(f"{src}, line {lines[0]} {wrong}; expected JSON lines, one object per line")
            if not isinstance(first, dict):
                die(f"{src}, line {lines[0]} is {JSON_TYPES[type(first)]}, not an object; expected JSON lines, "
                    "one object per line (a .json file holding one array is not that)")
        sampled = f"lines {lines[0]}-{lines[min(1000, len(lines)) - 1]}" if lines else "no lines"
        return rows, rows.columns(), f"no row on {sampled} has"
    import datasets
    try:
        if path.is_file() and path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(src, split=split)
    except Exception as e:  # the datasets library raises many kinds for "not found"
        what = "a folder that `datasets` cannot load" if path.is_dir() else \
            "neither a local .jsonl/.parquet file nor a loadable dataset"
        die(f"{flag} {src!r} is {what} ({e.__class__.__name__}: {e})")
    return ds, set(ds.column_names), "it has no column"


MALFORMED = ("bad_json", "missing_field", "mistyped_field", "label_length_mismatch")  # bad input, not PAPER.md's rules


def check_row(row, label, validity_filter):
    """(The reason to skip a raw row, what is wrong with it in words when the reason is bad input (MALFORMED), else
    None), or None to keep it. Bad input first, then PAPER.md §1's rules in order. The authors skip a row for no
    problem, no generations, labels of another length or labels that are not booleans, and for nothing else: an
    empty generation is judged by its labels like any other (PAPER.md §1), and a null one is an empty one."""
    if not isinstance(row, dict):
        return "bad_json", f"is {JSON_TYPES.get(type(row), 'not an object')}, not an object"
    for field in REQUIRED + (("problem_is_valid",) if validity_filter else ()):
        if row.get(field) is None:
            return "missing_field", f"has {field!r} = null" if field in row else f"lacks the field {field!r}"
    types = [("problem", str, "a string"), ("source", str, "a string"), ("generations", list, "a list"),
             ("correctness", dict, "an object")] + ([("problem_is_valid", str, "a string")] if validity_filter else [])
    for field, kind, words in types:
        if not isinstance(row[field], kind):
            return "mistyped_field", f"has {field!r} = {json.dumps(row[field], default=str)[:40]}, not {words}"
    if not all(g is None or isinstance(g, str) for g in row["generations"]):
        return "mistyped_field", "has an item of 'generations' that is not a string or null"
    for column in ("llama_verification", label):
        labels, name = row["correctness"].get(column), f"correctness.{column}"
        if labels is None:
            return "missing_field", f"lacks the field {name!r} (or it is null)"
        if not isinstance(labels, list) or not all(v is None or isinstance(v, bool) for v in labels):
            return "mistyped_field", f"has {name!r} = {json.dumps(labels, default=str)[:40]}, not a list of " \
                                     "true, false or null"
        if len(labels) != len(row["generations"]):
            return "label_length_mismatch", f"has {len(labels)} labels in {name!r} for {len(row['generations'])} " \
                                            "generations"
    if not row["problem"].strip():
        return "empty_problem", None
    if not row["generations"]:
        return "no_generations", None
    if row["source"] == "cn_k12":
        return "cn_k12", None
    if validity_filter and row["problem_is_valid"].strip().lower() != "yes":
        return "invalid_problem", None
    return None


def first_correct_and_incorrect(row, label):
    """Indices of the first correct and first incorrect generation (None when there is none).
    Correct = Llama judge AND Math-Verify both True; a null label counts as False (PAPER.md §1)."""
    judge, verify = row["correctness"]["llama_verification"], row["correctness"][label]
    correct = [j is True and v is True for j, v in zip(judge, verify)]
    return (correct.index(True) if True in correct else None,
            correct.index(False) if False in correct else None)


def prepare(args):
    from common import load_tokenizer
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        die(f"--out {args.out!r} is a file; expected a folder (it is created if missing)")
    check_model_path(args.tokenizer, "--tokenizer", TOKENIZER_FILES)
    label = LABELS[args.label]
    validity_filter = not args.no_validity_filter
    # Fatal: a file that is not a JSON-lines corpus (its first row is not a JSON object), no rows, or no row with the
    # schema's fields. Anything wrong with a single row after that is skipped and counted by check_row.
    corpus, columns, where = open_corpus(args.input, args.split)
    if len(corpus) == 0:
        die(f"--input {args.input!r} has no rows")
    required = REQUIRED + (("problem_is_valid",) if validity_filter else ())
    missing = [c for c in required if c not in columns]
    if missing:
        die(f"--input {args.input!r} is not in the OpenR1-Math-Raw schema: {where} {missing} (found {sorted(columns)})")
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(corpus, "select_columns"):  # Arrow: skip decoding the columns no rule reads
        corpus = corpus.select_columns([c for c in required + ("answer",) if c in columns])
    tokenizer = load_tokenizer(args.tokenizer)
    check_chat_template(tokenizer, append_eos=args.length_count == "trained")
    chars = max_token_chars(tokenizer)

    # Authors' code shuffles with seed 42 before selecting; this is the order datasets.shuffle(seed) gives.
    order = np.random.default_rng(args.seed).permutation(len(corpus)) if args.seed >= 0 else range(len(corpus))
    dropped = {}  # reason -> rows (for D_SFT) ; pref_dropped: reason -> triplets (for D_Pref)
    pref_dropped = {"no_incorrect": 0, "prompt_too_long": 0, "response_too_long": 0, "prompt_not_prefix": 0}
    n_sft = n_pref = 0
    pending = []  # candidate triplets, tokenised in blocks
    sft_tmp, pref_tmp = out / "sft.jsonl.tmp", out / "pref.jsonl.tmp"
    first_malformed = None  # (row index, what is wrong): the malformed row that comes first in the file
    t0 = time.time()

    def flush_pairs(f):
        nonlocal n_pref
        # A text of more than limit x L characters is more than limit tokens by any count (max_token_chars): such a
        # pair is dropped without tokenising it, as one huge trace would be tokenised whole for nothing. Only then is
        # the prompt/response split checked, so a pair both too long and split badly counts as too long
        fitting = []
        for r in pending:
            if len(r["problem"]) > args.max_prompt_tokens * chars:
                pref_dropped["prompt_too_long"] += 1
            elif max(len(r["chosen"]), len(r["rejected"])) > args.max_response_tokens * chars:
                pref_dropped["response_too_long"] += 1
            else:
                fitting.append(r)
        pending[:] = fitting
        problems = [r["problem"] for r in pending]
        chosen = encode_chats(tokenizer, problems, [r["chosen"] for r in pending])
        rejected = encode_chats(tokenizer, problems, [r["rejected"] for r in pending])
        if args.length_count == "authors":  # PAPER.md §1: the count the 53,175 triplets come from
            prompt_lens = authors_lengths(tokenizer, "user", problems)
            chosen_lens = authors_lengths(tokenizer, "assistant", [r["chosen"] for r in pending])
            rejected_lens = authors_lengths(tokenizer, "assistant", [r["rejected"] for r in pending])
        else:  # the tokens sft.py and redi.py train on: the prompt with its assistant header, |y| with the EOS
            prompt_lens = [c[1] if c else 0 for c in chosen]
            chosen_lens = [len(c[0]) - c[1] if c else 0 for c in chosen]
            rejected_lens = [len(j[0]) - j[1] if j else 0 for j in rejected]
        for r, c, j, n_prompt, n_chosen, n_rejected in zip(pending, chosen, rejected, prompt_lens, chosen_lens,
                                                           rejected_lens):
            if c is None or j is None:
                pref_dropped["prompt_not_prefix"] += 1
            elif n_prompt > args.max_prompt_tokens:
                pref_dropped["prompt_too_long"] += 1
            elif max(n_chosen, n_rejected) > args.max_response_tokens:
                pref_dropped["response_too_long"] += 1
            else:
                f.write(json.dumps(r) + "\n")
                n_pref += 1
        pending.clear()

    def where(i):  # a row of --input, as its user finds it
        return f"{args.input}, line {corpus.line_numbers[i]}" if isinstance(corpus, JsonlRows) else \
            f"{args.input}, row {i + 1}"

    # Written under .tmp names, renamed only when prepare succeeds: a failed or interrupted run leaves no output, so
    # a rerun (run.sh's "already prepared" test) never takes it for a finished one
    try:
        with sft_tmp.open("w") as f_sft, pref_tmp.open("w") as f_pref:
            for n, i in enumerate(order, 1):
                row, wrong = corpus.read(int(i)) if isinstance(corpus, JsonlRows) else (corpus[int(i)], None)
                skip = ("bad_json", wrong) if wrong else check_row(row, label, validity_filter)
                if skip is None:
                    good, bad = first_correct_and_incorrect(row, label)
                    skip = ("no_correct", None) if good is None else None
                if skip:
                    reason, what = skip
                    dropped[reason] = dropped.get(reason, 0) + 1
                    if what and (first_malformed is None or i < first_malformed[0]):
                        first_malformed = (int(i), what)
                else:
                    generations = [g or "" for g in row["generations"]]  # a null generation is an empty one
                    meta = {"id": int(i), "source": row["source"], "answer": str(row.get("answer") or "")}
                    f_sft.write(json.dumps({"problem": row["problem"], "response": generations[good], **meta}) + "\n")
                    n_sft += 1
                    if bad is None:
                        pref_dropped["no_incorrect"] += 1
                    else:
                        pending.append({"problem": row["problem"], "chosen": generations[good],
                                        "rejected": generations[bad], **meta})
                        if len(pending) == 1024:
                            flush_pairs(f_pref)
                if n % 20000 == 0 or n == len(corpus):
                    print(f"[prepare] {n:,}/{len(corpus):,} rows, {n / (time.time() - t0):,.0f} rows/s, "
                          f"kept {n_sft:,} SFT / {n_pref + len(pending):,} pair candidates", flush=True)
            flush_pairs(f_pref)

        print(f"rows read            {len(corpus):>10,}")
        for reason, count in sorted(dropped.items()):
            print(f"  dropped {reason:<20} {count:>10,}")
        print(f"D_SFT kept           {n_sft:>10,}" + (f"  -> {out / 'sft.jsonl'}" if n_sft else ""))
        for reason, count in pref_dropped.items():
            print(f"  not a pair: {reason:<17} {count:>10,}")
        print(f"D_Pref kept          {n_pref:>10,}" + (f"  -> {out / 'pref.jsonl'}" if n_sft else "") +
              f"  (lengths counted as {args.length_count!r})")
        malformed = sum(dropped.get(reason, 0) for reason in MALFORMED)
        first = f"{where(first_malformed[0])} {first_malformed[1]}" if first_malformed else None
        if malformed:
            print(f"note: {malformed:,} rows skipped as malformed; the first: {first}")
        if n_sft == 0 and malformed == len(corpus):
            die(f"every row of --input {args.input!r} is malformed, so nothing was kept; the first: {first}")
        if n_sft == 0:
            die("no problem had a correct generation: nothing kept (see the reasons above)")
        sft_tmp.replace(out / "sft.jsonl")
        pref_tmp.replace(out / "pref.jsonl")
    finally:
        sft_tmp.unlink(missing_ok=True)
        pref_tmp.unlink(missing_ok=True)
    stats = {"input": args.input, "rows_read": len(corpus), "rows_dropped": dropped, "sft_kept": n_sft,
             "pref_dropped": pref_dropped, "pref_kept": n_pref, "settings": vars(args)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if n_pref == 0:
        print("warning: no preference triplets kept")


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="raw teacher traces -> sft.jsonl, pref.jsonl, stats.json")
    p.add_argument("--input", default="open-r1/OpenR1-Math-Raw",
                   help="Hub dataset id, or a local .jsonl/.parquet. Stops if the first row is not a JSON object or "
                        "no row has the schema's fields; a later bad row (not UTF-8, not JSON, a field missing or "
                        "mistyped) is skipped and counted by reason in stats.json")
    p.add_argument("--split", default="train", help="split of a Hub dataset")
    p.add_argument("--tokenizer", default="Qwen/Qwen2.5-Math-1.5B", help="base model's tokenizer (Hub id or folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", choices=sorted(LABELS), default="reparsed",
                   help="Math-Verify column that must agree with the Llama judge: 'reparsed' = "
                        "math_verify_reparsed_answer (authors' code, default), 'answer' = math_verify_answer")
    p.add_argument("--no-validity-filter", action="store_true",
                   help="keep rows whose problem_is_valid is not 'yes' (the paper mentions no such filter; "
                        "the authors' code applies it)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= -1, "an integer >= -1"), default=42,
                   help="shuffle seed, as the authors' code (-1: keep file order)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=800,
                   help="D_Pref: drop longer prompts (PAPER.md §1)")
    p.add_argument("--max-response-tokens", type=positive_int, default=19000,
                   help="D_Pref: drop pairs with a longer chosen or rejected response (PAPER.md §1)")
    p.add_argument("--length-count", choices=["authors", "trained"], default="authors",
                   help="how the two limits count tokens: 'authors' (default) as the authors' script, the count behind "
                        "the paper's 53,175 (PAPER.md §1): [user] and [assistant] each templated alone, + 1; "
                        "'trained' as sft.py/redi.py see them (prompt with its assistant header; response with "
                        "its closing tokens and EOS), so that redi.py's truncation never cuts a kept pair")
    args = parser.parse_args()
    prepare(args)


if __name__ == "__main__":
    main()
