"""The offline toy: a corpus in the OpenR1-Math-Raw schema written by a programmed teacher, held-out problems, and
a tiny random student with its tokenizer, so that the whole pipeline (`bash run.sh demo`) runs on a CPU, offline.

    python demo.py --out demo/      # demo/raw.jsonl, demo/test.jsonl, demo/model
    python data.py prepare --input demo/raw.jsonl --tokenizer demo/model --out demo/data

The task is addition written out column by column (run.sh demo: 3-digit addends). The teacher slips as a model
doing it would (SLIPS) and is sampled until it is right, as in the paper; each trace is labelled by the evaluator's
own answer extraction.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import die
from data import CHATML_TEMPLATE, SYSTEM_PROMPT
from eval import extract_answer  # the evaluator's own rule labels the teacher's traces


def demo_tokenizer(texts=(), vocab_size=512):
    """A byte-level BPE with Qwen's three special tokens and a ChatML template like Qwen2.5-Math's.
    Without texts: one token per byte. With texts (the demo's prompts and traces): merges learnt from them.
    The text is split into words as Qwen2's tokenizer splits it (digits are single tokens), because that is
    how the saved folder is read back: AutoTokenizer gives a Qwen2 model folder a Qwen2Tokenizer, which
    applies this split whatever was saved, so merges learnt across its boundaries would never apply."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size if texts else 0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(["<|im_end|>", "<|endoftext|>", "<|im_start|>"])  # their ids: after the learnt vocabulary
    # eos is <|endoftext|>, as in Qwen2.5-Math's base tokenizer: training appends it after the chat template's
    # closing <|im_end|>\n. eval.py stops at either (eval.stop_token_ids), so the student still stops at <|im_end|>.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                                   additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def demo_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=0):
    """A randomly initialised Qwen2-architecture student with tied embeddings, like Qwen2.5-1.5B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


# The toy teacher's mistakes, per column (or per trace for the last one): each is a slip a model
# doing column addition also makes, and each propagates to the final answer as a reasoning slip does.
SLIPS = {"misread": 0.03,  # a digit of the problem is read as another digit
         "forget_carry": 0.08,  # a carry is not added to the next column
         "misadd": 0.02,  # a column's sum is off by one
         "miscopy": 0.02}  # the final answer is copied with two neighbouring digits swapped


def teacher_trace(a, b, rng, slips=SLIPS):
    """Column addition written out step by step, right to left, e.g. for 958 + 67:
        <think>
        958+67
        8+7=15 c1
        5+6+1=12 c1
        9+0+1=10 c1
        =1025
        </think>
        \\boxed{1025}
    Returns (trace, the answer it ends with)."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, digits, carry = [f"<think>\n{a}+{b}"], [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        if rng.random() < slips["misread"]:
            wrong = int(rng.integers(9))
            x, y = (wrong + (wrong >= x), y) if rng.random() < 0.5 else (x, wrong + (wrong >= y))
        total = x + y + carry
        if rng.random() < slips["misadd"]:
            total = max(0, total + (1 if rng.random() < 0.5 else -1))
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}" + (" c1" if total >= 10 else ""))
        digits.append(total % 10)
        carry = total // 10
        if carry and rng.random() < slips["forget_carry"]:
            carry = 0
    if carry:
        digits.append(carry)
    answer = "".join(map(str, digits[::-1]))
    if len(answer) > 1 and rng.random() < slips["miscopy"]:
        k = int(rng.integers(len(answer) - 1))
        answer = answer[:k] + answer[k + 1] + answer[k] + answer[k + 2:]
    lines.append(f"={answer}\n</think>\n\\boxed{{{answer}}}")
    return "\n".join(lines), int(answer)


def demo(args):
    """Writes DIR/raw.jsonl (the OpenR1-Math-Raw schema), DIR/test.jsonl (held-out problems) and DIR/model
    (a random student and its tokenizer, whose merges are learnt from the corpus)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        die(f"--out {str(out)!r} is a file; expected a folder (it is created if missing)")
    if args.digits < 1 or args.problems < 1 or args.test_problems < 1 or args.max_tries < 1:
        die("--digits, --problems, --test-problems and --max-tries must be at least 1")
    if args.problems + args.test_problems > (9 * 10 ** (args.digits - 1)) ** 2:  # distinct (a, b) of that many digits
        die(f"{args.digits}-digit addends make fewer than {args.problems + args.test_problems:,} distinct problems")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    pairs = set()
    while len(pairs) < args.problems + args.test_problems:
        pairs.add(tuple(int(x) for x in rng.integers(10 ** (args.digits - 1), 10 ** args.digits, 2)))
    pairs = sorted(pairs, key=lambda _: rng.random())
    rows = []
    for a, b in pairs[:args.problems]:
        generations, labels = [], []
        while len(generations) < args.max_tries and not any(labels):  # sampled until right, as in the paper
            trace, _ = teacher_trace(a, b, rng)
            generations.append(trace)
            labels.append(extract_answer(trace)[0] == str(a + b))
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b), "source": "demo", "problem_is_valid": "Yes",
                     "generations": generations, "correctness": {"llama_verification": labels,
                                                                 "math_verify_answer": labels,
                                                                 "math_verify_reparsed_answer": labels}})
    (out / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "test.jsonl").write_text("".join(json.dumps({"id": k, "problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                                            for k, (a, b) in enumerate(pairs[args.problems:])))
    texts = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"] + [r["problem"] for r in rows] + \
        [g for r in rows for g in r["generations"]]
    tokenizer = demo_tokenizer(texts)
    demo_model(tokenizer, args.hidden_size, args.layers, seed=args.seed).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    n_traces = sum(len(r["generations"]) for r in rows)
    n_right = sum(sum(r["correctness"]["llama_verification"]) for r in rows)
    print(f"wrote {out / 'raw.jsonl'} ({args.problems:,} problems, {n_traces:,} teacher traces, {n_right / n_traces:.0%} "
          f"right), {out / 'test.jsonl'} ({args.test_problems:,} held out), {out / 'model'} ({len(tokenizer)} tokens)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--problems", type=int, default=2000, help="training problems in raw.jsonl")
    parser.add_argument("--test-problems", type=int, default=400, help="held-out problems in test.jsonl")
    parser.add_argument("--digits", type=int, default=3, help="digits per addend")
    parser.add_argument("--max-tries", type=int, default=4,
                        help="teacher samples per problem, stopping at the first correct")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    demo(parser.parse_args())


if __name__ == "__main__":
    main()
