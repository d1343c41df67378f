"""On-policy distillation (GKD / DistiLLM-style): the student's own samples, scored by the teacher.

    python -m pytest tests/unit/test_onpolicy.py

``train.on_policy.fraction`` λ of the optimizer steps after ``start_step`` are on-policy (:func:`is_on_policy`:
spread evenly, the same steps on every rank, decided by the step number alone, so a resumed run takes the same
ones). On such a step each micro-batch of cached windows still comes from the stream (the data position moves as
on any step), but only ``prompt_tokens`` of its tokens are used (:func:`window_prompts`: the first ones, or in a
chat window the ones just before its first answer): the student samples ``max_new_tokens``
tokens after them (:func:`sample`, KV-cached, always exactly that many forwards: under ZeRO-3 each is a
collective every rank must join), the teacher runs once over prompt + sample for its distribution at T
(:func:`tasks.online.teacher_outputs`), and :func:`on_policy_batch` returns a batch whose labels are the sampled
tokens only (prompt positions and tokens after an EOS are ``-100``) and whose targets are the teacher's. The
objective on it is ``train.loss`` at ``train.temperature`` with α = 0: a CE on the student's own samples would
only reinforce them.

Sampling is seeded per (``train.seed``, step, rank, micro-batch): a resumed run draws what the first would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from raydistill.tasks.config import OnPolicyConfig, TrainConfig
from raydistill.tasks.data import Batch
from raydistill.tasks.generate import nucleus
from raydistill.tasks.online import teacher_outputs


def is_on_policy(step: int, opc: OnPolicyConfig) -> bool:
    """Whether optimizer step ``step`` (1-based) is on-policy: after ``start_step``, when ⌊(step − start)·λ⌋ grows."""
    k = step - opc.start_step
    return k >= 1 and math.floor(k * opc.fraction + 1e-9) > math.floor((k - 1) * opc.fraction + 1e-9)


def generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The sampler of one micro-batch, seeded by where it is in training (not by how the run got there)."""
    digest = hashlib.sha256(f"onpolicy:{seed}:{step}:{rank}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside an engine (DeepSpeed's ``.module``, :class:`AdamWEngine`'s) and a
    :class:`tasks.online.StudentWithHeads` (``.student``); a plain model as is."""
    model = getattr(model, "module", model)
    return getattr(model, "student", model)


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, *, temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each row of ``prompts`` by exactly ``new_tokens`` tokens (no early stop).

    Args:
        model: a causal LM (KV cache through ``past_key_values``); put in eval mode for the call.
        prompts (torch.Tensor): ``(B, P)`` token ids, no padding.
        temperature: 0 is greedy; else draws from ``softmax(logits / T)`` (its top-p nucleus) with ``generator``.
    Returns:
        ``(B, new_tokens)`` Long on ``prompts``' device.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=prompts, use_cache=True)
        chosen = []
        for i in range(new_tokens):
            logits = out.logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:  # the generator lives on the CPU: draw there (B rows of V probabilities per token)
                probs = nucleus(torch.softmax(logits / temperature, dim=-1), top_p).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(prompts.device)
            chosen.append(nxt)
            if i + 1 < new_tokens:
                out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
        return torch.stack(chosen, dim=1)
    finally:
        model.train(was_training)


def generation_prompts(shards, n: int, prompt_tokens: int) -> list[torch.Tensor]:
    """Up to ``n`` prompts (1-D token ids) from held-out ``shards`` (read in order) for
    :func:`tasks.evaluate.generation_scores`: in a chat shard (a loss mask), each window's text up to the first
    assistant answer that starts inside it (the template's assistant header included: row ``j`` predicts the
    answer's first token ``j + 1``); a window holding no answer start gives none. In a text shard, each window's
    first ``prompt_tokens`` tokens."""
    out: list[torch.Tensor] = []
    for shard in shards:
        tokens, mask = torch.as_tensor(shard.tokens).long(), getattr(shard, "mask", None)
        for w in range(tokens.shape[0]):
            if len(out) >= n:
                return out
            if mask is None:
                out.append(tokens[w, :prompt_tokens])
                continue
            m = torch.as_tensor(mask[w]).bool()
            starts = torch.nonzero(m[1:] & ~m[:-1])[:, 0] + 1  # rows where an answer begins (not the window's 0)
            if len(starts):
                out.append(tokens[w, : int(starts[0]) + 1])
        if len(out) >= n:
            break
    if not out:
        raise ValueError("no held-out prompts: the held-out windows hold no assistant answer start "
                         "(corpus.heldout_fraction, corpus.seq_len)")
    return out


def answer_mask(answers: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """``(B, N)`` bool: True on each answer's tokens up to and including its first EOS (the stop decision is part
    of the answer), False after it."""
    is_eos = torch.zeros_like(answers, dtype=torch.bool)
    for e in eos:
        is_eos |= answers == e
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return before == 0


@dataclass
class OnPolicy:
    """What an on-policy step needs besides the student: the frozen teacher, the settings, who samples."""

    teacher: torch.nn.Module
    """The teacher, eval mode, ``requires_grad`` off (the online teacher's model when there is one)."""
    opc: OnPolicyConfig
    """``train.on_policy``."""
    eos: set[int]
    """Ids that end an answer (their label stays, what follows carries no loss)."""
    seed: int = 0
    """``train.seed``."""
    rank: int = 0
    """This worker's rank (its own draws)."""

    def loss_config(self, tc: TrainConfig) -> TrainConfig:
        """The objective of on-policy batches: ``tc`` without CE (α = 0)."""
        return dataclasses.replace(tc, alpha=0.0)


def window_prompts(input_ids: torch.Tensor, labels: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, P)`` prompts of an on-policy micro-batch: a text window's first ``P`` tokens; a chat window's (its
    labels ``-100`` outside the answers) ``P`` tokens that end where its first answer begins whose start leaves
    room for them (the tail of the conversation so far, the template's assistant header last), so the student
    samples an answer, not a continuation of the system prompt; its first ``P`` tokens when no answer starts
    that late. One shape for every row and rank (ZeRO-3's collective forwards)."""
    prompts = input_ids[:, :P].clone()
    answer = labels != -100
    if bool(answer.all()):
        return prompts
    starts = answer[:, 1:] & ~answer[:, :-1]  # [w, j - 1]: label row j (input j, predicting j + 1) starts an answer
    for w in range(input_ids.shape[0]):
        js = torch.nonzero(starts[w])[:, 0] + 1
        js = js[js + 1 >= P]
        if len(js):
            j = int(js[0])
            prompts[w] = input_ids[w, j + 1 - P: j + 1]
    return prompts


def on_policy_batch(student: torch.nn.Module, batch: Batch, op: OnPolicy, tc: TrainConfig, step: int,
                    micro: int) -> Batch:
    """The on-policy version of a cached micro-batch (module doc): prompts of ``prompt_tokens`` tokens
    (:func:`window_prompts`: a chat window's end where its answer begins), the student's sample after them,
    labels only on the sample, targets the teacher's distribution at T."""
    P, N = op.opc.prompt_tokens, op.opc.max_new_tokens
    if batch.input_ids.shape[1] <= P:
        raise ValueError(f"train.on_policy.prompt_tokens={P} leaves nothing of windows of "
                         f"{batch.input_ids.shape[1]} tokens; use fewer prompt tokens or a longer corpus.seq_len")
    prompts = window_prompts(batch.input_ids, batch.labels, P)
    answers = sample(causal_lm(student), prompts, N, temperature=op.opc.temperature, top_p=op.opc.top_p,
                     generator=generator(op.seed, step, op.rank, micro))
    x = torch.cat([prompts, answers], dim=1)
    labels = x[:, 1:].clone()
    labels[:, :P - 1] = -100  # the prompt's own tokens: not the student's
    labels[:, P - 1:][~answer_mask(answers, op.eos)] = -100
    vocab = causal_lm(student).config.vocab_size  # (under ZeRO-3 a weight's own shape is its empty partition)
    targets, _ = teacher_outputs(op.teacher, x[:, :-1], temperature=tc.temperature, vocab_size=vocab)
    return Batch(x[:, :-1], labels, targets)
