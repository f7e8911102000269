"""A GPT checkpoint of this package into the equivalent ``HybridModel`` (``*-`` per GPT layer,
or ``*E``; Mamba layers in between keep their fresh init).

megatron-core translates at load time (``dist_checkpointing/gpt_checkpoint_interop.py``) GPT
checkpoints whose layers are stacked into one tensor per name, which is how Pre-Norm,
Post-Norm and HybridNorm are saved. HybridNorm* and Mix-LN are saved with a key per layer
(their layers differ, see ``config.hetereogenous_dist_checkpoint``), which that translation
cannot read; for those the same retargeting is done here per layer. The norm parameters need
nothing more: a pattern layer keeps the GPT layer's names, and its saved norm layout is its
half of the GPT layer's.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_hybridnorm.norms.names import DEPTH_SCALE, RESIDUAL_SCALE
from megatron_hybridnorm.compat import require_gpt_checkpoint_interop
from megatron_hybridnorm.models.detection import checkpoint_folder, detect_checkpoint, detect_scheme
from megatron_hybridnorm.transformer.validate import SchemeMismatchError

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
# the layer's own: its saved norm layout, and LayerNorm Scaling's and DeepNorm's scale buffers,
# which both halves of a block hold
_LAYER_STATE = re.compile(
    rf"decoder\.layers\.(\d+)\.(?:_extra_state|{DEPTH_SCALE}|{RESIDUAL_SCALE})$")
_FINAL_NORM = ("decoder.final_norm.", "decoder.final_layernorm.")
_LOCAL_ONLY = "output_layer._extra_state"  # GPT checkpoints omit it


def _is_stacked(folder: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(k.startswith("decoder.layers.") and not _LAYER.match(k) for k in keys)


def keep_ffn_layouts_local(sharded_state_dict, layer_maps) -> None:
    """A GPT layer saves one norm layout (its ``_extra_state``) and one depth or residual
    scale for both halves; two hybrid layers cannot load one checkpoint entry (megatron-core
    refuses duplicate keys), so the FFN halves keep their own. ``load_gpt_checkpoint`` has
    checked the scheme before."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    def keep(entry):
        m = isinstance(entry, ShardedBase) and _LAYER_STATE.search(entry.key)
        if m and int(m.group(1)) in layer_maps.mlp_to_gpt:
            return LocalNonpersistentObject(entry.data)
        return entry

    dict_list_map_inplace(keep, sharded_state_dict)


def retarget_per_layer(sharded_state_dict, layer_maps) -> None:
    """Point a hybrid sharded state dict at a GPT checkpoint saved with a key per layer."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    def retarget(entry):
        if not isinstance(entry, ShardedBase):
            return entry
        if entry.key.endswith(_LOCAL_ONLY):
            return LocalNonpersistentObject(entry.data)
        m = _LAYER.search(entry.key)
        if m is not None:
            hybrid = int(m.group(1))
            if hybrid in layer_maps.fresh_init:
                return LocalNonpersistentObject(entry.data)
            gpt = layer_maps.attention_to_gpt.get(hybrid, layer_maps.mlp_to_gpt.get(hybrid))
            if gpt is None:
                raise ValueError(f"{entry.key}: hybrid layer {hybrid} is not in the pattern")
            entry.key = f"{entry.key[:m.start()]}decoder.layers.{gpt}.{entry.key[m.end():]}"
        elif _FINAL_NORM[0] in entry.key:
            entry.key = entry.key.replace(*_FINAL_NORM)
        return entry

    dict_list_map_inplace(retarget, sharded_state_dict)


def load_gpt_checkpoint(model, path: str | Path, hybrid_layer_pattern: str) -> None:
    """Load the GPT dist checkpoint at ``path`` (any TP/PP layout it was saved at) into
    ``model``, a ``HybridModel`` stage built with ``hybrid_layer_pattern`` and the same scheme;
    another scheme is refused before anything loads. Save the model afterwards for a hybrid
    checkpoint that Megatron-LM's ``pretrain_hybrid.py --load`` reads."""
    require_gpt_checkpoint_interop()
    # here, after the check: gpt_checkpoint_interop is megatron-core 0.19's
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )


    folder = checkpoint_folder(Path(path))
    theirs, mine = detect_checkpoint(folder), detect_scheme(model)
    why = mine.scheme and theirs.mismatch(mine.scheme, mine.qkv_norm, mine.head_blocks,
                                          mine.normalization)
    if why:
        raise SchemeMismatchError(f"{path} {why}, which the model is: build it with the "
                                  "checkpoint's scheme")
    layer_maps = gpt_compatible_layer_maps(hybrid_layer_pattern)
    if theirs.num_layers != layer_maps.num_gpt_layers:
        raise ValueError(f"the pattern {hybrid_layer_pattern!r} pairs with "
                         f"{layer_maps.num_gpt_layers} GPT layers; {path} has "
                         f"{theirs.num_layers}")
    state = model.sharded_state_dict()
    keep_ffn_layouts_local(state, layer_maps)
    if _is_stacked(folder):
        retarget_sharded_state_dict_to_gpt_checkpoint(state, layer_maps)
    else:
        retarget_per_layer(state, layer_maps)
    model.load_state_dict(dist_checkpointing.load(state, str(folder)))
