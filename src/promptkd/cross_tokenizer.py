"""Cross-tokenizer distillation: a teacher and a student whose tokenizers differ.

    promptkd train --config configs/gkd.yaml --model.teacher TEACHER --model.student STUDENT

(`model.cross_tokenizer auto`, the default, takes this path when the tokenizers differ; docs/method.md,
section 11.) Both models read the same text:

1. **Teacher inputs.** The student's response tokens (dataset or sampled) are decoded to text and the
   teacher tokenizes that text itself; the prompt likewise. Special tokens are not text: each one maps
   to the teacher's token of the same string, else of the same role (eos, bos, unk, pad), else none.
2. **Alignment.** Each token's span ends where the decoded text grows by it (`char_ends`); a *group*
   is the shortest run of consecutive student tokens and of teacher tokens that cover the same
   characters (`align`). Identical tokenizers give one token per group.
3. **Group distributions.** A group's row is, for every vocabulary entry v, the probability that the
   group's tokens before its last one are the text's and the last is v (chain rule: the last
   position's distribution times the earlier tokens' probabilities; `group_log_probs`). The exact
   divergence renormalises the rows, which cancels that factor; ULD keeps it.
4. **Hybrid loss.** Columns of tokens whose strings both vocabularies hold (`shared_columns`) get the
   method's own divergence (renormalised over those columns); the other columns get ULD, the L1
   distance between the sorted probability vectors (`uld`), weighted by the shared fraction of the
   teacher's vocabulary (`hybrid`). A group counts as many tokens as it has student tokens, so the
   token mean runs over the student's response tokens, as on the exact path. Two outputs on the
   teacher's tokens (PromptKD's regulariser) compare every teacher position instead.

Sources: TRL's GOLD trainer (trl 1.16.0, trl/experimental/gold/) and Boizard et al. 2024 (ULD); every
default and deviation is cited in docs/method.md section 11.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptkd.data.batch import SequenceBatch
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.losses import Divergence, Outputs

logger = logging.getLogger(__name__)

ROLES = ("eos", "bos", "unk", "pad")  # special tokens mapped by role when no string matches


# ---------------------------------------------------------------------------------------------
# 1. Text offsets and alignment
# ---------------------------------------------------------------------------------------------


def char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token's text ends, in characters of ``tokenizer.decode(ids)``: len(decode(ids[:k + 1])).

    Decoding whole prefixes (not single tokens) keeps each decoder's context rules (SentencePiece's
    first-token space, byte-level BPE's bytes). A token that leaves a character incomplete (one byte
    of a multi-byte character; decoders write U+FFFD for it) ends where the previous token ended: the
    token that completes the character owns it.
    """
    ids = list(ids)
    texts = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], clean_up_tokenization_spaces=False)
    ends, end = [], 0
    for text in texts:
        end = max(end, len(text.rstrip("\ufffd")))
        ends.append(end)
    return ends


def align(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[range, range]]:
    """Groups (student positions, teacher positions) of consecutive tokens that cover the same text.

    A group closes where both tokenizations end a token at the same character: walk both lists,
    advancing the side whose token ends first (GOLD's walk, trl 1.16.0
    trl/experimental/gold/gold_trainer.py:530-553). A zero-width token joins the next group. When the
    decoded texts differ in length, the tokens after the last common boundary form one more group, or
    join the last one when only one side has any: no group has an empty side (none at all when a side
    has no tokens).
    """
    num_s, num_t = len(student_ends), len(teacher_ends)
    groups: list[tuple[range, range]] = []
    s = t = s0 = t0 = 0
    while s < num_s and t < num_t:
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            groups.append((range(s0, s), range(t0, t)))
            s0, t0 = s, t
    if s0 < num_s and t0 < num_t:  # both sides go on: one more group
        groups.append((range(s0, num_s), range(t0, num_t)))
    elif (s0 < num_s or t0 < num_t) and groups:  # one side goes on alone: into the last group
        last_s, last_t = groups.pop()
        groups.append((range(last_s.start, num_s), range(last_t.start, num_t)))
    return groups


# ---------------------------------------------------------------------------------------------
# 2. The shared vocabulary
# ---------------------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte (GPT-2's bytes_to_unicode table, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def _is_byte_piece(piece: str) -> bool:
    """SentencePiece's byte fallback: '<0xNN>' stands for the byte NN."""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def token_surfaces(tokenizer) -> dict[int, bytes | tuple[str, str]]:
    """Each token id -> what it stands for: its text as UTF-8 bytes (byte-level BPE's 'Ġ' and
    SentencePiece's '▁' read as a space, SentencePiece's '<0xNN>' as that byte), or ("special", its
    string) for a special token. Added tokens that are not special stand for their own text."""
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    special_ids = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    surfaces: dict[int, bytes | tuple[str, str]] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in special_ids or added.get(piece, False):
            surfaces[token_id] = ("special", piece)
        elif piece in added:
            surfaces[token_id] = piece.encode()
        elif byte_level and all(c in _BYTE_DECODER for c in piece):
            surfaces[token_id] = bytes(_BYTE_DECODER[c] for c in piece)
        elif _is_byte_piece(piece):
            surfaces[token_id] = bytes([int(piece[3:5], 16)])
        else:
            surfaces[token_id] = piece.replace("▁", " ").encode()
    return surfaces


def shared_columns(student_tokenizer, teacher_tokenizer) -> dict[int, int]:
    """{student id: teacher id} for the tokens both vocabularies hold: equal `token_surfaces`, the
    lowest id when one side has several ids for one text (an ordinary token before a byte-fallback
    piece); special tokens by string, else by role
    (eos, bos, unk, pad: the teacher's EOS is the student's). One to one."""
    def first_ids(tokenizer) -> dict:
        # of several ids for one text, a byte-fallback piece ('<0x2E>') only when no ordinary token has
        # it: a SentencePiece model writes '.' with its '.' token, not with the byte
        fallback = {i for piece, i in tokenizer.get_vocab().items() if _is_byte_piece(piece)}
        ids: dict = {}
        for token_id, surface in sorted(token_surfaces(tokenizer).items(), key=lambda kv: (kv[0] in fallback, kv[0])):
            ids.setdefault(surface, token_id)
        return ids

    student, teacher = first_ids(student_tokenizer), first_ids(teacher_tokenizer)
    pairs = {student[key]: teacher[key] for key in student.keys() & teacher.keys()}
    for role in ROLES:  # roles after strings: a student EOS "</s>" still maps to a teacher "<|endoftext|>"
        s, t = getattr(student_tokenizer, f"{role}_token_id"), getattr(teacher_tokenizer, f"{role}_token_id")
        if s is not None and t is not None and s not in pairs and t not in pairs.values():
            pairs[s] = t
    return pairs


# ---------------------------------------------------------------------------------------------
# 3. The teacher's batch and the alignment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Alignment:
    """How a teacher batch's response positions align with a student batch's (G groups in all).

    teacher_batch:  the teacher's tokenization of the student batch's text.
    row:            (G,) the batch row of each group.
    student_span, teacher_span: (G, 2) each group's first and last response position on each side.
    student_ids, teacher_ids:   (B, R_s), (B, R_t) the response tokens of each side.
    student_columns, teacher_columns: (S,) the shared vocabulary, pairwise (`shared_columns`).
    """

    teacher_batch: SequenceBatch
    row: torch.Tensor
    student_span: torch.Tensor
    teacher_span: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_columns: torch.Tensor
    teacher_columns: torch.Tensor

    @property
    def num_student_tokens(self) -> torch.Tensor:
        """(G,) student tokens per group: a group's weight in the token mean."""
        return (self.student_span[:, 1] - self.student_span[:, 0] + 1).double()


@dataclass(frozen=True, eq=False)
class Aligned:
    """A model's outputs on the teacher's tokenization of a student batch (`Alignment`)."""

    outputs: Outputs
    alignment: Alignment

    def detach(self) -> Aligned:
        return Aligned(self.outputs.detach(), self.alignment)


class CrossTokenizer:
    """A student / teacher tokenizer pair: the shared vocabulary, computed once, and the teacher's
    batch for a student batch (`teacher_batch`)."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.columns = shared_columns(student_tokenizer, teacher_tokenizer)
        # every special token is one (Llama 3's header markers are flagged special without being
        # in all_special_ids); the text between them is text on both sides
        student_special = set(student_tokenizer.all_special_ids) | {
            i for i, token in student_tokenizer.added_tokens_decoder.items() if token.special}
        self.special = {s: t for s, t in self.columns.items() if s in student_special}  # special -> teacher id
        self.student_special = student_special
        # what the teacher's tokenizer adds around a text (its BOS), minus a trailing EOS: GOLD's
        # teacher prompt drops it too (trl 1.16.0 trl/experimental/gold/gold_trainer.py:211-213)
        plain = teacher_tokenizer("a", add_special_tokens=False)["input_ids"]
        full = teacher_tokenizer("a")["input_ids"]
        self.teacher_prefix = full[: full.index(plain[0])] if plain and plain[0] in full else []
        self._cache: list[tuple[SequenceBatch, Alignment]] = []
        student_ids, teacher_ids = zip(*sorted(self.columns.items()), strict=True) if self.columns else ((), ())
        self.student_columns = torch.tensor(student_ids, dtype=torch.long)
        self.teacher_columns = torch.tensor(teacher_ids, dtype=torch.long)

    def describe(self) -> str:
        return f"{len(self.columns)} shared tokens of {len(self.teacher_tokenizer)} in the teacher's vocabulary"

    def _teacher_ids(self, ids: Sequence[int], *, prompt: bool) -> tuple[list[int], list[tuple[range, range]]]:
        """The teacher's ids for the student's `ids`, and (response only) the aligned groups.

        Runs of ordinary tokens are decoded and re-tokenized; a special token maps through
        `self.special` (its own group) or, with no teacher counterpart, is left out (no group)."""
        out: list[int] = []
        groups: list[tuple[range, range]] = []
        run: list[int] = []
        start = 0  # position of the run's first student token

        def flush():
            if not run:
                return
            text = self.student_tokenizer.decode(run, clean_up_tokenization_spaces=False)
            # text never becomes a special token (as promptkd.data.dataset tokenizes data): a response
            # that spells "</s>" is those characters for the teacher too
            teacher = self.teacher_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if not prompt:
                for s, t in align(char_ends(self.student_tokenizer, run), char_ends(self.teacher_tokenizer, teacher)):
                    groups.append((range(s.start + start, s.stop + start), range(t.start + len(out), t.stop + len(out))))
            out.extend(teacher)

        for k, token in enumerate(ids):
            if token not in self.student_special:
                if not run:
                    start = k
                run.append(token)
                continue
            flush()
            run = []
            if token in self.special:
                if not prompt:
                    groups.append((range(k, k + 1), range(len(out), len(out) + 1)))
                out.append(self.special[token])
        flush()
        return out, groups

    def teacher_batch(self, batch: SequenceBatch) -> Alignment:
        """The teacher's tokenization of `batch` (prompts left-padded, responses after them, the layout
        of promptkd.data.batch) and its alignment with `batch`'s response positions. The last few
        batches are remembered: a step asks for the same batch's teacher outputs several times."""
        for seen, alignment in self._cache:
            if seen is batch:
                return alignment
        p = batch.prompt_length
        examples, rows, student_spans, teacher_spans = [], [], [], []
        for b, (ids, attention, loss) in enumerate(
                zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.loss_mask.tolist(), strict=True)):
            prompt_ids = [i for i, a in zip(ids[:p], attention[:p], strict=True) if a]
            response_ids = [i for i, m in zip(ids[p:], loss[p:], strict=True) if m]  # from column P on, contiguous
            prompt, _ = self._teacher_ids(prompt_ids, prompt=True)
            if self.teacher_prefix and prompt[: len(self.teacher_prefix)] != self.teacher_prefix:
                prompt = self.teacher_prefix + prompt
            response, groups = self._teacher_ids(response_ids, prompt=False)
            examples.append(Example(prompt_ids=prompt, response_ids=response, references=[]))
            for s, t in groups:
                rows.append(b)
                student_spans.append((s.start, s.stop - 1))
                teacher_spans.append((t.start, t.stop - 1))
        pad = self.teacher_tokenizer.pad_token_id
        teacher = collate_sequences(examples, pad if pad is not None else self.teacher_tokenizer.eos_token_id)
        device = batch.input_ids.device
        span = lambda pairs: torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2)  # noqa: E731
        teacher = teacher.to(device)
        alignment = Alignment(
            teacher_batch=teacher, row=torch.tensor(rows, dtype=torch.long, device=device),
            student_span=span(student_spans), teacher_span=span(teacher_spans),
            student_ids=batch.input_ids[:, p:], teacher_ids=teacher.input_ids[:, teacher.prompt_length:],
            student_columns=self.student_columns.to(device), teacher_columns=self.teacher_columns.to(device))
        self._cache = [*self._cache[-7:], (batch, alignment)]
        return alignment


# ---------------------------------------------------------------------------------------------
# 4. The loss over groups
# ---------------------------------------------------------------------------------------------


def group_log_probs(logits: torch.Tensor, ids: torch.Tensor, row: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """(G, V) log-probabilities of each group: log p_last(v) + sum of log p_j(token_j) over the group's
    earlier positions j, the chain rule (GOLD's "bayesian" merge, trl 1.16.0
    trl/experimental/gold/gold_trainer.py:600-605). Rows are not normalised: they sum to the
    probability of the group's prefix.

    logits: (B, R, V), position r predicting response token r; ids: (B, R) those tokens;
    row: (G,); span: (G, 2) first and last position.
    """
    log_p = logits.log_softmax(-1)  # (B, R, V)
    token = log_p.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
    prefix = F.pad(token.cumsum(-1), (1, 0))  # (B, R + 1): prefix[:, j] = sum of token[:, :j]
    first, last = span[:, 0], span[:, 1]
    earlier = prefix[row, last] - prefix[row, first]  # (G,): exactly 0 for one-token groups
    return log_p[row, last] + earlier.unsqueeze(-1)  # (G, V)


def uld(probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024): sum_k |sort(q)_k - sort(p)_k|, each row sorted in decreasing order,
    the shorter row padded with zeros (Nicolas-BZRD/llm-recipes @ab6e798
    models/distillation_model.py:128-137, :163; GOLD's unmatched part, trl 1.16.0
    trl/experimental/gold/gold_trainer.py:680-704). (G, V_a), (G, V_b) -> (G,)."""
    a, b = probs.sort(-1, descending=True).values, target_probs.sort(-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    return (F.pad(a, (0, width - a.shape[-1])) - F.pad(b, (0, width - b.shape[-1]))).abs().sum(-1)


def hybrid(div: Divergence, log_q: torch.Tensor, log_p: torch.Tensor, columns: tuple[torch.Tensor, torch.Tensor],
           shared_fraction: float) -> torch.Tensor:
    """(G,) w div(q, p) on the shared columns + (1 - w) uld(q, p) on the others, w = `shared_fraction`.

    log_q, log_p: (G, V_q), (G, V_p) group log-probabilities, q trained; columns: the shared columns of
    each, pairwise. The divergence gets the log-probabilities as logits, so it compares q and p
    renormalised over the shared tokens (GOLD feeds the unnormalised rows to its JSD, trl 1.16.0
    trl/experimental/gold/gold_trainer.py:2282-2284; docs/method.md section 11 says why we differ);
    ULD compares the probabilities left outside them.
    """
    q_columns, p_columns = columns
    exact = div(log_q[:, q_columns], log_p[:, p_columns])
    if shared_fraction == 1.0:
        return exact
    outside = lambda log_x, cols: log_x.exp()[:, torch.ones(log_x.shape[-1], dtype=torch.bool,  # noqa: E731
                                                            device=log_x.device).index_fill(0, cols, False)]
    return shared_fraction * exact + (1.0 - shared_fraction) * uld(outside(log_q, q_columns), outside(log_p, p_columns))


def teacher_position_weights(a: Alignment) -> torch.Tensor:
    """(B, R_t) each teacher response position's share of its group's weight, n_g / m_g (the group's
    student tokens over its teacher tokens); 0 at positions in no group (padding)."""
    m = a.teacher_span[:, 1] - a.teacher_span[:, 0] + 1  # (G,)
    starts = torch.repeat_interleave(a.teacher_span[:, 0], m)
    within = torch.arange(int(m.sum()), device=m.device) - torch.repeat_interleave(m.cumsum(0) - m, m)
    weights = torch.zeros(a.teacher_ids.shape, dtype=torch.float64, device=m.device)
    weights[torch.repeat_interleave(a.row, m), starts + within] = torch.repeat_interleave(a.num_student_tokens / m, m)
    return weights


def cross_terms(trained: Outputs | Aligned, terms: Sequence[tuple]) -> tuple[torch.Tensor, list[float]]:
    """(sum_k w_k term_k, [each term_k]): each term a sum weighted so that a group counts n_g, its
    student tokens (the token mean runs over the student's response tokens, as on the exact path).

    trained and each target are `Outputs` on the student's tokenization or `Aligned` outputs on the
    teacher's (at least one `Aligned`). Across tokenizations, per group, `hybrid` of the group rows
    (`group_log_probs`), with the shared fraction of the teacher's vocabulary as weight (GOLD's
    adaptive weight, trl 1.16.0 trl/experimental/gold/gold_trainer.py:706-710). Two sides on the
    teacher's tokenization (PromptKD's regulariser: prompted against base teacher) compare every
    teacher position with every column, weighted n_g / m_g (`teacher_position_weights`). Targets get
    no gradient; a term of weight 0 is logged only.
    """
    a = next(x.alignment for x in (trained, *[t for _, t, _ in terms]) if isinstance(x, Aligned))

    def logits(side: Outputs | Aligned) -> torch.Tensor:
        x = (side.outputs if isinstance(side, Aligned) else side).logits()
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def rows(side: Outputs | Aligned, side_logits: torch.Tensor) -> torch.Tensor:
        ids, span = (a.teacher_ids, a.teacher_span) if isinstance(side, Aligned) else (a.student_ids, a.student_span)
        return group_log_probs(side_logits, ids, a.row, span)

    def vocab(side: Outputs | Aligned) -> int:
        out = side.outputs if isinstance(side, Aligned) else side
        return out.states.shape[-1] if out.head is None else out.head.vocab_size

    trained_logits = logits(trained)  # (B, R, V), with grad
    trained_rows = None  # (G, V), when a term needs them
    weights = a.num_student_tokens.to(trained_logits.dtype)  # (G,)
    loss, values = trained_logits.new_zeros(()), []
    for div, target, weight in terms:
        with torch.no_grad():
            target_logits = logits(target)
        if isinstance(trained, Aligned) and isinstance(target, Aligned):  # one tokenization, the teacher's
            q = trained_logits if weight else trained_logits.detach()
            term = (teacher_position_weights(a).to(q.dtype) * div(q, target_logits)).sum()
        elif isinstance(trained, Aligned) != isinstance(target, Aligned):
            trained_rows = rows(trained, trained_logits) if trained_rows is None else trained_rows
            with torch.no_grad():
                target_rows = rows(target, target_logits)
            teacher_side = trained if isinstance(trained, Aligned) else target
            columns = (a.student_columns, a.teacher_columns)
            if isinstance(trained, Aligned):
                columns = columns[::-1]
            q = trained_rows if weight else trained_rows.detach()
            per_group = hybrid(div, q, target_rows, columns, a.teacher_columns.numel() / vocab(teacher_side))
            term = (weights * per_group).sum()
        else:
            raise ValueError("cross_terms compares two outputs on the student's tokenization with loss_terms")
        values.append(float(term.detach()))
        if weight:
            loss = loss + weight * term
    return loss, values
