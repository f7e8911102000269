"""A scheme as the ``transformer_layer_spec`` of Megatron-Bridge's model configs.

Bridge's ``GPTModelProvider`` and its newer ``GPTModelConfig`` (built by ``GPTModelBuilder``)
both take a callable there and call it with the config (and ``vp_stage`` where the callable
accepts it) when they build each pipeline stage, so a ``SchemeLayerSpec`` builds exactly that
stage's layers. The backend follows the config's ``transformer_impl``, as Megatron-LM's
``--transformer-impl`` picks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybridnorm.models.gpt.specs import get_decoder_block_spec
from megatron_hybridnorm.schemes import SCHEMES, Scheme, resolve_scheme
from megatron_hybridnorm.transformer.validate import SchemeConfigError, check_options


def transformer_config_of(config) -> TransformerConfig:
    """The ``TransformerConfig`` inside a Bridge model config: a ``GPTModelProvider`` is one, a
    ``GPTModelConfig`` holds one as ``transformer``."""
    if isinstance(config, TransformerConfig):
        return config
    inner = vars(config).get("transformer")
    if isinstance(inner, TransformerConfig):
        return inner
    raise TypeError(f"{type(config).__name__} is neither a TransformerConfig (GPTModelProvider) "
                    "nor a model config holding one as .transformer (GPTModelConfig)")


def uses_transformer_engine(config: TransformerConfig) -> bool:
    return getattr(config, "transformer_impl", "transformer_engine") == "transformer_engine"


@dataclass(frozen=True)
class SchemeLayerSpec:
    """``transformer_layer_spec=SchemeLayerSpec("hybridnorm_star")``: this stage's decoder block
    of the scheme, on the backend the config's ``transformer_impl`` names. ``options`` are the
    scheme's (``qkv_norm``, ``mixln_fraction``, ``te_ffn_norm``), checked when it is made."""

    scheme: Scheme | str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        scheme = resolve_scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        check_options(scheme, dict(self.options))

    def __call__(self, config, vp_stage: int | None = None):
        transformer = transformer_config_of(config)
        check_bridge_config(config, self.scheme)
        return get_decoder_block_spec(
            transformer, self.scheme.name, vp_stage=vp_stage,
            use_transformer_engine=uses_transformer_engine(transformer), **self.options)

    def __repr__(self) -> str:
        shown = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"SchemeLayerSpec({self.scheme.name!r}{shown})"


def check_bridge_config(config, scheme: Scheme) -> None:
    """What Bridge's configs could ask for around our spec that the spec would not give, refused
    by name. (``get_decoder_block_spec`` checks the TransformerConfig itself.)"""
    transformer = transformer_config_of(config)

    def fail(msg: str):
        raise SchemeConfigError(f"norm scheme {scheme.name!r} in Megatron-Bridge: {msg}")

    for flag, why in (
        ("use_transformer_engine_full_layer_spec",
         "builds Transformer Engine's whole TransformerLayer instead of the layer spec"),
        ("restore_modelopt_state", "builds ModelOpt's layer spec instead of the layer spec"),
        ("use_transformer_engine_op_fuser", "is read by Bridge's default TE spec only"),
    ):
        if getattr(config, flag, False):
            fail(f"{flag}=True {why}, so the scheme's norms would not be built; unset it")
    if not uses_transformer_engine(transformer):
        te_only = [name for name in ("fp8", "fp4") if getattr(transformer, name, None)]
        if getattr(transformer, "use_te_rng_tracker", False):
            te_only.append("use_te_rng_tracker")
        if te_only:
            fail(f"{', '.join(te_only)} need Transformer Engine's modules, but transformer_impl="
                 f"{transformer.transformer_impl!r} builds the local ones; set transformer_impl="
                 "'transformer_engine', or unset them")
    if getattr(config, "mtp_num_layers", None):
        fail("Bridge builds multi-token-prediction layers from its own spec, not from this one, "
             "so they would not be this scheme's; unset mtp_num_layers")


# one callable per scheme, with its default options: ``SCHEME_LAYER_SPECS["hybridnorm_star"]``
SCHEME_LAYER_SPECS = {name: SchemeLayerSpec(name) for name in SCHEMES}
