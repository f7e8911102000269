"""Megatron dist checkpoints to Hugging Face folders, and back.

Export reads a checkpoint of any scheme saved at any TP/PP layout (Megatron reshards it into a
one-rank model on the CPU), written by ``hybridnorm-train`` (the run's ``config.json`` gives the
architecture) or by Megatron-LM's ``pretrain_gpt.py`` (its saved arguments do), and writes
``config.json`` (the per-layer norm layout from the scheme table), ``model.safetensors`` (fp32),
``modeling_hybridnorm.py`` and, where the run had one, the tokenizer. Import writes an exported
folder back as a Megatron-LM checkpoint (``release``, torch_dist, model only), which Megatron
loads at any TP/PP layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_hybridnorm.models.detection import check_checkpoint, checkpoint_folder, detect_checkpoint
from megatron_hybridnorm.hf.architecture import Architecture, ExportError, run_config_of
from megatron_hybridnorm.harness.dist import setup
from megatron_hybridnorm.norms.names import DEPTH_SCALE, RESIDUAL_SCALE
from megatron_hybridnorm.hf.tokenizer import byte_level_tokenizer

MODELING = Path(__file__).with_name("modeling_hybridnorm.py")
AUTO_MAP = {"AutoConfig": "modeling_hybridnorm.HybridNormConfig",
            "AutoModelForCausalLM": "modeling_hybridnorm.HybridNormForCausalLM"}


def one_rank() -> None:
    """A world of one with Megatron's parallel state (TP = PP = 1), unless one is set up."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1):
            raise ExportError("export and import run at one rank: call them outside a "
                              "tensor- or pipeline-parallel run")
        return

    setup(tp=1, pp=1, seed=0)


def architecture_of(folder: Path) -> tuple[Architecture, object, dict | None]:
    """(architecture, Megatron-LM's args or None, the hybridnorm-train run's config or None)."""
    from megatron.core import dist_checkpointing

    finding = detect_checkpoint(folder)
    if finding.scheme is None:
        raise ExportError(f"{folder}: {finding}")
    common = dist_checkpointing.load_common_state_dict(str(folder))
    args = common.get("args") if isinstance(common, dict) else None
    run = None
    imported = [p / "megatron_architecture.json" for p in list(folder.parents)[:2]
                if (p / "megatron_architecture.json").is_file()]
    if args is not None:
        arch = Architecture.from_megatron_lm_args(args, finding.scheme)
    elif imported:  # written by import_hf
        arch = Architecture(**json.loads(imported[0].read_text()))
    else:
        run = run_config_of(folder)
        if run is None:
            raise ExportError(f"{folder}: neither Megatron-LM's saved arguments nor the "
                              "config.json of a hybridnorm-train run above it: cannot tell the "
                              "architecture")
        arch = Architecture.from_hybridnorm_train(run, finding.scheme)
    arch.qkv_norm = finding.qkv_norm or arch.qkv_norm  # (None: the scheme has no Q/K/V norms)
    arch.mixln_fraction = finding.mixln_fraction
    return arch, args, run


def load_megatron(folder: Path, arch: Architecture):
    """The checkpoint in a one-rank Megatron model on the CPU."""
    from megatron.core import dist_checkpointing

    one_rank()
    model = arch.megatron_model()
    check_checkpoint(model, folder)
    sharded = {"model": model.sharded_state_dict()}
    _refuse_unexpected_model_keys(folder, sharded)
    state = dist_checkpointing.load(sharded, str(folder))
    model.load_state_dict(state["model"])
    return model.eval()


# the model's tensors in a dist checkpoint (beside them: optimizer state, RNG and common state)
MODEL_KEYS = ("embedding.", "decoder.", "output_layer.", "mtp.")


def _refuse_unexpected_model_keys(folder: Path, sharded: dict) -> None:
    """megatron-core's load leaves out what the model does not ask for (a stored QKV bias, say):
    the export would silently compute another model. Refuse instead, naming the keys."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from torch.distributed.checkpoint import FileSystemReader

    stored = {k.split("/")[0] for k in FileSystemReader(str(folder)).read_metadata()
              .state_dict_metadata}
    wanted = {getattr(v, "key", "").split("/")[0] for v in nested_values(sharded)}
    unexpected = sorted(k for k in stored - wanted if k.startswith(MODEL_KEYS))
    if unexpected:
        raise ExportError(f"{folder} holds model tensors this architecture has no place for "
                          f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}):"
                          " the export would leave them out and compute another model; it is "
                          "not exported")


def _derived(key: str) -> bool:
    """What each side rebuilds from the layout and is not exported: the layers' saved norm
    layout and the scale buffers of LayerNorm Scaling and DeepNorm."""
    return key.endswith(("_extra_state", f".{DEPTH_SCALE}", f".{RESIDUAL_SCALE}"))


def export(checkpoint, out) -> Path:
    """Write the Hugging Face folder ``out`` for a Megatron checkpoint; returns ``out``."""
    from safetensors.torch import save_file

    # here, not at the top (as safetensors): the [hf] extra's transformers
    from megatron_hybridnorm.hf.modeling_hybridnorm import HybridNormConfig

    folder = checkpoint_folder(Path(checkpoint))
    arch, args, run = architecture_of(folder)
    model = load_megatron(folder, arch)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not _derived(k)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    HybridNormConfig(**arch.hf_config(auto_map=AUTO_MAP,
                                      architectures=["HybridNormForCausalLM"],
                                      torch_dtype="float32")).save_pretrained(out)
    shutil.copy(MODELING, out / MODELING.name)
    _write_tokenizer(out, args, run)
    return out


def _write_tokenizer(out: Path, args, run) -> None:
    if run is not None and run.get("args", {}).get("data_path") is None:  # byte-level text

        byte_level_tokenizer().save_pretrained(out)
    elif args is not None and getattr(args, "tokenizer_type", None) == "HuggingFaceTokenizer":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer_model).save_pretrained(out)
    else:
        kind = getattr(args, "tokenizer_type", None) if args is not None else "--data-path"
        print(f"megatron-hybridnorm: no tokenizer written ({kind}); put the run's tokenizer "
              f"in {out} to use it with text", flush=True)


def import_hf(folder, out) -> Path:
    """Write an exported Hugging Face folder back as a Megatron-LM checkpoint under ``out``
    (``release/``, model only); returns ``out``."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    arch = Architecture.from_hf_config(config)
    one_rank()
    model = arch.megatron_model()
    weights = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _derived(k)]
    if missing or unexpected:
        raise ExportError(f"{folder} does not fit a {arch.scheme} model: missing {missing}, "
                          f"unexpected {unexpected}")
    out = Path(out)
    (out / "release").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0,
                             "iteration": 0}, str(out / "release"))
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    (out / "megatron_architecture.json").write_text(json.dumps(
        config.megatron_architecture, indent=1))
    return out
