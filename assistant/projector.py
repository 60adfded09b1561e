"""The projector: maps vision patch features into the LLM's input-embedding space (LLaVA's design).

`mlp2x_gelu` uses the same parameter names as transformers' `LlavaMultiModalProjector`
(`linear_1`, `act`, `linear_2`), so a saved model loads in stock transformers and vLLM.
`linear` is the lighter LLaVA-1 variant for quick alignment experiments.
"""

from __future__ import annotations

from torch import nn

PROJECTOR_KINDS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {kind!r}; choose one of {PROJECTOR_KINDS}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features):  # (B, N, Dv) -> (B, N, Dt)
        hidden = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            hidden = self.linear_2(self.act(hidden))
        return hidden


def build_projector(kind: str, vision_config, text_config) -> Projector:
    """Dimensions are read from the built encoder's and LLM's configs, never typed in."""
    return Projector(kind, vision_config.hidden_size, text_config.hidden_size)
