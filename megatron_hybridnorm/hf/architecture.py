"""The architecture of a checkpoint, wherever it came from: a ``hybridnorm-train`` run, a
Megatron-LM ``pretrain_gpt.py`` run, or an exported Hugging Face folder; and the Megatron model
and Hugging Face config it maps to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from megatron_hybridnorm.schemes import get_scheme
from megatron_hybridnorm.harness.gpt_config import gpt_config
from megatron_hybridnorm.models.gpt.specs import get_decoder_block_spec


class ExportError(ValueError):
    """A checkpoint this exporter cannot turn into a Hugging Face model (or back)."""


@dataclass
class Architecture:
    scheme: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # as the model holds it (padded)
    max_position_embeddings: int
    head_dim: int | None = None
    qkv_norm: str | None = None  # None: the scheme's own default
    mixln_fraction: float | None = None
    gated_linear_unit: bool = True
    activation: str = "silu"
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    zero_centered_gamma: bool = False
    add_bias_linear: bool = False
    rope_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    tied_embeddings: bool = True

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.qkv_norm = self.qkv_norm or get_scheme(self.scheme).qkv_norm

    # ---- where it comes from ----------------------------------------------------------------

    @classmethod
    def from_hybridnorm_train(cls, run_config: dict, scheme: str) -> "Architecture":
        """From a ``hybridnorm-train`` run's ``config.json``."""
        a = run_config["args"]
        tp = a.get("tp", 1)
        vocab = run_config["vocab_size"]
        vocab += (-vocab) % tp  # as the run padded it for its vocab-parallel embedding
        return cls(scheme=scheme, num_layers=a["layers"], hidden_size=a["hidden"],
                   num_attention_heads=a["heads"], num_query_groups=a["kv_heads"],
                   ffn_hidden_size=a["ffn_hidden"], vocab_size=vocab,
                   max_position_embeddings=a["seq_len"], rope_base=a["rope_base"],
                   tied_embeddings=not a["untie_embeddings"], qkv_norm=a.get("qkv_norm"),
                   mixln_fraction=a.get("mixln_fraction"),
                   normalization=a.get("normalization", "RMSNorm"))

    @classmethod
    def from_megatron_lm_args(cls, args, scheme: str) -> "Architecture":
        """From the arguments Megatron-LM saves in its checkpoints."""
        if getattr(args, "num_experts", None):
            raise ExportError("MoE models (--num-experts) are not exported: the Hugging Face "
                              "model here has dense FFNs only")
        if getattr(args, "position_embedding_type", "rope") != "rope":
            raise ExportError(f"--position-embedding-type {args.position_embedding_type}: only "
                              "RoPE models are exported")
        if getattr(args, "multi_latent_attention", False):
            raise ExportError("multi-latent attention models are not exported")
        # what the Hugging Face model here does not compute: refused, not approximated
        unsupported = [flag for flag, on in (
            ("--add-qkv-bias", getattr(args, "add_qkv_bias", False)
             and not getattr(args, "add_bias_linear", False)),
            ("--use-rope-scaling", getattr(args, "use_rope_scaling", False)),
            ("--rotary-seq-len-interpolation-factor",
             getattr(args, "rotary_seq_len_interpolation_factor", None) not in (None, 1, 1.0)),
            ("--squared-relu", getattr(args, "squared_relu", False)),
            ("--openai-gelu", getattr(args, "openai_gelu", False)),
            ("--quick-geglu", getattr(args, "quick_geglu", False)),
            ("--qk-layernorm", getattr(args, "qk_layernorm", False)
             and not get_scheme(scheme).has_head_norms),
        ) if on]
        if unsupported:
            raise ExportError(f"{', '.join(unsupported)}: the Hugging Face model here does not "
                              "compute this, so the export would give other logits; it is not "
                              "exported")
        swiglu = bool(getattr(args, "swiglu", False))
        return cls(
            scheme=scheme, num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=(args.num_query_groups if args.group_query_attention
                              else args.num_attention_heads),
            ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.padded_vocab_size,
            max_position_embeddings=args.max_position_embeddings,
            head_dim=getattr(args, "kv_channels", None),
            gated_linear_unit=swiglu, activation="silu" if swiglu else "gelu",
            normalization=args.normalization,
            # (megatron-core 0.19 names them after TransformerConfig; older Megatron-LM did not)
            norm_eps=getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)),
            zero_centered_gamma=bool(getattr(args, "layernorm_zero_centered_gamma",
                                             getattr(args, "apply_layernorm_1p", False))),
            add_bias_linear=bool(args.add_bias_linear), rope_base=args.rotary_base,
            rotary_percent=args.rotary_percent,
            rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),
            tied_embeddings=not args.untie_embeddings_and_output_weights)

    @classmethod
    def from_hf_config(cls, config) -> "Architecture":
        """From an exported folder's config (``HybridNormConfig``)."""
        arch = config.megatron_architecture if hasattr(config, "megatron_architecture") else None
        if not arch:
            raise ExportError("this config.json was not written by megatron-hybridnorm's export "
                              "(no megatron_architecture)")
        return cls(**{f.name: arch[f.name] for f in fields(cls) if f.name in arch})

    # ---- what it maps to --------------------------------------------------------------------

    def layouts(self) -> list[dict]:
        """Every layer's norm layout, from the scheme table."""
        s = get_scheme(self.scheme)
        return [{k: v for k, v in asdict(lay).items() if v}
                for lay in s.layouts(self.num_layers, self.mixln_fraction)]

    def options(self) -> dict:
        return get_scheme(self.scheme).options_from(qkv_norm=self.qkv_norm,
                                                    mixln_fraction=self.mixln_fraction)

    def transformer_fields(self) -> dict:
        """The ``TransformerConfig`` fields this architecture sets (the model configs of
        megatron-core and Megatron-Bridge both take them)."""
        import torch.nn.functional as F

        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim, ffn_hidden_size=self.ffn_hidden_size,
            gated_linear_unit=self.gated_linear_unit,
            activation_func={"silu": F.silu, "gelu": F.gelu}[self.activation],
            normalization=self.normalization, layernorm_epsilon=self.norm_eps,
            layernorm_zero_centered_gamma=self.zero_centered_gamma,
            add_bias_linear=self.add_bias_linear, rotary_interleaved=self.rotary_interleaved)

    def transformer_config(self, **overrides):
        """A one-rank TransformerConfig on the CPU, in fp32."""
        return gpt_config(**{**self.transformer_fields(), "gradient_accumulation_fusion": False,
                             "apply_rope_fusion": False, **overrides})

    def megatron_model(self, config=None):
        """A one-rank Megatron GPTModel of this architecture (parallel state set up)."""
        from megatron.core.models.gpt import GPTModel


        config = config or self.transformer_config()
        spec = get_decoder_block_spec(config, self.scheme, **self.options())
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=self.vocab_size,
                        max_sequence_length=self.max_position_embeddings,
                        position_embedding_type="rope", rotary_base=self.rope_base,
                        rotary_percent=self.rotary_percent,
                        share_embeddings_and_output_weights=self.tied_embeddings)

    def hf_config(self, **extra) -> dict:
        """``HybridNormConfig``'s arguments."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, head_dim=self.head_dim,
            intermediate_size=self.ffn_hidden_size, gated_linear_unit=self.gated_linear_unit,
            hidden_act=self.activation, normalization=self.normalization,
            norm_eps=self.norm_eps, zero_centered_gamma=self.zero_centered_gamma,
            qkv_norm=self.qkv_norm, layer_norms=self.layouts(), scheme=self.scheme,
            rope_theta=self.rope_base, rotary_percent=self.rotary_percent,
            rotary_interleaved=self.rotary_interleaved,
            max_position_embeddings=self.max_position_embeddings,
            add_bias_linear=self.add_bias_linear, tie_word_embeddings=self.tied_embeddings,
            megatron_architecture=asdict(self), **extra)


def run_config_of(checkpoint: Path) -> dict | None:
    """The ``config.json`` of the ``hybridnorm-train`` run a checkpoint folder belongs to
    (``runs/<name>/checkpoints/<scheme>/step_N``), if it is one."""
    for parent in list(checkpoint.parents)[:4]:
        candidate = parent / "config.json"
        if candidate.is_file():
            import json

            config = json.loads(candidate.read_text())
            if "args" in config and "vocab_size" in config:
                return config
    return None
