"""Layer and block specs for Megatron-Core, built from the scheme tables in ``schemes.py``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_hybridnorm.transformer.attention import QKVNormSelfAttention, QKVNormSelfAttentionSubmodules
from megatron_hybridnorm.compat import dense_mlp_spec
from megatron_hybridnorm.transformer.core_attention import SDPAttention
from megatron_hybridnorm.transformer.layer import HybridTransformerLayer, HybridTransformerLayerSubmodules
from megatron_hybridnorm.norms import FullWidthNorm, HeadNorm, Norm, PostNorm
from megatron_hybridnorm.norms.names import norm_checkpoint_prefix, norm_module_prefix
from megatron_hybridnorm.norms.te import InterchangeableTENorm, TEPostNorm, te_norm_linear_keeping_norm
from megatron_hybridnorm.schemes import OPTION_DEFAULTS, LayerNorms, Scheme, resolve_scheme
from megatron_hybridnorm.transformer.validate import SchemeConfigError, check_config, check_options


def _head_norms(qkv_norm: str):
    """Builders for the q norm and the k/v norms (ours on both backends, see norms/te.py)."""
    if qkv_norm == "full":
        return partial(FullWidthNorm, spans="query"), partial(FullWidthNorm, spans="kv")
    return HeadNorm, HeadNorm


@dataclass(frozen=True)
class Backend:
    """Which modules fill the slots. TE fuses a pre-norm into the linear that follows it."""

    provider: object  # megatron-core's BackendSpecProvider
    norm: object
    post_norm: object
    core_attention: object
    fuses_norm_into_linear: bool


def backend(use_transformer_engine: bool) -> Backend:
    if not use_transformer_engine:
        return Backend(LocalSpecProvider(), Norm, PostNorm, SDPAttention, False)
    if not HAVE_TE:
        raise SchemeConfigError(
            "use_transformer_engine=True needs Transformer Engine, which is not installed: "
            "pip install 'megatron-hybridnorm[te]', or build with use_transformer_engine=False "
            "(in Megatron-LM: --transformer-impl local)"
        )
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return Backend(TESpecProvider(), InterchangeableTENorm, TEPostNorm, TEDotProductAttention,
                   True)


def get_layer_spec(
    scheme: Scheme | str | LayerNorms,
    *,
    first_block: bool = False,
    qkv_norm: str | None = None,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    use_transformer_engine: bool = False,
    te_ffn_norm: str | None = None,
    use_te_activation_func: bool = False,
) -> ModuleSpec:
    """One layer's spec. ``scheme`` is a scheme (or its name) or a ``LayerNorms`` layout; an
    option left None is the scheme's default (``Scheme.option_defaults``; a bare layout's:
    ``schemes.OPTION_DEFAULTS``), so ``get_layer_spec("olmo2")`` has OLMo 2's full-width norms.

    ``first_block`` picks the scheme's layout for its first layers (HybridNorm*'s block 0,
    Mix-LN's Post-Norm layers). On Transformer Engine, a pre-norm is fused into the linear
    that follows it (``TELayerNormColumnParallelLinear``). A pre-MLP norm whose output is also
    the residual is, by ``te_ffn_norm``: "te", a separate TE norm; "fused_add", this package's
    norm with the residual add fused in (Triton); "in_linear", inside the FFN's first linear,
    which hands its norm output over as the residual (dense FFNs only). Checkpoints name it
    ``pre_mlp_layernorm`` in all three. ``use_te_activation_func``: TE's activation module in
    the FFN, as Megatron's own specs do with ``config.use_te_activation_func``.
    """
    if isinstance(scheme, LayerNorms):
        lay, defaults = scheme, OPTION_DEFAULTS
    else:
        s = resolve_scheme(scheme)
        lay = s.head if first_block and s.head is not None else s.body
        defaults = {**OPTION_DEFAULTS, **s.option_defaults()}
    qkv_norm = qkv_norm or defaults["qkv_norm"]
    te_ffn_norm = te_ffn_norm or defaults["te_ffn_norm"]
    b = backend(use_transformer_engine)
    p = b.provider
    q_norm, kv_norm = _head_norms(qkv_norm)
    # TE's fused norm-linear cannot scale its norm's output: LayerNorm Scaling's norms are ours
    fuses = b.fuses_norm_into_linear and not lay.depth_scaled
    feed_norm = Norm if lay.depth_scaled else b.norm
    fuse_input = lay.input and not lay.input_is_residual and fuses
    fuse_pre_mlp = (lay.pre_mlp and not lay.pre_mlp_is_residual and num_experts is None
                    and fuses)
    residual_norm = lay.pre_mlp_is_residual and b.fuses_norm_into_linear
    norm_in_linear = residual_norm and te_ffn_norm == "in_linear"
    if norm_in_linear and num_experts is not None:
        raise SchemeConfigError('te_ffn_norm="in_linear" needs a dense FFN; this layer is MoE')
    if num_experts is None:
        fc1 = p.column_parallel_linear()
        if fuse_pre_mlp:
            fc1 = p.column_parallel_layer_norm_linear()
        elif norm_in_linear:
            fc1 = te_norm_linear_keeping_norm()
        mlp = dense_mlp_spec(MLPSubmodules(
            linear_fc1=fc1, linear_fc2=p.row_parallel_linear(),
            activation_func=p.activation_func() if use_te_activation_func else None))
    else:  # the router and the experts see the pre-MLP norm's output
        mlp = get_moe_module_spec_for_backend(
            backend=p, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
            use_te_activation_func=use_te_activation_func,
        )
    if not lay.pre_mlp or fuse_pre_mlp or norm_in_linear:
        pre_mlp = IdentityOp
    elif residual_norm and te_ffn_norm == "fused_add":
        pre_mlp = PostNorm
    else:
        pre_mlp = b.post_norm if lay.pre_mlp_is_residual else feed_norm
    # the checkpoint names: where a module holds a norm under another name than the one it is
    # saved under (norm_checkpoint_prefix), say so; TE's fused linears hold it there already
    moe = num_experts is not None
    held = {"input": None if fuse_input else norm_module_prefix("input"),
            "pre_mlp": (None if fuse_pre_mlp else "mlp.linear_fc1.layer_norm_" if norm_in_linear
                        else norm_module_prefix("pre_mlp"))}
    keys_map = {module: norm_checkpoint_prefix(lay, slot, moe) for slot, module in held.items()
                if getattr(lay, slot) and module is not None
                and module != norm_checkpoint_prefix(lay, slot, moe)}
    return ModuleSpec(
        module=HybridTransformerLayer,
        params={"norms": lay},
        submodules=HybridTransformerLayerSubmodules(
            input_layernorm=(b.post_norm if lay.input_is_residual
                             else feed_norm if lay.input and not fuse_input else IdentityOp),
            self_attention=ModuleSpec(
                module=QKVNormSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=QKVNormSelfAttentionSubmodules(
                    linear_qkv=(p.column_parallel_layer_norm_linear() if fuse_input
                                else p.column_parallel_linear()),
                    core_attention=b.core_attention,
                    linear_proj=p.row_parallel_linear(),
                    q_layernorm=q_norm if lay.q else None,
                    k_layernorm=kv_norm if lay.k else None,
                    v_layernorm=kv_norm if lay.v else None,
                ),
            ),
            self_attn_output_layernorm=b.norm if lay.attn_output else IdentityOp,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp,
            mlp=mlp,
            mlp_output_layernorm=b.norm if lay.mlp_output else IdentityOp,
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=b.norm if lay.post_mlp else IdentityOp,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _moe_pattern(config: TransformerConfig) -> list[bool]:
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(
            f"moe_layer_freq has {len(freq)} entries for num_layers={config.num_layers}"
        )
    return [bool(f) for f in freq]


def stage_layer_ids(
    config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> list[int]:
    """The global (0-based) layer ids built on this pipeline stage, as Megatron assigns them."""
    if pp_rank is None and config.pipeline_model_parallel_size == 1:
        pp_rank = 0  # no pipeline: no need for an initialized parallel state
    if config.pipeline_model_parallel_layout is not None:
        return list(
            config.pipeline_model_parallel_layout.get_layer_id_list(
                layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
            )
        )
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + n))


def get_decoder_block_spec(
    config: TransformerConfig,
    scheme: str | Scheme,
    *,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    **options,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage for ``scheme``: pass it to ``GPTModel`` as
    ``transformer_layer_spec``.

    For schemes whose layers differ (hybridnorm_star, mixln, mixln_official) this sets
    ``config.hetereogenous_dist_checkpoint`` (see below); build the model with the same config.

    Options: ``qkv_norm`` ("head", the paper's per-head norms, or "full": over all heads, exact
    at any TP size) for schemes with Q/K/V norms; ``mixln_fraction`` (0.25) for Mix-LN;
    ``te_ffn_norm`` ("te", "fused_add" or "in_linear", see ``get_layer_spec``) on Transformer
    Engine for schemes whose pre-MLP norm output is the residual.
    """
    s = resolve_scheme(scheme)
    opts = check_options(s, options)
    layouts = s.layouts(config.num_layers, opts.get("mixln_fraction"))
    check_config(config, s, layouts, opts, use_transformer_engine)
    if len(set(layouts)) > 1:
        # Megatron's dist checkpoints stack layers into one tensor per parameter name, which
        # needs every layer to hold the same parameters. HybridNorm* and Mix-LN layers differ,
        # so key each layer separately, as Megatron does for mixed dense/MoE layers.
        config.hetereogenous_dist_checkpoint = True
    moe = _moe_pattern(config)
    specs = {}

    def spec_for(layer_id: int) -> ModuleSpec:
        key = (layouts[layer_id], moe[layer_id])
        if key not in specs:
            specs[key] = get_layer_spec(
                layouts[layer_id],
                qkv_norm=opts.get("qkv_norm"),
                num_experts=config.num_moe_experts if moe[layer_id] else None,
                moe_grouped_gemm=config.moe_grouped_gemm,
                use_transformer_engine=use_transformer_engine,
                te_ffn_norm=opts.get("te_ffn_norm"),
                use_te_activation_func=config.use_te_activation_func,
            )
        return specs[key]

    ids = stage_layer_ids(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[spec_for(i) for i in ids], layer_norm=backend(use_transformer_engine).norm
    )
