"""What the optimiser trains around a multi-exit network: hint adapters, and a frozen backbone for ramps.

The reference BYOT code passes each hinted shallow exit's pooled feature through a trainable
linear adapter before comparing it with the deepest exit's feature. The adapters exist only
during training: checkpoints keep them apart from the network, and artifacts never hold them.
Ramps (exits trained on a trained network) freeze every stage and the final exit, and keep
them in eval mode so that their batch-norm statistics do not move either.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.multi_exit import MultiExitNet, MultiExitOutput


class TrainNet(nn.Module):
    """The network plus its training-only hint adapters; forward gives the adapted features."""

    def __init__(self, model: MultiExitNet, adapted: Sequence[int], feature_dim: int, freeze_backbone: bool) -> None:
        super().__init__()
        self.model = model
        self.adapted = sorted(adapted)  # 0-based shallow exits whose features go through an adapter
        self.adapters = nn.ModuleDict({str(k): nn.Linear(feature_dim, feature_dim) for k in self.adapted})
        self.frozen: list[nn.Module] = []
        if freeze_backbone:
            self.frozen = [*model.stages, model.exits[-1]]
            for module in self.frozen:
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> TrainNet:
        super().train(mode)
        for module in self.frozen:
            module.eval()  # frozen batch norms keep their running statistics
        return self

    def forward(self, x):
        out = self.model(x)
        features = list(out.features)
        for k in self.adapted:
            features[k] = self.adapters[str(k)](features[k])
        return MultiExitOutput(out.logits, features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
