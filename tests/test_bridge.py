"""Megatron-Bridge (0.6.2) with the schemes: its two model configs build every scheme as our own
spec builder does, a recipe's ConfigContainer takes a scheme in one call and refuses what we
refuse, ``pretrain()`` trains the example recipe and resumes to the same losses, TP=2 and PP=2
step through its provider, and AutoBridge converts every scheme our HF export supports both
ways, bit for bit, with the source model's logits.

These run where Megatron-Bridge is installed: CI's Bridge leg (scripts/bridge_venv.sh). On a
machine without Transformer Engine, tests/bridge_shim.py stands in for the two imports Bridge
cannot do without it (see docs/testing.md)."""

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("megatron.bridge") is None:
    pytest.skip("Megatron-Bridge is not installed in this interpreter (CI's Bridge leg installs "
                "it: scripts/bridge_venv.sh)", allow_module_level=True)

import bridge_shim  # noqa: E402

bridge_shim.import_bridge()

import megatron_hybridnorm as mh  # noqa: E402
import megatron_hybridnorm.bridge as mb  # noqa: E402
from bridge_cases import CPU, bridge_layouts_match_hf, megatron_from_hf  # noqa: E402
from megatron_hybridnorm.hf import convert  # noqa: E402
from megatron_hybridnorm.hf.architecture import Architecture, ExportError  # noqa: E402
from megatron_hybridnorm.hf.tokenizer import byte_level_tokenizer  # noqa: E402
from megatron_hybridnorm.hf.modeling_hybridnorm import (  # noqa: E402
    HybridNormConfig,
    HybridNormForCausalLM,
)
from launcher import Parallel, run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
# every scheme; DyT where its norms differ most; the other Q/K/V span; LayerNorm's biases
VARIANTS = ([(s, {}) for s in mh.SCHEMES]
            + [(s, dict(normalization="DyT")) for s in ("hybridnorm_star", "periln", "deepnorm")]
            + [("hybridnorm", dict(qkv_norm="full")), ("olmo2", dict(qkv_norm="head")),
               ("hybridnorm_star", dict(normalization="LayerNorm"))])


def variant_id(v):
    return v[0] + "".join(f"-{x}" for x in v[1].values())


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tokens(b=2, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (b, n), generator=g)


def hf_folder(tmp: Path, scheme: str, seed: int = 0, **arch) -> Path:
    """An exported-style HF folder of random weights (norms away from 1, DyT's alphas from
    0.5), as a model trained a while would have them."""
    a = Architecture(scheme=scheme, **{**SMALL, **arch})
    config = HybridNormConfig(**a.hf_config(auto_map=convert.AUTO_MAP,
                                            architectures=["HybridNormForCausalLM"],
                                            torch_dtype="float32"))
    torch.manual_seed(seed)
    model = HybridNormForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp / f"hf-{scheme}"
    model.save_pretrained(folder)
    shutil.copy(convert.MODELING, folder / convert.MODELING.name)
    byte_level_tokenizer().save_pretrained(folder)  # as the export writes for byte-level runs
    return folder


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                dtype=torch.float32).eval()


def logits(model, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    with torch.no_grad():
        return model.eval()(x, pos, None)


def reference_model(arch: Architecture, state: dict):
    """The same architecture from our own spec builder (``Architecture.megatron_model``),
    holding ``state``: the independent build the Bridge paths are compared with."""
    model = arch.megatron_model()
    model.load_state_dict(state)
    return model


# ---- the two model configs ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_the_provider_and_the_builder_build_every_scheme(megatron_single_rank, scheme):
    from megatron.bridge.models.gpt.gpt_builder import GPTModelBuilder, GPTModelConfig
    from megatron.core.process_groups_config import ProcessGroupCollection

    arch = Architecture(scheme=scheme, **SMALL)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    provider = mb.provider_for(arch, **CPU, transformer_impl="local")
    assert provider.transformer_layer_spec is mb.SCHEME_LAYER_SPECS[scheme] or \
        provider.transformer_layer_spec == mb.SchemeLayerSpec(scheme, arch.options())
    provider.finalize()
    provider._pg_collection = pg
    torch.manual_seed(0)
    from_provider = provider.provide()
    config = arch.transformer_config(transformer_impl="local")
    built = GPTModelBuilder(GPTModelConfig(
        transformer=config, transformer_layer_spec=mb.SCHEME_LAYER_SPECS[scheme],
        vocab_size=arch.vocab_size, seq_length=arch.max_position_embeddings,
        position_embedding_type="rope", share_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=1)).build_model(pg)
    x = tokens()
    for model in (from_provider, built):
        state = model.state_dict()
        reference = reference_model(arch, state)  # strict: the same parameters and buffers
        assert torch.equal(logits(model, x), logits(reference, x))
        assert [type(l).__name__ for l in model.decoder.layers] == \
            ["HybridTransformerLayer"] * arch.num_layers
    loss = from_provider.train()(x, torch.arange(24)[None].expand(2, -1), None, labels=x).mean()
    loss.backward()
    assert all(p.grad is not None for p in from_provider.parameters())


# ---- a recipe's ConfigContainer -------------------------------------------------------------


def example_config(scheme="hybridnorm_star", **kw):
    from bridge_pretrain import example

    return example().dense_1p2b_config(scheme, transformer_impl="local", **kw)


def test_use_scheme_sets_the_spec_and_the_fields_it_needs(capsys):
    cfg = example_config("hybridnorm_star")
    spec = cfg.model.transformer_layer_spec
    assert isinstance(spec, mb.SchemeLayerSpec) and spec.scheme.name == "hybridnorm_star"
    assert cfg.model.qk_layernorm is True and cfg.model.normalization == "RMSNorm"
    cfg.model.qk_layernorm = True
    mb.use_scheme(cfg, "prenorm", normalization="LayerNorm")
    assert cfg.model.qk_layernorm is False and cfg.model.normalization == "LayerNorm"
    assert "qk_layernorm True -> False" in capsys.readouterr().out
    assert mb.use_scheme(cfg, "olmo2").model.transformer_layer_spec.scheme.name == "olmo2"


@pytest.mark.parametrize("change, options, match", [
    (dict(normalization="DyT", transformer_impl="transformer_engine"), {},
     "DyT' has no Transformer Engine module"),
    (dict(fp8="hybrid"), {}, "fp8 need Transformer Engine's modules"),
    (dict(use_transformer_engine_full_layer_spec=True), {},
     "use_transformer_engine_full_layer_spec=True builds Transformer Engine's whole"),
    (dict(restore_modelopt_state=True), {}, "restore_modelopt_state=True"),
    (dict(mtp_num_layers=1), {}, "unset mtp_num_layers"),
    (dict(multi_latent_attention=True), {}, "multi-latent attention is not supported"),
    (dict(tensor_model_parallel_size=3), {}, "not divisible by tensor_model_parallel_size=3"),
    ({}, dict(qkv_norm="full", te_ffn_norm="in_linear"), "te_ffn_norm='in_linear' chooses"),
    ({}, dict(mixln_fraction=0.5), "takes the options"),
])
def test_use_scheme_refuses_what_the_scheme_cannot_run(change, options, match):
    cfg = example_config("hybridnorm_star")
    for k, v in change.items():
        setattr(cfg.model, k, v)
    with pytest.raises(mh.SchemeConfigError, match=re.escape(match)):
        mb.use_scheme(cfg, "hybridnorm_star", **options)


def test_a_bad_scheme_name_or_option_is_refused_when_the_spec_is_made():
    with pytest.raises((KeyError, ValueError), match="hybridnorm_star"):
        mb.SchemeLayerSpec("hybridnorm_strar")
    with pytest.raises(mh.SchemeConfigError, match="takes no options"):
        mb.SchemeLayerSpec("prenorm", {"qkv_norm": "full"})


# ---- Bridge's pretrain() --------------------------------------------------------------------


def pretrain(out: Path, iters: int, *extra: str) -> dict[int, str]:
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "bridge_pretrain.py"), str(out),
                          str(iters), *extra], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {int(i): v for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|",
                                             run.stdout)}


@pytest.mark.slow
def test_pretrain_trains_the_example_recipe_and_resumes_to_the_same_losses(tmp_path):
    from megatron_hybridnorm.inspect import detect_checkpoint

    straight = pretrain(tmp_path / "a", 4)
    assert sorted(straight) == [1, 2, 3, 4]
    saved = tmp_path / "a" / "checkpoints"
    assert (saved / "iter_0000002").is_dir() and (saved / "iter_0000004").is_dir()
    finding = detect_checkpoint(saved / "iter_0000004")
    assert finding.scheme == "hybridnorm_star", finding
    resumed = pretrain(tmp_path / "b", 4, "--load-from", str(saved), "--ckpt-step", "2")
    assert sorted(resumed) == [3, 4]  # it started after the saved iteration 2
    assert [resumed[i] for i in (3, 4)] == [straight[i] for i in (3, 4)], (straight, resumed)
    assert straight[4] != straight[1]


# ---- AutoBridge -----------------------------------------------------------------------------


def test_autobridge_finds_the_bridge_for_the_exported_model():
    from megatron.bridge import AutoBridge

    config = HybridNormConfig(architectures=["HybridNormForCausalLM"])
    assert AutoBridge.supports(config)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_autobridge_round_trips_every_scheme(megatron_single_rank, tmp_path, caplog, variant):
    """HF -> Megatron: the source's logits (fp32, 1e-5); Megatron -> HF: the source's tensors
    bit for bit, every parameter mapped; a Megatron checkpoint through AutoBridge gives what
    our own exporter writes; the HF folder AutoBridge saves loads with the source's logits."""
    from safetensors.torch import load_file

    scheme, arch = variant
    src = hf_folder(tmp_path, scheme, **arch)
    source = load_file(str(src / "model.safetensors"))
    x = tokens()
    want = hf_model(src)(x).logits
    with caplog.at_level(logging.WARNING):
        bridge, model = megatron_from_hf(src, transformer_impl="local")
        exported = dict(bridge.export_hf_weights(model, cpu=True))
    unmapped = [r.getMessage() for r in caplog.records
                if "No mapping" in r.getMessage() or "Can't find" in r.getMessage()]
    assert not unmapped, unmapped
    got = logits(model[0], x)
    assert rel_err(got, want) < 1e-5
    assert set(exported) == set(source) - {"output_layer.weight"}  # tied: the embedding's
    for name, value in source.items():
        if name in exported:
            assert torch.equal(exported[name], value), name

    ckpt = convert.import_hf(src, tmp_path / "megatron")  # a Megatron checkpoint of the model
    ours = load_file(str(convert.export(ckpt, tmp_path / "ours") / "model.safetensors"))
    folder = convert.checkpoint_folder(ckpt)
    loaded = convert.load_megatron(folder, convert.architecture_of(folder)[0])
    through_bridge = dict(bridge.export_hf_weights([loaded], cpu=True))
    assert set(through_bridge) == set(ours) - {"output_layer.weight"}
    for name, value in through_bridge.items():
        assert torch.equal(value, ours[name]), name

    out = tmp_path / "saved"
    bridge.save_hf_pretrained(model, out)
    assert torch.equal(hf_model(out)(x).logits, want)
    record_figures(variant_id(variant), logits_rel_err=rel_err(got, want),
                   logits_max_abs=(got - want).abs().max().item(), tensors=len(exported),
                   bitwise=sum(torch.equal(v, source[k]) for k, v in exported.items()),
                   as_our_exporter=sum(torch.equal(v, ours[k]) for k, v in through_bridge.items()))


def record_figures(name: str, **figures) -> None:
    """One JSON line per round trip into $BRIDGE_FIGURES (docs/bridge/round_trips.jsonl is a
    run's file; docs/megatron-bridge.md's table is checked against it)."""
    path = os.environ.get("BRIDGE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"variant": name, **figures}) + "\n")


def test_a_layout_buffer_that_disagrees_with_the_layout_is_not_exported(megatron_single_rank,
                                                                        tmp_path):
    bridge, model = megatron_from_hf(hf_folder(tmp_path, "prenorm_lns"), transformer_impl="local")
    layer = model[0].decoder.layers[2]
    assert layer.depth_scale.item() == pytest.approx(1 / 3 ** 0.5)  # set from the layout
    layer.depth_scale.fill_(1.0)
    with pytest.raises(ExportError, match="depth_scale is 1.0"):
        dict(bridge.export_hf_weights(model, cpu=True))


# ---- TP=2 and PP=2 through Bridge's provider ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, schemes", [
    # HybridNorm*, and OLMo 2's full-width Q/K/V norms, split over TP like the heads
    (2, 1, ("hybridnorm_star", "olmo2")),
    (1, 2, ("hybridnorm_star",)),
], ids=["tp2", "pp2"])
def test_tp2_and_pp2_load_step_and_export_through_the_provider(tmp_path, tp, pp, schemes):
    import torch.nn.functional as F

    x, labels = tokens(b=4, seed=1), tokens(b=4, seed=2)
    cases, want = [], []
    for scheme in schemes:
        src = hf_folder(tmp_path, scheme)
        with torch.no_grad():
            out = hf_model(src)(x).logits
        want.append(F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1)).item())
        cases.append(str(src))
    results = run_distributed(bridge_layouts_match_hf, tp * pp, Parallel(tp=tp, pp=pp),
                              args=(cases, x, labels, tp, pp), timeout=500)
    for rank in results:
        for (loss, grads_finite, same), expected in zip(rank, want):
            assert abs(loss - expected) / expected < 1e-5, (loss, expected)
            assert grads_finite and same
