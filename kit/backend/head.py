"""The LM head as the model applies it, restricted to the rows a likelihood needs.

The kit applies the head itself, to the positions and vocabulary rows it needs (labelled positions, the grid
vocabulary), instead of letting the model project every position onto its whole vocabulary. So everything the
model's own head does after the matmul must be done here too, read from the model rather than from a list of
families: the output layer's bias, a logit scale (`logit_scale` multiplies, `logits_scaling` divides: the config
names transformers uses) and a final soft-cap (`final_logit_softcapping`, Gemma). `check` compares the result
with the model's own logits once at load, so a head that does something else is refused instead of silently
scoring wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Head:
    """Logits = softcap(scale * (hidden @ weight.T + bias)), in fp32."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    trained_rows: Any = None  # peft's trainable-token layer whose rows replace some of the weight's (pretuning's
    # --train-embeddings): read at every use, since they change with every step

    @classmethod
    def of(cls, model: torch.nn.Module) -> Head:
        """The head of a transformers causal LM (the base model under any adapter)."""
        output = model.get_output_embeddings()
        config = model.config.get_text_config()
        scale = (float(getattr(config, "logit_scale", None) or 1.0)
                 / float(getattr(config, "logits_scaling", None) or 1.0))
        softcap = getattr(config, "final_logit_softcapping", None)
        rows = getattr(output, "token_adapter", None)  # peft's TrainableTokensWrapper around the head
        weight = output.weight if rows is None else rows.get_base_layer().weight
        return cls(weight, getattr(output, "bias", None), scale, float(softcap) if softcap else None, rows)

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def current_weight(self) -> torch.Tensor:
        """The weight with the trained token rows in place (the weight itself when none train)."""
        if self.trained_rows is None:
            return self.weight
        return self.trained_rows.get_merged_weights(self.trained_rows.active_adapters)

    def restricted(self, allowed: torch.Tensor) -> Head:
        """The head over `allowed` ids only (gathered once per decoding, not per step; per pass in training)."""
        bias = None if self.bias is None else self.bias[allowed]
        return Head(self.current_weight()[allowed], bias, self.scale, self.softcap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits outside autocast: exact enough to compare likelihoods across candidates."""
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden.float() @ self.current_weight().float().T
            if self.bias is not None:
                logits = logits + self.bias.float()
            if self.scale != 1.0:
                logits = logits * self.scale
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@torch.no_grad()
def check(model: torch.nn.Module, decoder: torch.nn.Module, head: Head, where: str) -> None:
    """Refuse a model whose own logits the kit's head does not reproduce (on a short made-up sequence)."""
    ids = (torch.arange(8, device=head.weight.device) * 7 + 3) % head.rows
    own = model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
    ours = head(decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0, -1])
    error = float((own - ours).abs().max())
    tolerance = 1e-3 + (2e-2 if head.weight.dtype != torch.float32 else 1e-4) * float(own.abs().max())
    if not error <= tolerance:
        raise ValueError(f"{where}: the model's logits differ from the kit's LM head (weight, bias, scale "
                         f"{head.scale}, soft-cap {head.softcap}) by {error:.3g} > {tolerance:.3g}: its head does "
                         "something else, which the kit cannot reproduce")
