"""Keeping some of a network's exits: the stages between kept exits merge, the dropped heads go.

A network trained with an exit after many blocks (`exits=[1, 2, …]`, models/resnet.py) serves only
the exits that pay (training/exit_selection.py chooses them). `keep_exits` rebuilds the network
with exits after the kept blocks alone and moves every weight of the stem, the blocks and the kept
heads into it, so the kept exits compute exactly what they computed before.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.artifact import ArchitectureSpec
from models.multi_exit import MultiExitNet


def keep_exits(
    model: MultiExitNet, spec: ArchitectureSpec, keep: Sequence[int]
) -> tuple[MultiExitNet, ArchitectureSpec]:
    """`model` with only the 0-based exits `keep` (which must include the last), and its spec."""
    keep = sorted(set(keep))
    if not keep or keep[-1] != model.num_exits - 1 or keep[0] < 0:
        raise ValueError(f"keep must be exits 0..{model.num_exits - 1} including the last, got {list(keep)}")
    if keep == list(range(model.num_exits)):
        return model, spec
    if model.exit_blocks is None or model.block_paths is None or model.stem_path is None:
        raise ValueError(f"{spec.name}: only networks built from residual blocks can drop exits")
    blocks = [model.exit_blocks[k] for k in keep]
    new_spec = spec.model_copy(update={"kwargs": {**spec.kwargs, "exits": blocks}})
    new = new_spec.build()
    assert new.block_paths is not None and new.stem_path is not None
    moves = {model.stem_path: new.stem_path, **dict(zip(model.block_paths, new.block_paths, strict=True))}
    moves |= {f"exits.{k}": f"exits.{i}" for i, k in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        for old, target in moves.items():
            if key.startswith(old + "."):
                state[target + key[len(old) :]] = value
                break
    new.load_state_dict(state, strict=True)
    return new.eval(), new_spec
