"""Engine "slots", eval.py's fast generation engine, and the top-p sampler that both of eval.py's engines use.

eval.py runs it for --engine slots (the default on a GPU); --engine generate turns it off (transformers'
model.generate, eval.py's reference engine, which draws the same tokens):

    python eval.py --model runs/redi/final --out runs/redi/eval                             # slots on a GPU
    python eval.py --model runs/redi/final --slot-attention flex --out runs/redi/eval-flex  # FlexAttention decoding
    python eval.py --model runs/redi/final --engine generate --out runs/redi/eval-generate  # without this engine

What it buys (README, Generation speed: an H100, a 1.5B-sized model with random weights in bf16): 14.6x
model.generate's tokens/s for one prompt, 9.6x for 64 prompts decoded together. tests/test_generation.py checks it
token for token against engine generate.

Imports run one way: eval.py imports this module, and this module imports no other module of the project. So the
sampler lives here: the engine's decoding step holds its branch-free draws inside a CUDA graph, and eval.py's
engine generate imports Sampler, which draws the same token from the same logits and uniforms.
"""
import inspect
import math
import time
import warnings

import numpy as np
import torch

# -----------------------------------------------------------------------------
# the sampler (PAPER.md §4: temperature, then top-p, no top-k), with each sample's own seeded uniforms


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


# -----------------------------------------------------------------------------
# engine "slots": a fixed set of sequence slots, each refilled as soon as its sample stops; one decoding step,
# captured once per attention window as a CUDA graph
#
# Why this design (read against transformers 5.17 and 5.24). A decoding step of a 1.5B model reads ~3 GB of
# weights, under 1 ms on an H100/H200, yet model.generate took ~90 ms per step at batch 64: the step is ~1,000 small
# kernels launched from Python, plus HF's per-step machinery. Capturing the whole step in a CUDA graph (gpt-fast's
# approach) replays them with one launch. And a static batch runs until its longest sample stops, while reasoning
# traces run from ~1k to 30k tokens; so a slot whose sample stops takes the next prompt at once.
# - Not HF's static cache + torch.compile: its StaticCache writes every row at one shared position (one
#   cumulative_length), so rows cannot start at different times, and attention would span the whole 32k cache.
# - Not HF's continuous batching (model.generate_batch): with sdpa it captures no graphs by default, its fast decode
#   path needs flash-attn (not installed on the GPU machines here), it samples with one generator for the whole run
#   (no per-sample seeds), its options changed between 5.17 and 5.24, and measured with defaults it was no faster
#   than generate (852-859 tokens/s against 870 on an H200).
# - So a small engine of our own around the model's ordinary forward: a KV cache with one row per slot (SlotCache),
#   given to the model as its cache; a 4-D mask per step; an attention function registered with HF's
#   AttentionInterface for the duration of a run (slot_attention). The model code is HF's, unchanged.
# Sampling is the sampler above (draw_prefiltered, draw_sorted, draw_top_p: sample_top_p's draw) with each sample's
# own seeded uniforms, the ones Sampler draws: from the same logits, the same tokens as engine "generate". What is
# reproducible: a rerun of the same jobs with the same engine, slots and machine repeats every token, except with one
# slot on a GPU (on an H100 a one-row cumsum was not bit-for-bit repeatable from run to run; rows > 1 were). The logits
# themselves agree only to rounding across engines, batch mates and hardware (attention kernels, padding and windows
# differ; bf16 on GPUs), and a draw that lands within rounding of a boundary of its CDF flips, after which the sample
# goes its own way: never in the tests here (fp32, vocabularies up to 49k, trained or small); often for a random model
# with a 152k vocabulary, whose CDF steps are ~1/150,000 apart (tools/bench.py reports the share of samples that agree).

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
    it is captured once per attention window and replayed; on a CPU it runs eagerly. Reusable: tools/bench.py warms it
    up once and then times it.

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
        the same triple as eval.py's generate_batch. Jobs start in order, each in the first free slot."""
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

    def groups(self, jobs, size):
        """generate's results in groups of `size` samples, in the order they stop: yields (jobs, their results, seconds
        the group took to generate, share of its slot-steps that carried a sample). The seconds leave out what the
        caller does between groups (eval.py grades and writes them)."""
        group, t0, steps, busy = [], time.perf_counter(), self.steps, self.busy

        def finish_group():
            share = (self.busy - busy) / max(self.steps - steps, 1) / self.slots
            return [j for j, _ in group], [r for _, r in group], time.perf_counter() - t0, share

        for job, result in self.generate(jobs):
            group.append((job, result))
            if len(group) == size:
                yield finish_group()
                group, t0, steps, busy = [], time.perf_counter(), self.steps, self.busy
        if group:
            yield finish_group()

