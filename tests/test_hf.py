"""Export to Hugging Face and back: every scheme, from hybridnorm-train checkpoints saved at
TP=2 x PP=2 (and a Megatron-LM-style one): the same logits as Megatron's, greedy generation with
and without the cache and as Megatron decodes, bitwise round trips, loading without
megatron-core."""

import importlib.util
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import megatron_hybridnorm as mh

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip("safetensors", reason="the [hf] extra is not installed")

from megatron_hybridnorm.hf import convert  # noqa: E402
from helpers import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--seq-len", "64",
         "--batch-size", "8", "--eval-interval", "2", "--eval-batches", "1"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """hybridnorm-train at TP=2 x PP=2 (4 gloo processes), every scheme, 2 steps."""
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "--master-port", str(free_port()), "-m", "megatron_hybridnorm.train", "--tp", "2",
         "--pp", "2", "--schemes", ",".join(mh.SCHEMES), "--steps", "2", *SMALL,
         "--runs-dir", str(runs), "--name", "tp2pp2"],
        capture_output=True, text=True, cwd=ROOT, timeout=1500,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return runs / "tp2pp2"


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def tokens(n=24, b=2, vocab=256, seed=0):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_exported_model_matches_megatron_and_round_trips(megatron_single_rank, run_dir, tmp_path,
                                                         scheme):
    from test_inference import decode

    ckpt = run_dir / "checkpoints" / scheme
    out = convert.export(ckpt, tmp_path / "hf")
    folder = convert.checkpoint_folder(ckpt)
    arch, _, _ = convert.architecture_of(folder)
    megatron = convert.load_megatron(folder, arch)
    hf = hf_model(out)
    assert hf.config.scheme == scheme and len(hf.config.layer_norms) == 4
    x = tokens()
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    with torch.no_grad():
        want = megatron(x, pos, None)
        got = hf(x).logits
    assert rel_err(got, want) < 1e-5

    prompt = tokens(n=8, b=1, seed=1)
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        uncached = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                               use_cache=False)
        megatrons, _ = decode(megatron, prompt, new=32)
    assert torch.equal(cached, uncached) and torch.equal(cached, megatrons)

    back = convert.import_hf(out, tmp_path / "megatron")  # Megatron -> HF -> Megatron
    again = convert.load_megatron(convert.checkpoint_folder(back), arch)
    original = megatron.state_dict()
    for name, value in again.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("scheme", ["periln", "hybridnorm_star", "deepnorm"])
def test_a_dyt_model_exports_with_megatrons_logits(megatron_single_rank, tmp_path, scheme):
    """DyT in every norm (a hybridnorm-train run with --normalization DyT, one rank): the
    exported model's logits are Megatron's, and it round-trips."""
    out = subprocess.run(
        [sys.executable, "-m", "megatron_hybridnorm.train", "--schemes", scheme,
         "--normalization", "DyT", "--steps", "2", *SMALL, "--runs-dir", str(tmp_path),
         "--name", "dyt"], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = tmp_path / "dyt" / "checkpoints" / scheme
    folder = convert.checkpoint_folder(ckpt)
    arch, _, _ = convert.architecture_of(folder)
    assert arch.normalization == "DyT"
    megatron = convert.load_megatron(folder, arch)
    assert any(n.endswith(".alpha") for n, _ in megatron.named_parameters())
    hf = hf_model(convert.export(ckpt, tmp_path / "hf"))
    x = tokens()
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    with torch.no_grad():
        assert rel_err(hf(x).logits, megatron(x, pos, None)) < 1e-5
    back = convert.import_hf(tmp_path / "hf", tmp_path / "megatron")
    again = convert.load_megatron(convert.checkpoint_folder(back), arch).state_dict()
    for name, value in megatron.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(value, again[name]), name


def test_the_export_loads_without_megatron_core(megatron_single_rank, run_dir, tmp_path):
    out = convert.export(run_dir / "checkpoints" / "hybridnorm_star", tmp_path / "hf")
    code = (
        "import sys; sys.modules['megatron'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "ids = t('def f(x):', return_tensors='pt').input_ids\n"
        "assert ids[0].tolist() == list(b'def f(x):')\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)\n"
        "print('generated', out.shape[1] - ids.shape[1], repr(t.decode(out[0])))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generated 8 'def f(x):" in res.stdout


def test_a_megatron_lm_checkpoint_exports_from_its_saved_arguments(megatron_single_rank,
                                                                   tmp_path):
    """A checkpoint as Megatron-LM's pretrain_gpt.py writes it (torch_dist, its arguments in
    the common state, a tracker file): the architecture comes from those arguments."""
    from megatron.core import dist_checkpointing
    from megatron.training.arguments import add_megatron_arguments

    import argparse

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96",
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--rotary-base", "500000", "--disable-bias-linear", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "1",
        "--spec", "megatron_hybridnorm.entrypoints", "hybridnorm",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "96"])
    args.padded_vocab_size, args.kv_channels = 96, 16
    arch = convert.Architecture.from_megatron_lm_args(args, "hybridnorm")
    model = arch.megatron_model()
    save = tmp_path / "save" / "iter_0000010"
    save.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args,
                             "iteration": 10, "checkpoint_version": 3.0}, str(save))
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("10")
    out = convert.export(tmp_path / "save", tmp_path / "hf")
    hf = hf_model(out)
    x = tokens(vocab=96)
    with torch.no_grad():
        assert rel_err(hf(x).logits, model.eval()(x, None, None)) < 1e-5
    assert not (out / "tokenizer.json").exists()  # NullTokenizer: nothing to copy


def test_what_cannot_be_exported_is_refused_clearly():
    args = Namespace(num_experts=8)
    with pytest.raises(convert.ExportError, match="MoE models"):
        convert.Architecture.from_megatron_lm_args(args, "hybridnorm")
    res = subprocess.run([sys.executable, "-m", "megatron_hybridnorm.hf", "export",
                          str(ROOT), str(ROOT / "nowhere")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "is not a dist checkpoint" in res.stderr


ANIMALS = {"cow": "moo", "cat": "meow", "dog": "woof", "duck": "quack", "sheep": "baa",
           "owl": "hoot", "lion": "roar", "snake": "hiss"}
TASK = """task: hybridnorm_animals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def lm_eval_accuracy(model_dir: Path, task_dir: Path, out: Path) -> float:
    """lm-evaluation-harness's ``hf`` model on the local task, offline; its accuracy."""
    import json

    res = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--tasks",
         "hybridnorm_animals", "--include_path", str(task_dir), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(out), "--trust_remote_code"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
             "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    [results] = list(out.rglob("results_*.json"))
    return json.loads(results.read_text())["results"]["hybridnorm_animals"]["acc,none"]


def test_lm_evaluation_harness_evaluates_an_exported_model(megatron_single_rank, tmp_path):
    """A small multiple-choice task written here (which sound each animal makes, two choices):
    lm-eval runs end to end on exported models; one trained on the task's text beats chance,
    one trained on other text (the standard library) does not come close."""
    import json
    import random

    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    rng = random.Random(0)
    docs = []
    for animal, sound in ANIMALS.items():
        wrong = rng.choice([s for s in ANIMALS.values() if s != sound])
        choices = [f" {sound}.", f" {wrong}."]
        rng.shuffle(choices)
        docs.append({"context": f"The {animal} says", "choices": choices,
                     "answer": choices.index(f" {sound}.")})
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / "animals.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "animals.yaml").write_text(TASK.format(data=task_dir / "animals.jsonl"))
    text = tmp_path / "animals.txt"
    text.write_text("".join(f"The {a} says {s}.\n" for a, s in ANIMALS.items()) * 200)

    accuracy = {}
    for name, data in (("trained", ["--text", str(text), "--steps", "300"]),
                       ("other", ["--max-corpus-mb", "0.2", "--steps", "20"])):
        runs = tmp_path / name
        res = subprocess.run(
            [sys.executable, "-m", "megatron_hybridnorm.train", "--schemes", "hybridnorm",
             "--lr", "3e-3", *SMALL, "--runs-dir", str(runs), "--name", "r", *data],
            capture_output=True, text=True, cwd=ROOT, timeout=900,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert res.returncode == 0, res.stderr[-3000:]
        out = convert.export(runs / "r" / "checkpoints" / "hybridnorm", tmp_path / f"hf-{name}")
        accuracy[name] = lm_eval_accuracy(out, task_dir, tmp_path / f"eval-{name}")
    # (measured here: 7 of 8 trained, 3 of 8 other; chance is 4 of 8)
    assert accuracy["trained"] >= 0.75 and accuracy["trained"] > accuracy["other"], accuracy
    assert accuracy["trained"] > accuracy["other"], accuracy


# ---- against megatron-core's own model, built from Megatron-LM's arguments -------------------

MEGATRON_LM_BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96",
    "--swiglu", "--position-embedding-type", "rope", "--rotary-base", "500000",
    "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
    "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm", "--tokenizer-type", "NullTokenizer", "--vocab-size", "96"]


def megatron_lm_checkpoint(tmp_path, scheme, flags):
    """A checkpoint as pretrain_gpt.py saves it, and the model megatron-core builds for it from
    Megatron-LM's own argument conversion (core_transformer_config_from_args) and the --spec
    entry point: independent of the exporter's Architecture. Norms and biases randomized."""
    import argparse

    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import (
        add_megatron_arguments,
        core_transformer_config_from_args,
    )

    from helpers import randomize_norms
    from megatron_hybridnorm.models.gpt import entrypoints

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(MEGATRON_LM_BASE + flags + [
        "--spec", "megatron_hybridnorm.entrypoints", scheme])
    args.padded_vocab_size, args.kv_channels, args.params_dtype = 96, 16, torch.float32
    config = core_transformer_config_from_args(args)
    build = getattr(entrypoints, scheme)
    model = GPTModel(config=config, transformer_layer_spec=build(config),
                     vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     position_embedding_type=args.position_embedding_type,
                     rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    torch.manual_seed(0)
    randomize_norms(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0.0, 0.1)
    save = tmp_path / "save" / "iter_0000010"
    save.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args,
                             "iteration": 10, "checkpoint_version": 3.0}, str(save))
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("10")
    return tmp_path / "save", model.eval()


needs_training = pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None,
    reason="this megatron-core ships no megatron.training (Megatron-LM's argument parser)")


@needs_training
@pytest.mark.parametrize("scheme,flags", [
    ("hybridnorm_star", ["--normalization", "RMSNorm", "--disable-bias-linear"]),
    ("hybridnorm", ["--normalization", "LayerNorm", "--disable-bias-linear"]),
    ("postnorm", ["--normalization", "LayerNorm"]),  # linear biases
    ("hybridnorm_star", ["--normalization", "RMSNorm", "--disable-bias-linear",
                         "--untie-embeddings-and-output-weights"]),
])
def test_export_equals_megatron_cores_model_of_the_checkpoint(megatron_single_rank, tmp_path,
                                                              scheme, flags):
    folder, model = megatron_lm_checkpoint(tmp_path, scheme, flags)
    hf = hf_model(convert.export(folder, tmp_path / "hf"))
    x = tokens(vocab=96)
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x, None, None)) < 1e-5


@needs_training
def test_export_with_an_attention_mask_equals_megatron_with_the_same_mask(megatron_single_rank,
                                                                          tmp_path):
    """Left padding: HF's attention_mask and position ids against megatron-core's forward with
    the same padding folded into its attention mask, at the positions that are not padding."""
    folder, model = megatron_lm_checkpoint(tmp_path, "hybridnorm_star",
                                           ["--normalization", "RMSNorm", "--disable-bias-linear"])
    hf = hf_model(convert.export(folder, tmp_path / "hf"))
    x = tokens(n=16, vocab=96)
    pad = torch.tensor([0, 5])  # sequence 1 has 5 padding tokens on the left
    keep = torch.arange(16)[None, :] >= pad[:, None]  # [b, s]
    pos = (torch.arange(16)[None, :] - pad[:, None]).clamp_min(0)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    masked = ~(causal[None] & keep[:, None, :])[:, None]  # megatron: True = not attended
    with torch.no_grad():
        ours = hf(x, attention_mask=keep.long(), position_ids=pos).logits
        theirs = model(x, pos, masked)
    assert rel_err(ours[keep], theirs[keep]) < 1e-5


@needs_training
@pytest.mark.parametrize("flags,match", [
    (["--add-qkv-bias", "--disable-bias-linear"], "--add-qkv-bias"),
    (["--squared-relu"], "--squared-relu"),
    (["--openai-gelu"], "--openai-gelu"),
    (["--use-rope-scaling"], "--use-rope-scaling"),
    (["--rotary-seq-len-interpolation-factor", "2"], "--rotary-seq-len-interpolation-factor"),
])
def test_megatron_lm_features_the_export_cannot_compute_are_refused(flags, match):
    """They were exported as something else (gelu for --squared-relu, no QKV bias...)."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    base = [f for f in MEGATRON_LM_BASE if f != "--swiglu"] if "--swiglu" not in flags else \
        MEGATRON_LM_BASE
    args = parser.parse_args(base + ["--normalization", "RMSNorm"] + flags)
    args.padded_vocab_size, args.kv_channels = 96, 16
    with pytest.raises(convert.ExportError, match=match):
        convert.Architecture.from_megatron_lm_args(args, "hybridnorm")


def test_a_stored_tensor_the_architecture_has_no_place_for_is_refused(megatron_single_rank,
                                                                      tmp_path):
    """megatron-core's load leaves unrequested tensors out: a checkpoint with a QKV bias
    exported without it. Here the checkpoint's arguments say no bias, its tensors have one."""
    from megatron.core import dist_checkpointing

    from helpers import build_gpt, tiny_config

    model = build_gpt(tiny_config(add_qkv_bias=True), "hybridnorm")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))
    from helpers import SEQ, VOCAB

    arch = convert.Architecture(scheme="hybridnorm", num_layers=4, hidden_size=64,
                                num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                                vocab_size=VOCAB, max_position_embeddings=SEQ,
                                rope_base=500000, tied_embeddings=False)
    with pytest.raises(convert.ExportError, match=r"linear_qkv\.bias"):
        convert.load_megatron(folder, arch)
