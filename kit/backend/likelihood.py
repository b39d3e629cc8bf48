"""What the model says about token sequences: the training loss, prompt prefills, answer scores, and the one-token
step that decoding (kit/decode.py) runs on a prefilled cache.

Speed rules: the decoder runs once per batch, a prompt once however many answers are scored after it (`prefill`,
then `score` on its cached keys and values), and the LM head is applied only where a log-probability is needed
(labelled positions, the last position while decoding), restricted to the allowed vocabulary when one is given.
The head runs in fp32, so that losses and scores do not carry bf16 rounding of the logits.

A mixin of `Backend` (kit/backend/model.py), which owns the model, the attention-kernel policy and the modes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kit.backend.cache import Prefix, cache_rows, index_in, layer_keys_values
from kit.backend.head import Head
from kit.backend.masks import full_cache
from kit.format import IGNORE

Ids = Sequence[int] | torch.Tensor  # token ids: a list, or a 1-D LongTensor


class Likelihoods:
    """Loss, prefill, score and the decoding step over the attributes `Backend` sets up (`_decoder`, `_head`,
    `_windows`, `_pad_id`, `device`, `max_length`, the attention kernels) and its mode switches."""

    def loss(self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask: torch.Tensor,
             vocab: Ids | None = None) -> torch.Tensor:
        """Mean cross-entropy over the tokens whose label is not IGNORE (labels aligned with input_ids).

        Batches must be right-padded (pads after the tokens): the decoder then runs with a plain causal
        mask, which is exact for every real token and the only layout unsloth's training path supports.
        With `vocab`, the softmax is over those ids only and every label must be one of them.
        """
        return -self.label_log_probs(input_ids, labels, attention_mask, vocab).mean()

    def label_log_probs(self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask: torch.Tensor,
                        vocab: Ids | None = None) -> torch.Tensor:
        """Log-probability of every labelled token, row by row in sequence order: the loss's terms (TTT also
        reads the query output's own among them, `kit.ttt.query_terms`). Same rules as `loss`."""
        input_ids, labels, attention_mask = (t.to(self.device) for t in (input_ids, labels, attention_mask))
        self._check_length(input_ids.shape[1])
        if not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            raise ValueError("the loss needs right-padded batches (attention_mask must be 1s then 0s per row)")
        targets = labels.masked_fill(attention_mask == 0, IGNORE)[:, 1:]  # token t predicts label t+1
        keep = targets != IGNORE
        if not bool(keep.any()):
            raise ValueError("loss over a batch without any labelled token")
        self._set_attention(self.attention_for(input_ids.shape[1]))
        with self._autocast(), self._compiled_if(torch.is_grad_enabled() and input_ids.shape[0] > 1):
            hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return self._log_probs(hidden[:, :-1][keep], targets[keep], vocab)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[np.ndarray]) -> Prefix:
        """Run prompts once, in one right-padded pass, and keep their keys and values, so that `score` can score
        any number of answers after any of them without recomputing it (the product of experts scores every
        candidate under every view's prompt), and decoding can start from them. Switches to eval mode."""
        self.eval()
        ids, mask = self._pad(prompts)
        self._check_length(ids.shape[1])
        self._set_attention(self.attention_for(ids.shape[1]))
        # right padding: causality keeps pads out of real rows; sliding layers keep all their keys (masks.py)
        cache = None if self._windows is None else full_cache()
        with self._autocast(), self._compiled_if(False):
            out = self._decoder(input_ids=ids, use_cache=True, past_key_values=cache)
        lengths = mask.sum(1)
        last_hidden = out.last_hidden_state[torch.arange(len(prompts), device=self.device), lengths - 1]
        cache = out.past_key_values
        return Prefix(layer_keys_values(cache), last_hidden, lengths, mask, legacy=not hasattr(cache, "layers"))

    @torch.no_grad()
    def score(self, prefix: Prefix, prompt_rows: Sequence[int], answers: Sequence[np.ndarray],
              vocab: Ids | None = None) -> np.ndarray:
        """Summed log-probability of each answer after the prefix's prompt in `prompt_rows` (float64): one
        right-padded pass over the answers alone, attending to their prompts' cached keys and values (a mask hides
        the prompts' padding). Switches to eval mode."""
        if len(prompt_rows) != len(answers):
            raise ValueError(f"{len(prompt_rows)} prompt rows but {len(answers)} answers")
        self.eval()
        answer_ids, answer_mask = self._pad(answers)
        rows = torch.as_tensor(prompt_rows, dtype=torch.long, device=self.device)
        lengths = prefix.lengths[rows]
        self._check_length(int((lengths + answer_mask.sum(1)).max()))
        cache = cache_rows(prefix.keys_values, rows, prefix.legacy)
        positions = lengths[:, None] + torch.arange(answer_ids.shape[1], device=self.device)
        self._set_attention(self.decode_attention)
        with self._autocast(), self._compiled_if(False):
            mask = self._attention_mask(torch.cat([prefix.mask[rows], answer_mask], 1), answer_ids.shape[1])
            hidden = self._decoder(input_ids=answer_ids, attention_mask=mask, position_ids=positions,
                                   past_key_values=cache, use_cache=True).last_hidden_state
        # answer token j is predicted by the hidden state before it: for j = 0, its prompt's last
        before = torch.cat([prefix.last_hidden[rows, None].to(hidden.dtype), hidden[:, :-1]], 1)
        keep = answer_mask.bool()
        log_probs = self._log_probs(before[keep], answer_ids[keep], vocab)
        totals = torch.zeros(len(answers), dtype=torch.float64, device=self.device)
        return totals.index_add_(0, keep.nonzero()[:, 0], log_probs.double()).cpu().numpy()

    # --- decoding's primitives (the search policies are kit/decode.py's) -----------------------------------

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """The state decoding steps run in: eval mode, the decoding attention kernel, autocast, no compiled
        graphs (the growing KV cache would recompile one per step)."""
        self.eval()
        self._set_attention(self.decode_attention)
        with torch.no_grad(), self._autocast(), self._compiled_if(False):
            yield

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
             ) -> tuple[Any, torch.Tensor]:
        """One token per row on a KV cache (inside `decoding`): the grown cache and each row's new last hidden
        state. `mask` covers the cache and the new token, `positions` are the new token's."""
        out = self._decoder(input_ids=tokens[:, None], attention_mask=self._attention_mask(mask, 1),
                            position_ids=positions, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.last_hidden_state[:, -1]

    def head_rows(self, allowed: torch.Tensor) -> Head:
        """The LM head restricted to `allowed` ids, for `logits` (gathered once per decoding, not per step)."""
        return self._head.restricted(allowed)

    def logits(self, hidden: torch.Tensor, head: Head) -> torch.Tensor:
        """The model's LM head (kit/backend/head.py) in fp32, outside autocast."""
        return head(hidden)

    def vocab_ids(self, ids: Ids) -> torch.Tensor:
        """Token ids as a 1-D LongTensor on the model's device."""
        return torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)

    # --- helpers -----------------------------------------------------------------------------------------

    def _log_probs(self, hidden: torch.Tensor, wanted: torch.Tensor, vocab: Ids | None) -> torch.Tensor:
        """log p(wanted token | the hidden state before it), over `vocab` only when given (shared by loss and
        score)."""
        if vocab is None:
            logits = self.logits(hidden, self._head)
        else:
            allowed = self.vocab_ids(vocab)
            logits, wanted = self.logits(hidden, self.head_rows(allowed)), index_in(wanted, allowed)
        return -F.cross_entropy(logits, wanted, reduction="none")

    def _attention_mask(self, padding: torch.Tensor, queries: int) -> Any:
        """What a pass on a cache attends with: the 2-D padding mask, or for sliding-window models the masks
        that count positions in real tokens (kit/backend/masks.py)."""
        if self._windows is None:
            return padding
        return self._windows.mask(padding, queries, self.dtype)

    def _check_length(self, length: int) -> int:
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds max_length {self.max_length}")
        return length

    def _pad(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths as one right-padded (ids, mask) batch on the device."""
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("need at least one sequence, and no empty one")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
