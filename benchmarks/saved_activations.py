"""Bytes each block keeps for its backward, per token and layer: Pre-Norm against HybridNorm.

    python benchmarks/saved_activations.py          # any machine; on a CPU, TRITON_INTERPRET=1

Activation memory is what the backward keeps alive, and which tensors autograd saves does not
depend on the device: this counts them (unique storages, parameters excluded) with
``torch.autograd.graph.saved_tensors_hooks`` on the paper's 1.2B layer shapes (d 2048, 32 / 8
heads, SwiGLU 8192, bf16) for Pre-Norm and HybridNorm, with torch norms and with the kernels.
What the core attention saves depends on its kernel (flash on a GPU keeps q, k, v, the output
and one fp32 per row and head; the CPU's math kernel keeps the probabilities), so it is counted
apart and left out of the comparison. The GPU benchmark (bench_norms.py) measures peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from pathlib import Path

import torch

SHAPE = dict(hidden=2048, heads=32, groups=8, ffn=8192)


def saved_bytes(scheme: str, mode: str, seq: int, layers: int) -> dict:
    import torch.nn.functional as F
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    import megatron_hybridnorm as mh

    os.environ["HYBRIDNORM_KERNELS"] = mode
    s = SHAPE
    cfg = TransformerConfig(
        num_layers=layers, hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], ffn_hidden_size=s["ffn"], gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False, bf16=True,
        params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=True)
    block = TransformerBlock(cfg, mh.get_decoder_block_spec(cfg, scheme))
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    rope = RotaryEmbedding(kv_channels=s["hidden"] // s["heads"], rotary_percent=1.0,
                           rotary_base=500000)(seq)
    x = torch.randn(seq, 1, s["hidden"], dtype=torch.bfloat16, requires_grad=True)

    inside_attention = [False]
    for m in block.modules():
        if type(m).__name__ == "SDPAttention":
            m.register_forward_pre_hook(lambda *_: inside_attention.__setitem__(0, True))
            m.register_forward_hook(lambda *_: inside_attention.__setitem__(0, False))
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            key = "core_attention" if inside_attention[0] else "rest"
            seen.setdefault(st.data_ptr(), (key, st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, attention_mask=None, rotary_pos_emb=rope)
    del out
    per = seq * layers
    total = {k: sum(n for kk, n in seen.values() if kk == k) / per
             for k in ("rest", "core_attention")}
    return dict(bytes_per_token_layer=total["rest"],
                core_attention_bytes_per_token_layer=total["core_attention"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        p.exit(2, "on a CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1\n")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from launcher import Parallel, init_rank  # the tests' launcher (not in the wheel)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_rank(0, 1, port, Parallel(), seed=0)
    rows = {f"{scheme}_{mode}": saved_bytes(scheme, mode, args.seq, args.layers)
            for scheme in ("prenorm", "hybridnorm") for mode in ("torch", "triton")}
    base = rows["prenorm_torch"]["bytes_per_token_layer"]
    for r in rows.values():
        r["over_prenorm_torch"] = r["bytes_per_token_layer"] / base
        r["in_hidden_vectors"] = r["bytes_per_token_layer"] / (2 * SHAPE["hidden"])  # bf16
    print(f"{'':20s} {'bytes/token/layer':>18s} {'hidden vectors':>15s} {'/ Pre-Norm':>11s}"
          f" {'(+ core attention)':>19s}")
    for name, r in rows.items():
        print(f"{name:20s} {r['bytes_per_token_layer']:18.0f} {r['in_hidden_vectors']:15.2f} "
              f"{r['over_prenorm_torch']:11.3f} {r['core_attention_bytes_per_token_layer']:19.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(shape=SHAPE, seq=args.seq, layers=args.layers, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
