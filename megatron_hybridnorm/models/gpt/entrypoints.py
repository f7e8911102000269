"""Entry points for Megatron-LM: ``pretrain_gpt.py --spec megatron_hybridnorm.entrypoints <scheme>``.

One entry point per scheme, the same ``--spec`` on every megatron-core version:

- From 0.19, Megatron-LM's ``GPTModelBuilder`` calls it as ``fn(config, vp_stage=vp_stage)``
  with a ``GPTModelConfig``; it returns this stage's block spec, on Transformer Engine or local
  modules as ``--transformer-impl`` says.
- Before 0.19 (``compat.SPEC_CALLABLES_ARE_CALLED`` false), Megatron-LM's ``gpt_builders.py``
  hands the imported object to ``GPTModel`` as the layer spec itself. There the entry point is a
  layer ``ModuleSpec`` (still callable as above) of ``SchemeLayer``, which builds each layer from
  the scheme's spec for that layer's global position, so HybridNorm*'s first block and Mix-LN's
  layers are right under any pipeline split. megatron-core then adds its own final norm
  (``transformer_block.LayerNormImpl``: TE's, Apex's or torch's, whichever is installed); the
  start-up line names it.

Scheme options come from the environment, because ``--spec`` passes no arguments:

    HYBRIDNORM_QKV_NORM=full         Q/K/V norms over all heads (default: the scheme's own:
                                     head, the paper's; full for olmo2)
    HYBRIDNORM_MIXLN_FRACTION=0.5    Mix-LN's fraction of Post-Norm layers (default 0.25)
    HYBRIDNORM_TE_FFN_NORM=fused_add on Transformer Engine, the pre-MLP norm whose output is the
                                     residual: te (default), fused_add or in_linear

An option that does not apply to the chosen scheme is reported on rank 0 and not used, so one
environment can serve a HybridNorm run and its Pre-Norm baseline. Megatron-LM before 0.20 logs an
import failure of a ``--spec`` module and silently builds its default Pre-Norm model: look for
the line ``megatron-hybridnorm: built ...`` at start-up, or check a checkpoint with
``python -m megatron_hybridnorm.inspect CHECKPOINT``. When ``--load`` holds a checkpoint of
another scheme, the entry point refuses to build, before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import LayerNormImpl

from megatron_hybridnorm import compat
from megatron_hybridnorm.compat import SPEC_CALLABLES_ARE_CALLED
from megatron_hybridnorm.models.detection import checkpoint_folder, detect_checkpoint
from megatron_hybridnorm.models.spec_names import name_the_schemes
from megatron_hybridnorm.transformer.validate import SchemeConfigError, SchemeMismatchError
from megatron_hybridnorm.transformer.layer import HybridTransformerLayer
from megatron_hybridnorm.schemes import SCHEMES, Scheme, get_scheme
from megatron_hybridnorm.models.gpt.specs import get_decoder_block_spec

ENV_OPTIONS = {
    "HYBRIDNORM_QKV_NORM": ("qkv_norm", str),
    "HYBRIDNORM_MIXLN_FRACTION": ("mixln_fraction", float),
    "HYBRIDNORM_TE_FFN_NORM": ("te_ffn_norm", str),
}
ENV_RUNTIME = ("HYBRIDNORM_KERNELS",)  # read by each norm and attention as the model builds


def options_from_env(scheme: Scheme, environ=os.environ) -> tuple[dict, list[str]]:
    """(options for ``scheme``, notes about environment options it does not use)."""
    known = (*ENV_OPTIONS, *ENV_RUNTIME)
    unknown = [k for k in environ if k.startswith("HYBRIDNORM_") and k not in known]
    if unknown:
        raise ValueError(f"unknown {', '.join(sorted(unknown))}; megatron-hybridnorm reads "
                         f"{', '.join(known)}")
    takes = scheme.option_defaults()
    options, notes = {}, []
    for var, (option, cast) in ENV_OPTIONS.items():
        if var not in environ:
            continue
        try:
            value = cast(environ[var])
        except ValueError:
            raise ValueError(f"{var}={environ[var]!r} is not a {cast.__name__}") from None
        if option in takes:
            options[option] = value
        else:
            notes.append(f"{var} does not apply to {scheme.name} and is not used")
    return options, notes


def _megatron_lm_args():
    """Megatron-LM's parsed arguments, when the entry point runs inside Megatron-LM."""
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError):  # not in Megatron-LM, or its args are not set
        return None


def _megatron_lm_load_path() -> str | None:
    """Megatron-LM's --load, when the entry point runs inside Megatron-LM."""
    return getattr(_megatron_lm_args(), "load", None)


def untested_notes(scheme: Scheme, config, args) -> list[str]:
    """Switches this package has not run with, said at start-up."""
    fsdp = [flag for flag in ("use_megatron_fsdp", "use_torch_fsdp2") if getattr(args, flag, False)]
    if fsdp and scheme.has_head_norms and config.tensor_model_parallel_size > 1:
        return [f"--{fsdp[0].replace('_', '-')} with tensor parallelism is untested with this "
                "scheme's per-head norms (their TP gradient sum relies on megatron-core's "
                "finalize_model_grads, which handles it for FSDP too; megatron-core 0.19.2's "
                "FSDP paths need CUDA and did not run on this project's CPU test machines)"]
    return []


def check_load_matches(scheme: Scheme, options: dict, path: str | None,
                       module: str = "megatron_hybridnorm.entrypoints",
                       normalization: str | None = None) -> list[str]:
    """Refuse, before the model exists, to resume a checkpoint of another scheme; returns notes
    for the start-up line (a checkpoint whose scheme cannot be read before loading).

    megatron-core's loader writes some tensors into the model in place before it finds the
    missing norm keys, so a mismatch must be caught before loading starts.
    """
    if not path:
        return []
    try:
        found = detect_checkpoint(path)
        check_load_format(path)
    except FileNotFoundError:
        folder = Path(path)
        if not folder.is_dir() or not any(folder.iterdir()):
            return []  # nothing saved there yet: a fresh run
        return [f"--load {path} holds no dist checkpoint (--ckpt-format torch?), so its norm "
                "scheme is not checked before loading; a checkpoint of another scheme then fails "
                "in Megatron's loader with missing or unexpected norm keys. Dist checkpoints "
                "(--ckpt-format torch_dist) are checked, and named by "
                "python -m megatron_hybridnorm.inspect"]
    why = found.mismatch(scheme, options.get("qkv_norm", scheme.qkv_norm),
                         scheme.num_head_layers(found.num_blocks, options.get("mixln_fraction")),
                         normalization)
    if why:
        raise SchemeMismatchError(
            f"--load {path} {why}, which --spec {module} {scheme.name} builds: pass the "
            "checkpoint's scheme (and --normalization), or another --load")
    return []


def check_load_format(path: str) -> None:
    """Refuse, before the model exists, a checkpoint whose format this megatron-core cannot read
    (saved on 0.19 or later, resumed on 0.16 to 0.18): their loader fails on it deep inside with
    a bare FileNotFoundError for common.pt."""
    folder = checkpoint_folder(Path(path))
    if not compat.COMMON_STATE_IN_SHARDS and not (folder / compat.COMMON_STATE_FILE).is_file():
        raise CheckpointFormatError(
            f"--load {path}: {folder.name} was saved by megatron-core 0.19 or later (its common "
            f"state inside the shards, no {compat.COMMON_STATE_FILE}), which this megatron-core "
            f"({compat.VERSION}) cannot read: resume it on megatron-core >= 0.19 (checkpoints "
            "load on newer versions, not on older ones)")


class CheckpointFormatError(RuntimeError):
    """A --load checkpoint in a format this megatron-core cannot read."""


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def check_megatron_lm_config(scheme: Scheme, config) -> None:
    """What Megatron-LM would get wrong silently around a --spec, refused before it builds."""
    if getattr(config, "mtp_num_layers", None):
        raise SchemeConfigError(
            f"norm scheme {scheme.name!r}: Megatron-LM (0.16 to 0.20) builds "
            "multi-token-prediction layers from its default Pre-Norm spec, not from --spec, so "
            "they would not be this scheme's; "
            "unset --mtp-num-layers (in your own code, pass GPTModel an mtp_block_spec built "
            "from megatron_hybridnorm.get_layer_spec)")
    if config.normalization == "DyT" and not SPEC_CALLABLES_ARE_CALLED:
        raise SchemeConfigError(
            f"norm scheme {scheme.name!r}: normalization DyT, but before 0.19 Megatron-LM adds its "
            "own final norm around a --spec layer (TE's, Apex's or torch's), which has no DyT; "
            "use megatron-core 0.19 or later, or RMSNorm/LayerNorm (--normalization)")


def start_up_line(scheme: Scheme, options: dict, use_te: bool, what: str, notes: list[str],
                  model: str = "") -> None:
    """Rank 0's ``megatron-hybridnorm: built <scheme> ...`` line and its notes: the proof that
    Megatron-LM imported this --spec and did not fall back to its default model."""
    if _rank0():
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"megatron-hybridnorm: built {scheme.name}{f' ({shown})' if shown else ''}{model} on "
              f"{'transformer_engine' if use_te else 'local'} modules, {what}", flush=True)
        for note in notes:
            print(f"megatron-hybridnorm: {note}", flush=True)


def from_megatron_lm(scheme: Scheme, config, module: str) -> tuple[bool, dict, list[str]]:
    """(use_te, options, notes) of an entry point inside Megatron-LM, the GPT's and the hybrid
    stack's alike: the backend from --transformer-impl, the options from the environment, a
    --load of another scheme refused, the switches this package has not run with noted."""
    use_te = getattr(config, "transformer_impl", "transformer_engine") == "transformer_engine"
    options, notes = options_from_env(scheme)
    notes = notes + check_load_matches(scheme, options, _megatron_lm_load_path(), module,
                                       getattr(config, "normalization", None))
    notes = notes + untested_notes(scheme, config, _megatron_lm_args())
    return use_te, options, notes


def _stage_spec(scheme: Scheme, config, vp_stage: int | None):
    """(this stage's block spec, options, notes, use_te), the checks done."""
    check_megatron_lm_config(scheme, config)
    use_te, options, notes = from_megatron_lm(scheme, config, "megatron_hybridnorm.entrypoints")
    spec = get_decoder_block_spec(
        config, scheme, use_transformer_engine=use_te, vp_stage=vp_stage, **options
    )
    return spec, options, notes, use_te


def _megatron_final_norm(config):
    """The final norm megatron-core builds for a layer spec before 0.19, refused where it
    cannot run this configuration."""
    name = LayerNormImpl.__name__
    if name == "WrappedTorchNorm" and (config.sequence_parallel or config.persist_layer_norm):
        raise SchemeConfigError(
            "with this megatron-core's Megatron-LM, the final norm after a --spec layer spec is "
            "megatron-core's WrappedTorchNorm (no Transformer Engine or Apex installed), which "
            "refuses --sequence-parallel and persist_layer_norm: pass --no-persist-layer-norm "
            "and drop --sequence-parallel, or install Transformer Engine")
    return name


_STAGES = {}  # (id(config), vp_stage) -> (config, _stage_spec(...)): once per stage, not per layer


class SchemeLayer(HybridTransformerLayer):
    """The layer of a scheme at its global position, for Megatron-LM before 0.19 (see the module
    docstring). Constructing one returns the ``HybridTransformerLayer`` that the scheme's block
    spec has at that position (``__new__`` returns it, so this class never has instances)."""

    def __new__(cls, config, *args, scheme: Scheme, layer_number: int = 1,
                vp_stage: int | None = None, **kwargs):
        key = (id(config), vp_stage)
        if layer_number == 1 or _STAGES.get(key, (None,))[0] is not config:
            _STAGES[key] = (config, _stage_spec(scheme, config, vp_stage))
        spec, options, notes, use_te = _STAGES[key][1]
        if layer_number == 1:
            final = _megatron_final_norm(config)
            start_up_line(scheme, options, use_te,
                           f"{len(spec.layer_specs)} layers on this stage"
                           f"{'' if vp_stage is None else f' (vp_stage {vp_stage})'}, final norm "
                           f"megatron-core's {final} (a --spec layer spec before megatron-core "
                           "0.19)", notes)
        return build_module(spec.layer_specs[layer_number - 1], config, *args,
                            layer_number=layer_number, vp_stage=vp_stage, **kwargs)


def _layer_spec_entry_point(scheme: Scheme, build):
    """A ``ModuleSpec`` of ``SchemeLayer`` that can also be called like ``build``."""
    class EntryPointSpec(ModuleSpec):
        def __call__(self, config, vp_stage: int | None = None):
            return build(config, vp_stage=vp_stage)

    EntryPointSpec.__name__ = EntryPointSpec.__qualname__ = f"EntryPointSpec[{scheme.name}]"
    spec = EntryPointSpec(module=SchemeLayer, params={"scheme": scheme})
    spec.__name__, spec.__doc__ = build.__name__, build.__doc__
    return spec


def _make(name: str):
    scheme = get_scheme(name)  # resolved once: what it calls below takes the Scheme

    def build(config, vp_stage: int | None = None):
        spec, options, notes, use_te = _stage_spec(scheme, config, vp_stage)
        start_up_line(scheme, options, use_te,
                       f"{len(spec.layer_specs)} layers on this stage"
                       f"{'' if vp_stage is None else f' (vp_stage {vp_stage})'}", notes)
        return spec

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Megatron-LM --spec entry point for {name}: {scheme.summary}"
    return build if SPEC_CALLABLES_ARE_CALLED else _layer_spec_entry_point(scheme, build)


# one module attribute per scheme, the name --spec gives: prenorm, ..., hybridnorm_star
ENTRY_POINTS = {s: _make(s) for s in SCHEMES}
globals().update(ENTRY_POINTS)
name_the_schemes(__name__, ENTRY_POINTS)
