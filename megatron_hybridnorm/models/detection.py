"""Which norm scheme a model or a dist checkpoint holds, and the check before loading.

Megatron-LM builds its default Pre-Norm model when a ``--spec`` module fails to import, and only
logs it; a checkpoint of one scheme loads into a model of another without complaint where their
parameter names overlap. This reads the norm parameters a model or a checkpoint holds, layer by
layer, and names the scheme they form (``detect_scheme``, ``detect_checkpoint``);
``check_checkpoint`` refuses a checkpoint whose norms differ from the model's before anything
loads. The load guards of the entry points, the training command, the check and the export use
it; ``python -m megatron_hybridnorm.inspect`` is its command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from megatron_hybridnorm.norms.names import (
    DEPTH_SCALE,
    NORM_MODULES,
    RESIDUAL_SCALE,
    is_norm_parameter,
    norm_checkpoint_prefix,
)
from megatron_hybridnorm.schemes import SCHEME_TABLE, LayerNorms, Scheme, get_scheme, resolve_scheme
from megatron_hybridnorm.transformer.validate import SchemeConfigError, SchemeMismatchError

_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")


def layer_norm_keys(lay: LayerNorms, moe: bool) -> frozenset[str]:
    """The checkpoint names of a layer's norm weights (``norm_checkpoint_prefix``: the names the
    spec's ``sharded_state_dict_keys_map`` saves them under, on either backend)."""
    keys = {norm_checkpoint_prefix(lay, slot, moe) + "weight" for slot in NORM_MODULES
            if getattr(lay, slot)}
    keys.update(k for k, on in ((DEPTH_SCALE, lay.depth_scaled), (RESIDUAL_SCALE, lay.deepnorm))
                if on)
    return frozenset(keys)


def _is_norm_weight(rest: str) -> bool:
    return (is_norm_parameter(rest) and rest.endswith("weight")) or rest in (DEPTH_SCALE,
                                                                              RESIDUAL_SCALE)


@dataclass
class Finding:
    scheme: str | None
    num_layers: int
    qkv_norm: str | None = None
    mixln_fraction: float | None = None
    layers: list[frozenset[str]] | None = None
    pattern: str | None = None  # a HybridModel's layer pattern, pipeline splits not shown
    normalization: str = "RMSNorm"  # the norm kind: RMSNorm, LayerNorm (biases) or DyT (alphas)

    @property
    def num_blocks(self) -> int:
        """What Mix-LN's fraction counts: layers of a GPT model, attention layers of a hybrid."""
        return self.pattern.count("*") if self.pattern else self.num_layers

    @property
    def head_blocks(self) -> int | None:
        """Mix-LN's number of Post-Norm blocks (None for the other schemes)."""
        return None if self.mixln_fraction is None else round(self.mixln_fraction * self.num_blocks)

    def mismatch(self, scheme: str | Scheme, qkv_norm: str | None = None,
                 head_blocks: int | None = None, normalization: str | None = None) -> str | None:
        """Why this (a checkpoint's finding) is not ``scheme`` with these options; None when it
        is. The one scheme-level comparison behind the refusals before loading (the entry
        points' ``--load`` check, GPT checkpoints into a HybridModel); ``check_checkpoint``
        compares layer by layer, and each layer's saved layout is checked again as it loads."""
        s = resolve_scheme(scheme)
        wanted = (s.name, qkv_norm if s.has_head_norms else None,
                  head_blocks if s.head_fraction is not None else None)
        found = (self.scheme, self.qkv_norm, self.head_blocks)
        if found == wanted and normalization in (None, self.normalization):
            return None
        if found == wanted:
            return f"holds {self.normalization} norms, not {normalization}"
        held = (str(self).splitlines()[0].removeprefix("scheme: ") if self.scheme
                else f"norms of no known scheme ({self.num_layers} layers)")
        return (f"holds {held}, not {s.name}"
                f"{f' (qkv_norm={wanted[1]})' if wanted[1] else ''}"
                f"{f' ({head_blocks} Post-Norm blocks)' if wanted[2] is not None else ''}")

    def __str__(self) -> str:
        if self.scheme is None:
            lines = [f"no known scheme matches these {self.num_layers} layers' norms:"]
            lines += [f"  layer {i}: {', '.join(sorted(k)) or 'none'}"
                      for i, k in enumerate(self.layers or [])]
            return "\n".join(lines)
        extra = []
        if self.qkv_norm:
            extra.append(f"qkv_norm={self.qkv_norm}")
        if self.mixln_fraction is not None:
            extra.append(f"{round(self.mixln_fraction * self.num_blocks)} Post-Norm "
                         f"{'blocks' if self.pattern else 'layers'}")
        if self.normalization != "RMSNorm":
            extra.append(self.normalization)
        shown = f" ({', '.join(extra)})" if extra else ""
        where = (f"HybridModel, pattern {self.pattern!r}" if self.pattern
                 else f"{self.num_layers} layers")
        return (f"scheme: {self.scheme}{shown}, {where}\n"
                f"  {get_scheme(self.scheme).summary}")


def _fractions(s: Scheme, n: int) -> list[float | None]:
    """The head fractions to try for a scheme over n layers (or blocks): k / n for Mix-LN."""
    return [None] if s.head_fraction is None else [k / n for k in range(n + 1)]


def match(layers: list[frozenset[str]], moe: list[bool]) -> tuple[str | None, float | None]:
    """The first scheme (in SCHEMES order) whose layouts give exactly these norm keys."""
    n = len(layers)
    for s in SCHEME_TABLE.values():
        for f in _fractions(s, n):
            expected = [layer_norm_keys(lay, m) for lay, m in zip(s.layouts(n, f), moe)]
            if expected == layers:
                return s.name, f
    return None, None


def match_pattern(layers: dict[int, frozenset[str]], pattern: str
                  ) -> tuple[str | None, float | None]:
    """The first scheme whose layouts on a hybrid ``pattern`` give exactly these norm keys on
    its attention, MLP and MoE layers (megatron-core's own layers, such as Mamba, not compared)."""
    # here, not at the top: models.hybrid needs megatron-core >= 0.18 (HybridModel), and the
    # GPT detection runs on 0.16 and 0.17 too
    from megatron_hybridnorm.models.hybrid.layouts import pattern_layouts

    n = pattern.count("*")
    for s in SCHEME_TABLE.values():
        for f in _fractions(s, n) if n else []:
            try:
                placed = pattern_layouts(s, pattern, f)
            except SchemeConfigError:
                continue
            if all(layer_norm_keys(p.norms, p.symbol == "E") == layers.get(i, frozenset())
                   for i, p in enumerate(placed) if p.norms is not None):
                return s.name, f
    return None, None


@dataclass
class _Layers:
    """Each layer's norm weights (checkpoint names), whether it is an MoE layer, and for a
    HybridModel each layer's pattern symbol."""

    norms: dict[int, frozenset[str]]
    moe: dict[int, bool]
    num_layers: int
    qkv_norm: str | None
    pattern: str | None = None
    normalization: str = "RMSNorm"


def _symbol(rests: set[str]) -> str:
    """A hybrid layer's pattern symbol from its parameter names ("G" also for a GPT layer)."""
    attention = any(r.startswith("self_attention.linear_qkv.") for r in rests)
    mlp = any(r.startswith("mlp.") for r in rests)
    if any(r.startswith("mixer.") for r in rests):
        return "M"
    if attention and not mlp:
        return "*"
    if mlp and not any(r.startswith("self_attention.") for r in rests):
        return "E" if any(r.startswith("mlp.router.") for r in rests) else "-"
    return "G"


def _collect(shapes: dict[str, tuple]) -> _Layers:
    per_layer: dict[int, set[str]] = {}
    names: dict[int, set[str]] = {}  # every parameter of each indexed layer
    hybrid = False
    stacked: set[str] = set()
    moe_layers: set[int] = set()
    stacked_moe = False
    num_layers = 0
    widths = {}
    kinds = set()
    for key, shape in shapes.items():
        hybrid |= key.startswith("decoder.final_norm.")  # GPTModel's is final_layernorm
        if key.startswith("decoder.") and ".mixer." not in key and is_norm_parameter(key):
            kinds.add(key.rsplit("_", 1)[-1].rsplit(".", 1)[-1])  # weight, bias or alpha
        m = _LAYER.match(key)
        if not m:
            continue
        index, rest = m.group(1), m.group(2)
        if index is None:
            num_layers = max(num_layers, shape[0]) if shape else num_layers
        else:
            per_layer.setdefault(int(index), set())
            names.setdefault(int(index), set()).add(rest)
        if rest.startswith("mlp.router."):
            if index is None:
                stacked_moe = True
            else:
                moe_layers.add(int(index))
        if rest in ("self_attention.linear_proj.weight", "self_attention.q_layernorm.weight"):
            widths[rest] = shape[-1] if shape else None
        if _is_norm_weight(rest):
            (stacked.add(rest) if index is None else per_layer[int(index)].add(rest))
    if per_layer:
        num_layers = max(num_layers, max(per_layer) + 1)
    # a q norm as wide as the attention output spans all heads ("full"), else one head
    q = widths.get("self_attention.q_layernorm.weight")
    qkv = None if q is None else (
        "full" if q == widths.get("self_attention.linear_proj.weight") else "head")
    indices = range(num_layers) if stacked or not per_layer else sorted(per_layer)
    symbols = {i: _symbol(r) for i, r in names.items()}
    hybrid |= not stacked and any(v in "*-E" for v in symbols.values())
    pattern = "".join(symbols.get(i, "?") for i in range(num_layers)) if hybrid else None
    kind = "DyT" if "alpha" in kinds else "LayerNorm" if "bias" in kinds else "RMSNorm"
    return _Layers({i: frozenset(stacked | per_layer.get(i, set())) for i in indices},
                   {i: stacked_moe or i in moe_layers for i in indices}, num_layers, qkv, pattern,
                   kind)


def detect_from_keys(shapes: dict[str, tuple]) -> Finding:
    """From global dist-checkpoint keys (optimizer entries ignored) and their shapes."""
    c = _collect(shapes)
    layers = [c.norms.get(i, frozenset()) for i in range(c.num_layers)]
    if c.pattern is not None:
        scheme, fraction = (match_pattern(c.norms, c.pattern) if "?" not in c.pattern
                            else (None, None))
        return Finding(scheme, c.num_layers, c.qkv_norm if scheme else None, fraction, layers,
                       c.pattern, c.normalization)
    scheme, fraction = match(layers, [c.moe.get(i, False) for i in range(c.num_layers)])
    return Finding(scheme, c.num_layers, c.qkv_norm if scheme else None, fraction, layers,
                   normalization=c.normalization)


def layer_checkpoint_params(model) -> dict:
    """The decoder layers' parameters of a model on this rank (or a list of its pipeline chunks)
    under their global checkpoint names: the layer's global index, and the names its
    ``sharded_state_dict_keys_map`` gives them (a local and a TE model then agree)."""
    params = {}
    for layer in _decoder_layers(model):
        keys_map = getattr(getattr(layer, "submodules_config", None),
                           "sharded_state_dict_keys_map", None) or {}
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        for name, p in layer.named_parameters():
            for old, new in keys_map.items():
                if name.startswith(old):
                    name = new + name[len(old):]
            params[prefix + name] = p
    return params


def _model_shapes(model) -> dict[str, tuple]:
    """Global checkpoint names and shapes of the layer parameters (and the scale buffers) of a
    model on this rank."""
    shapes = {name: tuple(p.shape) for name, p in layer_checkpoint_params(model).items()}
    for layer in _decoder_layers(model):
        for name in (DEPTH_SCALE, RESIDUAL_SCALE):
            if layer._buffers.get(name) is not None:
                shapes[f"decoder.layers.{layer.layer_number - 1}.{name}"] = ()
    return shapes


def _decoder_layers(model):
    """The decoder layers of a model on this rank, or of a list of its pipeline chunks."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
            chunk = chunk.module  # DDP, Float16Module
        yield from chunk.decoder.layers


def detect_scheme(model) -> Finding:
    """The scheme of a live GPTModel (or a list of its pipeline/virtual-pipeline chunks on this
    rank; a rank sees only its own stages' layers)."""
    return detect_from_keys(_model_shapes(model))


def check_checkpoint(model, path: str | Path) -> None:
    """Raise ``SchemeMismatchError`` unless every layer this rank holds has the same norms in
    the checkpoint; call it before loading, so that another scheme is never half loaded."""
    saved = detect_checkpoint(path)
    mine = _collect(_model_shapes(model))
    if saved.normalization != mine.normalization:
        raise SchemeMismatchError(
            f"checkpoint {path} holds {saved.normalization} norms, this model's are "
            f"{mine.normalization}: build it with normalization={saved.normalization!r}, or "
            "start from a checkpoint of this one")
    for i, keys in mine.norms.items():
        theirs = saved.layers[i] if saved.layers and i < len(saved.layers) else frozenset()
        if theirs != keys or (saved.qkv_norm and mine.qkv_norm != saved.qkv_norm):
            raise SchemeMismatchError(
                f"checkpoint {path} holds {saved.scheme or 'an unknown scheme'}"
                f"{f' (qkv_norm={saved.qkv_norm})' if saved.qkv_norm else ''}, "
                f"{saved.num_layers} layers; this model's layer {i} has the norms "
                f"{sorted(keys)}{f' (qkv_norm={mine.qkv_norm})' if mine.qkv_norm else ''}, "
                f"the checkpoint's {sorted(theirs)}. Build the model with the checkpoint's "
                "scheme, or start from a checkpoint of this one."
            )


def checkpoint_folder(path: Path) -> Path:
    """The folder holding the dist checkpoint's ``.metadata``."""
    if (path / ".metadata").is_file():
        return path
    tracker = path / "latest_checkpointed_iteration.txt"  # Megatron-LM save folder
    if tracker.is_file():
        it = tracker.read_text().strip()
        return checkpoint_folder(path / ("release" if it == "release" else f"iter_{int(it):07d}"))
    latest = path / "latest"  # hybridnorm-train
    if latest.is_file():
        return checkpoint_folder(path / latest.read_text().strip())
    raise FileNotFoundError(f"{path} is not a dist checkpoint (no .metadata, "
                            "latest_checkpointed_iteration.txt or latest)")


def detect_checkpoint(path: str | Path) -> Finding:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint_folder(Path(path)))).read_metadata()
    shapes = {k: tuple(getattr(v, "size", ()) or ()) for k, v in meta.state_dict_metadata.items()
              if not k.startswith("optimizer.")}
    return detect_from_keys(shapes)
