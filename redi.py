"""Stage 2: REDI on (problem, correct trace, incorrect trace) triplets, D_Pref (PAPER.md §3), with DPO and
SimPO beside it as baselines. Initialised from the SFT checkpoint.

    python redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi            # alpha 0.8, LR 1e-6
    torchrun --nproc_per_node 8 redi.py --model runs/sft/final --data data/pref.jsonl --out runs/redi
    ... --alpha 1.0                    # symmetric REDI (Eq. 4)
    ... --loss dpo                     # DPO (Eq. 2): beta 0.001, LR 2e-7, the paper's best
    ... --loss simpo                   # SimPO (Eq. 3): beta 2, gamma 1, LR 5e-7, the paper's best
    ... --loss redi_suffix --lr 1e-6   # this project's: REDI's rejected term on y_l's divergent suffix only
    ... --loss redi+0.1*dpo            # a weighted sum of entries, each term logged (loss_redi, loss_dpo)
Resume after a crash with the same command plus --resume.

Notation: lp(y) = sum over the response tokens of log pi(y_t | x, y_<t); |y| = response length.

Adding an objective: one loss function and one entry in OBJECTIVES. Its flags (with its defaults and its source in
--help), LR default, reference log-probs, config.json record and logging follow from the entry. A loss sees Pairs,
per-pair sums of (B,). One that needs the tokens themselves (a term on some of them, a weight per token) declares
per_token=True and is called loss(Pairs, Tokens, **hyperparameters): Tokens holds each response token's log-prob,
its pair, its trace (y_w or y_l), its position in the response, and per pair the position where y_w and y_l
first differ (redi_suffix_loss uses them all). The log-probs are those Pairs' sums are made of, from the same
forward, so gradients flow from either use; the index tensors are built on the host when a micro-batch is
packed, so nothing waits on the device. The reference enters through Pairs only (lp_ref per trace, computed once
per pair): per-token reference log-probs would mean caching one number per response token of every pair (D_Pref:
53,175 pairs of traces up to 19,000 tokens) or holding a second model in memory, so they are not provided.
"""
import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (StepTimer, accumulate, accumulation_steps, add_training_args, build_model, check_finite, cleanup,
                    clip_and_step, die, end_step, global_sum, init_dist, load_tokenizer, lr_at, nonnegative,
                    open_run_folder, peak_memory_gb, positive, positive_int, print0, sequence_sums, start_run,
                    to_host)
from data import (Packed, batch_for_step, check_chat_template, cut_texts, encode_chats, max_token_chars, micro_batches,
                  pack, read_jsonl)

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


class Tokens(NamedTuple):
    """What an objective declared per_token=True gets beside Pairs: each response token of the micro-batch's 2B
    traces, in packed order (pair 0's y_w, pair 0's y_l, pair 1's y_w, ...). Each (R,), except divergence (B,)."""
    logps: torch.Tensor       # log pi(y_t | x, y_<t): the terms of Pairs' sums, from the same forward
    pair: torch.Tensor        # which pair of the micro-batch: 0 .. B - 1
    rejected: torch.Tensor    # bool: a token of y_l (else of y_w)
    position: torch.Tensor    # t, its index within its response: 0 .. |y| - 1
    divergence: torch.Tensor  # (B,) per pair: d, the first t where y_w[t] != y_l[t] (first_difference)

    def sums(self, values):
        """Per-token values (R,) summed over each trace: (over y_w (B,), over y_l (B,))."""
        trace = 2 * self.pair + self.rejected  # (R,): 2k is pair k's y_w, 2k + 1 its y_l
        return values.new_zeros(2 * len(self.divergence)).index_add_(0, trace, values).view(-1, 2).unbind(1)


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


def redi_coefs_loss(p, chosen_coef, rejected_coef):
    """The authors' trainer's REDI (its `reinforce` loss): a coefficient on each term, in the order of operations of
    their code. Eq. 5 is chosen_coef 1 and rejected_coef alpha."""
    return -chosen_coef * (p.chosen_logps / p.chosen_lens) + rejected_coef * (p.rejected_logps / p.rejected_lens)


def redi_negw_loss(p, chosen_coef, rejected_coef, neg_weighting_gamma):
    """The authors' trainer's REDI with `use_neg_weighting`: each rejected term times exp(gamma * lp(y_l)/|y_l|). The
    weight is not detached, as in their code, so the gradient flows through it too: the term x * exp(gamma * x) of
    x = lp(y_l)/|y_l| is lowest at x = -1/gamma, so it pushes a rejected trace down to -1/gamma nats per token, and
    one already below that back up."""
    rejected = p.rejected_logps / p.rejected_lens
    weight = torch.exp(neg_weighting_gamma * rejected)
    return -chosen_coef * (p.chosen_logps / p.chosen_lens) + rejected_coef * rejected * weight


def redi_suffix_loss(p, t, alpha):
    """REDI with its rejected term on y_l's divergent suffix only: its tokens from d, the first position where y_l
    differs from y_w, on. The shared prefix y_l[:d] = y_w[:d] is not what made y_l wrong; Eq. 5 pushes it up in the
    chosen term and down in the rejected one. The suffix's log-prob is averaged over its |y_l| - d tokens, so the
    term is a per-token average as in Eq. 5 however long the shared prefix; an empty suffix (y_l a prefix of y_w)
    adds 0. The chosen term is Eq. 5's."""
    in_suffix = t.rejected & (t.position >= t.divergence[t.pair])  # (R,)
    _, suffix_logps = t.sums(t.logps.where(in_suffix, 0.0))  # (B,): lp(y_l[d:])
    suffix_lens = (p.rejected_lens - t.divergence).clamp(min=1)  # (B,): |y_l| - d; 1 for an empty suffix (sum 0)
    return -p.chosen_logps / p.chosen_lens + alpha * suffix_logps / suffix_lens


def normalised_margin(p):
    """Per-token log-prob of the chosen trace minus that of the rejected one."""
    return p.chosen_logps / p.chosen_lens - p.rejected_logps / p.rejected_lens


def reference_margin(p):
    """DPO's implicit reward margin (over beta): how much more the chosen trace gained than the rejected."""
    return (p.chosen_logps - p.ref_chosen_logps) - (p.rejected_logps - p.ref_rejected_logps)


@dataclass(frozen=True)
class Objective:
    loss: Callable          # (Pairs, **hparams) -> (B,) per-pair losses; with per_token, (Pairs, Tokens, **hparams)
    margin: Callable        # (Pairs) -> (B,): logged as "margin"; "reward_accuracy" = share of pairs above 0
    hparams: dict           # its hyperparameters, each a --flag, at their defaults
    lr: float = None        # the default peak LR; None (no tuned run of it is known): --lr is required
    source: str = ""        # where it comes from ("paper", "authors' code", "this project"), shown by --help
    needs_reference: bool = False  # lp_ref of the starting model, computed once before training
    per_token: bool = False        # the loss takes Tokens too


OBJECTIVES = {
    # PAPER.md §3, at the paper's settings
    "redi": Objective(redi_loss, normalised_margin, {"alpha": 0.8}, lr=1e-6,
                      source="paper"),  # the final Qwen-REDI-1.5B run
    "dpo": Objective(dpo_loss, reference_margin, {"beta": 0.001}, lr=2e-7, source="paper",
                     needs_reference=True),  # best of beta 1e-3/1e-2/1e-1
    "simpo": Objective(simpo_loss, normalised_margin, {"beta": 2.0, "gamma": 1.0}, lr=5e-7,
                       source="paper"),  # best; also (10, 5, 3e-7)
    # the authors' trainer's options (PAPER.md §3): their final recipe's coefficients 1.0 and 0.8 at LR 1e-6, which
    # is "redi" at alpha 0.8; the weighting of negatives, off in all their recipes, at their default gamma 1.0
    "redi_coefs": Objective(redi_coefs_loss, normalised_margin, {"chosen_coef": 1.0, "rejected_coef": 0.8}, lr=1e-6,
                            source="authors' code"),
    "redi_negw": Objective(redi_negw_loss, normalised_margin,
                           {"chosen_coef": 1.0, "rejected_coef": 0.8, "neg_weighting_gamma": 1.0},
                           source="authors' code"),
    # this project's
    "redi_suffix": Objective(redi_suffix_loss, normalised_margin, {"alpha": 0.8}, source="this project",
                             per_token=True),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="the SFT checkpoint to start from (folder or Hub id)")
parser.add_argument("--data", required=True, help="pref.jsonl from `data.py prepare` (problem, chosen, rejected)")
parser.add_argument("--loss", default="redi", metavar="NAME|W*NAME+...",
                    help="the objective (default: %(default)s): an entry of OBJECTIVES, or a weighted sum of entries "
                         "such as redi+0.1*dpo, whose terms' losses are logged (loss_redi, loss_dpo) and whose LR "
                         "default, margin and reward accuracy are the first term's; where two terms take one "
                         "hyperparameter, each value names its term (--beta dpo=0.01 simpo=5). Entries (source, "
                         "default LR): " + ", ".join(f"{k} ({o.source or 'added'}, {o.lr or 'none: --lr required'})"
                                                     for k, o in OBJECTIVES.items()))
for _name in dict.fromkeys(h for o in OBJECTIVES.values() for h in o.hparams):
    _defaults = ", ".join(f"{k} {o.hparams[_name]}" + (f" ({o.source})" if o.source else "")
                          for k, o in OBJECTIVES.items() if _name in o.hparams)
    parser.add_argument("--" + _name.replace("_", "-"), dest=_name, nargs="+", default=None, metavar="X",
                        help=f"default: {_defaults}")
parser.add_argument("--max-prompt-length", type=positive_int, default=800,
                    help="longer prompts keep their last tokens, as the authors' keep_end truncation (PAPER.md §3)")
parser.add_argument("--max-response-length", type=positive_int, default=19000,
                    help="longer responses keep their first tokens (PAPER.md §3)")
parser.add_argument("--ref-cache", default=None,
                    help="reference log-probs file (default: beside --data, named by a hash of model and data)")
parser.add_argument("--collapse-drop", type=nonnegative, default=0.5,
                    help="collapse warning: chosen and rejected LogPS both this many nats/token below their start ...")
parser.add_argument("--collapse-surge", type=positive, default=3.0,
                    help="... while update_norm / lr exceeds this multiple of its median so far")
# PAPER.md §3: one epoch over D_Pref, 32 pairs per step (1,661 steps), a checkpoint every 200 steps (the authors'
# recipe); the LR follows --loss
add_training_args(parser, lr=None, epochs=1, batch_size=32, save_every=200)


class Term(NamedTuple):
    name: str             # its entry in OBJECTIVES
    weight: float
    objective: Objective
    hparams: dict         # its hyperparameters' values: the flags', else the entry's defaults


class WeightedSum(NamedTuple):
    """The --loss being run: sum of weight x entry over its terms (a single entry is one term of weight 1)."""
    terms: tuple

    @property
    def needs_reference(self):  # computed once if any term needs it
        return any(t.objective.needs_reference for t in self.terms)

    @property
    def per_token(self):
        return any(t.objective.per_token for t in self.terms)

    def losses(self, p, tokens=None):
        """Each term's per-pair losses (B,), by entry name, unweighted."""
        return {t.name: t.objective.loss(p, tokens, **t.hparams) if t.objective.per_token else
                t.objective.loss(p, **t.hparams) for t in self.terms}

    def setting(self):
        """The hyperparameters in words: "beta 2.0, gamma 1.0", or per term "redi: alpha 0.8; dpo: beta 0.001"."""
        each = [(t.name, ", ".join(f"{h} {v}" for h, v in t.hparams.items())) for t in self.terms]
        return each[0][1] if len(each) == 1 else "; ".join(f"{name}: {words}" for name, words in each)


def parse_loss(text):
    """--loss -> [(entry, weight)]: "redi" is [("redi", 1.0)]; "redi+0.1*dpo" is [("redi", 1.0), ("dpo", 0.1)]."""
    terms = []
    for part in text.split("+"):
        weight, star, name = part.strip().rpartition("*")
        if name not in OBJECTIVES:
            parser.error(f"argument --loss: invalid choice: {name!r} (choose from {', '.join(OBJECTIVES)}, or a "
                         "weighted sum of them such as redi+0.1*dpo)")
        try:
            weight = float(weight) if star else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            parser.error(f"--loss {text}: the weight of {name} is not a number (a term is NAME or WEIGHT*NAME)")
        if name in (n for n, _ in terms):
            parser.error(f"--loss {text} names {name} twice; give it one term")
        terms.append((name, weight))
    return terms


def resolve_objective(args):
    """--loss as a WeightedSum, each term at the hyperparameters its flags give, else at its entry's defaults.
    A hyperparameter flag that no term takes is an error, not silently ignored; one that several terms take must
    name the term of each value (--beta dpo=0.01 simpo=5), so that no flag means two things. Sets args.lr (the
    first term's default unless --lr), each hyperparameter flag to its value (to {entry: value} when several terms
    take it), and args.objective = {entry: {hyperparameter: value}}, which config.json records."""
    parts = parse_loss(args.loss)
    names = [name for name, _ in parts]
    given = {name: {} for name in names}  # entry -> {hyperparameter: value set by a flag}
    for h in dict.fromkeys(h for o in OBJECTIVES.values() for h in o.hparams):
        flag, takers = "--" + h.replace("_", "-"), [name for name in names if h in OBJECTIVES[name].hparams]
        words = getattr(args, h, None)  # None, or the flag's words: ["0.01"], ["dpo=0.01", "simpo=5"]
        if words is not None and not takers:
            flags = dict.fromkeys("--" + k.replace("_", "-") for name in names for k in OBJECTIVES[name].hparams)
            parser.error(f"{flag} does not apply to --loss {args.loss} (its hyperparameters: "
                         f"{', '.join(flags) or 'none'})")
        for word in words or []:
            term, _, number = word.rpartition("=")
            if not term and len(takers) > 1:
                parser.error(f"{flag} is a hyperparameter of {' and '.join(takers)} in --loss {args.loss}: give "
                             f"each value its term, e.g. {flag} {takers[0]}={number}")
            term = term or takers[0]
            if term not in takers or h in given[term]:
                parser.error(f"{flag} {word}: expected one value for each of {', '.join(takers)} (as {flag} X, or "
                             f"{flag} TERM=X with TERM a term of --loss {args.loss} that takes it)")
            try:
                given[term][h] = float(number)
            except ValueError:
                parser.error(f"{flag} {word}: {number!r} is not a number")
            if not math.isfinite(given[term][h]) or (h == "alpha" and not 0 <= given[term][h] <= 1):
                parser.error(f"{flag} {word}: expected " + ("a number in [0, 1] (PAPER.md §3)" if h == "alpha" else
                                                           "a finite number"))
    terms = tuple(Term(name, weight, OBJECTIVES[name], {**OBJECTIVES[name].hparams, **given[name]})
                  for name, weight in parts)
    for h in dict.fromkeys(h for t in terms for h in t.hparams):
        values = {t.name: t.hparams[h] for t in terms if h in t.hparams}
        setattr(args, h, next(iter(values.values())) if len(values) == 1 else values)
    args.objective = {t.name: dict(t.hparams) for t in terms}
    if args.lr is None:
        if terms[0].objective.lr is None:
            parser.error(f"--lr is required with --loss {args.loss}: {terms[0].name} has no default learning rate, "
                         "as no tuned run of it is known")
        args.lr = terms[0].objective.lr
    return WeightedSum(terms)


# -----------------------------------------------------------------------------
# data: one pair = (prompt ids, chosen response ids, rejected response ids)


def load_pairs(path, tokenizer, max_prompt, max_response, append_eos=True):
    """An empty response is trained on, as the authors' trainers do (PAPER.md §1): |y| is then the
    template's closing tokens and the EOS."""
    rows = read_jsonl(path, ["problem", "chosen", "rejected"])
    pairs, skipped, cut_prompt, cut_response = [], {"chosen == rejected": 0, "prompt/response split broken": 0}, 0, 0
    chars = max_token_chars(tokenizer)  # responses far over the limit are cut before tokenising (data.cut_texts)
    for i in range(0, len(rows), 1024):
        block = rows[i:i + 1024]
        problems = [r["problem"] for r in block]
        chosen = encode_chats(tokenizer, problems, cut_texts([r["chosen"] for r in block], max_response, chars),
                              append_eos=append_eos)
        rejected = encode_chats(tokenizer, problems, cut_texts([r["rejected"] for r in block], max_response, chars),
                                append_eos=append_eos)
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


def first_difference(y_w, y_l):
    """The first response position where the two traces' tokens differ; the shorter one's length when it is a
    prefix of the other."""
    n = min(len(y_w), len(y_l))
    return next((t for t in range(n) if y_w[t] != y_l[t]), n)


class PairBatch(NamedTuple):
    """B pairs packed for one forward, with what Tokens needs, built on the host."""
    packed: Packed            # 2B sequences: prompt + y_w, then prompt + y_l, pair by pair
    position: torch.Tensor    # (R,) each response token's index within its response
    divergence: torch.Tensor  # (B,) first_difference(y_w, y_l) of each pair

    def to(self, device):
        return PairBatch(self.packed.to(device), *(t.to(device, non_blocking=True) for t in self[1:]))


def pack_pairs(pairs):
    """B pairs -> a PairBatch. The divergence is found here, from the token ids, when a micro-batch is packed: a
    scan of the shared prefix, typically a few tokens."""
    packed = pack([seq for p, w, l in pairs for seq in ((p + w, len(p)), (p + l, len(p)))])
    starts = packed.lengths.cumsum(0) - packed.lengths  # (2B,): where each trace's tokens start among the R
    position = torch.arange(len(packed.seq_of)) - starts[packed.seq_of]  # (R,)
    return PairBatch(packed, position, torch.tensor([first_difference(w, l) for _, w, l in pairs]))


def pair_logps(model, batch, per_token=False):
    """One forward for the chosen and rejected traces of a packed micro-batch (a PairBatch) together. Returns
    Pairs; with per_token, (Pairs, Tokens), the tokens' log-probs being those the sums are made of."""
    logps = model(*batch.packed.model_inputs)  # (R,)
    lp = sequence_sums(logps, batch.packed).view(-1, 2)  # (B, 2): chosen, rejected
    lens = batch.packed.lengths.view(-1, 2).to(lp.dtype)  # (B, 2)
    pairs = Pairs(lp[:, 0], lp[:, 1], lens[:, 0], lens[:, 1])
    if not per_token:
        return pairs
    trace = batch.packed.seq_of  # (R,): 2k is pair k's y_w, 2k + 1 its y_l
    return pairs, Tokens(logps, trace // 2, trace % 2 == 1, batch.position, batch.divergence)


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
    """The cached reference log-probs, else computed and cached. A cache that cannot be read (cut short, damaged) or
    does not fit the pairs is recomputed, with a note."""
    path = ref_cache_path(args)
    if path.exists():
        try:
            ref = torch.load(path)
        except Exception as e:  # a damaged pickle or zip raises many kinds (EOFError, RuntimeError, UnpicklingError)
            ref, wrong = None, f"cannot be read ({e.__class__.__name__})"
        else:
            held = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            wrong = None if held == (len(pairs), 2) else f"holds {held}, not ({len(pairs)}, 2)"
        if wrong is None:
            print0(f"reference log-probs: loaded {path}")
            return ref
        print0(f"note: reference log-probs: {path} {wrong}; recomputing")
    ref = reference_logps(model, pairs, args, device)
    if dist.get_rank() == 0:
        torch.save(ref, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    print0(f"reference log-probs: computed with {args.model}, cached in {path}")
    return ref


# -----------------------------------------------------------------------------
# one optimiser step


def train_step(model, optimizer, batches, ref, lr, objective, args, device):
    """One optimiser step over this rank's micro-batches: (PairBatch on the device, the pairs' indices) each.
    objective: resolve_objective's WeightedSum. ref: (N, 2) reference log-probs on the device, or None. Returns the
    step's global statistics, by name, as 0-d tensors on the device; a sum of several terms adds each term's
    loss, unweighted (loss_NAME)."""
    terms = [f"loss_{t.name}" for t in objective.terms] if len(objective.terms) > 1 else []
    sums = dict.fromkeys(("loss", *terms, "chosen_logps_per_token", "rejected_logps_per_token", "margin",
                          "reward_accuracy", "tokens"), 0)  # this rank's sums over its pairs
    for batch, idx in accumulate(model, batches):
        if objective.per_token:
            p, tokens = pair_logps(model, batch, per_token=True)
        else:
            p, tokens = pair_logps(model, batch), None
        if objective.needs_reference:
            ref_w, ref_l = ref[idx].to(p.chosen_logps.dtype).unbind(-1)
            p = p._replace(ref_chosen_logps=ref_w, ref_rejected_logps=ref_l)
        losses = objective.losses(p, tokens)  # {entry: (B,)}
        # the mean over the global batch (all micro-batches, all ranks); right only because common.shard_model
        # has FSDP sum the gradients over ranks (not average them)
        loss = sum(t.weight * losses[t.name] for t in objective.terms).sum() / args.batch_size
        loss.backward()
        with torch.no_grad():
            margin = objective.terms[0].objective.margin(p)  # the first term's
            for name, value in (("loss", loss), ("chosen_logps_per_token", p.chosen_logps / p.chosen_lens),
                                ("rejected_logps_per_token", p.rejected_logps / p.rejected_lens),
                                ("margin", margin), ("reward_accuracy", (margin > 0).float())):
                sums[name] = sums[name] + value.sum()
            for name in terms:  # each term's mean over the global batch, as the loss's
                sums[name] = sums[name] + losses[name.removeprefix("loss_")].sum() / args.batch_size
            sums["tokens"] += batch.packed.input_ids.shape[1]
    totals = dict(zip(sums, global_sum(list(sums.values()), device)))  # one collective for all of them
    grad_norm, update_norm = clip_and_step(model, optimizer, lr, args.max_grad_norm, args.plain)
    per_pair = {k: v / args.batch_size for k, v in totals.items() if k not in ("loss", *terms, "tokens")}
    return {"loss": totals["loss"], **{k: totals[k] for k in terms}, "grad_norm": grad_norm,
            "update_norm": update_norm, **per_pair, "tokens": totals["tokens"]}


# -----------------------------------------------------------------------------


def main():
    args = parser.parse_args()
    objective = resolve_objective(args)
    rank, world, device = init_dist()
    accumulation = accumulation_steps(args, world)
    open_run_folder(args, parser)
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
    start_step, metrics = start_run(args, model, optimizer, total_steps)
    print0(f"{args.loss} ({objective.setting()}, lr {args.lr}) from {args.model}: "
           f"{n_params / 1e6:.1f}M parameters, {world} rank(s) on {device.type}; {len(pairs):,} pairs, "
           f"{total_steps} steps; batch {args.batch_size} pairs = {args.micro_batch_size} x {accumulation} x {world} ranks")

    # the run's logged steps (rank 0); a number that was not finite is read back as NaN (metrics.jsonl has null)
    history = [{k: math.nan if v is None else v for k, v in json.loads(line).items()}
               for line in metrics.path.read_text().splitlines()] if rank == 0 else []
    collapsed = any(r.get("collapse") for r in history)
    model.train()
    timer = StepTimer()
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, args.lr, args.warmup_frac)
        batches = [(pack_pairs([pairs[i] for i in idx]).to(device), idx)
                   for idx in micro_batches(batch_for_step(step, len(pairs), args.batch_size, args.seed),
                                            lengths, args.micro_batch_size, rank, world)]
        stats = to_host(train_step(model, optimizer, batches, ref, lr, objective, args, device), device)  # the one wait
        check_finite(stats, step + 1, args.out)  # before anything of this step is logged or saved

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
