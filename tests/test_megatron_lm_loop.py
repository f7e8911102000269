"""Megatron-LM's own training loop with this package's --spec: ``pretrain_gpt.py`` and
``pretrain_hybrid.py`` of the Megatron-LM tag that goes with the installed megatron-core, run
unchanged through ``python -m megatron_hybridnorm.rehearse`` on CPU ranks over gloo.

Each launch trains 10 iterations of a 4-layer model on mock data. Megatron-LM parses the
command line, builds the model from the entry point, trains, saves and resumes; the tests read
its log and the per-microbatch losses the runner records. On the version matrix's other
versions (``MCORE_MATRIX_LEG``) a spread of schemes runs instead of all of them.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm import compat
from megatron_lm_loop import BASE, HYBRID_SPEC, SPEC, folder_state, rehearse, tree_for, version_of

pytestmark = pytest.mark.slow

VERSION = version_of()
TREE, WHY_NOT = tree_for(VERSION)
if TREE is None:
    pytest.skip(WHY_NOT, allow_module_level=True)

LEG = bool(os.environ.get("MCORE_MATRIX_LEG"))
# where the layers differ most between versions: the residual hand-over, Mix-LN's two halves,
# the sublayer output norms (HybridNorm* runs in the parallel and resume tests)
SCHEMES = ("hybridnorm", "mixln", "olmo2") if LEG else mh.SCHEMES
# before 0.19 Megatron-LM wraps a --spec layer spec in megatron-core's own final norm, which
# without Transformer Engine or Apex is torch's, and that refuses sequence parallelism
SP = ["--sequence-parallel"] if compat.SPEC_CALLABLES_ARE_CALLED else []
HAS_HYBRID = (TREE / "pretrain_hybrid.py").is_file() and compat.HAVE_HYBRID_MODEL


class Launches:
    """Each named launch runs once a session; the tests that read it share it."""

    def __init__(self, out):
        self.out, self.runs = out, {}

    def __call__(self, name, nproc, args, **kwargs):
        if name not in self.runs:
            self.runs[name] = rehearse(self.out, name, nproc, args, tree=TREE, **kwargs)
        return self.runs[name]

    def folder(self, name):
        return self.out / name


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return Launches(tmp_path_factory.mktemp("megatron_lm"))


def spec(scheme, module=SPEC):
    return ["--spec", module, scheme]


def saving(launch, name):
    return ["--save", str(launch.folder(name)), "--save-interval", "5"]


def resumed(launch, name):
    return ["--load", str(launch.folder(name)), "--ckpt-step", "5"]


def same_losses_after_resume(full, resumed_run, first=6, last=10):
    """The resumed run's per-microbatch losses are the uninterrupted run's, to the bit."""
    want = {k: v for k, v in full.microbatches.items() if first <= k[0] <= last}
    got = resumed_run.microbatches
    assert want and sorted(got) == sorted(want), (sorted(got), sorted(want))
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}


# ---- training ---------------------------------------------------------------------------------

def one_rank(launch, scheme):
    extra = saving(launch, f"one_rank_{scheme}") if scheme in ("hybridnorm_star", "prenorm") else []
    return launch(f"one_rank_{scheme}", 1, [*BASE, *spec(scheme), *extra])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pretrain_gpt_trains_every_scheme(launch, scheme):
    run = one_rank(launch, scheme)
    run.assert_trained()
    assert f"megatron-hybridnorm: built {scheme} on local modules, 4 layers" in run.log


def test_the_runner_says_first_what_it_emulates(launch):
    run = one_rank(launch, "hybridnorm_star")
    first = run.log.splitlines()[0]
    assert first.startswith(f"hybridnorm-rehearse: Megatron-LM's pretrain_gpt.py from {TREE}")
    assert "no proxy for GPU speed or numerics" in first


def tp2(launch):
    return launch("tp2", 2, [*BASE, *spec("hybridnorm_star"), "--tensor-model-parallel-size",
                             "2", *SP, *saving(launch, "tp2")])


def pp2(launch):
    return launch("pp2_vpp", 2, [*BASE, *spec("hybridnorm_star"),
                                 "--pipeline-model-parallel-size", "2",
                                 "--num-layers-per-virtual-pipeline-stage", "1",
                                 *saving(launch, "pp2_vpp")])


def test_tensor_parallel(launch):
    run = tp2(launch)
    run.assert_trained()
    assert "tensor-model-parallel size: 2" in run.log
    if SP:
        assert "sequence_parallel ............................... True" in run.log


def test_pipeline_parallel_with_virtual_stages(launch):
    run = pp2(launch)
    run.assert_trained()
    # rank 0 holds global layers 1 and 3 (one per virtual stage): only layer 1 is HybridNorm*'s
    # Pre-Norm block; the checkpoint (all stages) has it at global layer 1 only
    assert "1 layers on this stage (vp_stage 0)" in run.log
    assert "1 layers on this stage (vp_stage 1)" in run.log
    from megatron_hybridnorm.inspect import detect_checkpoint

    finding = detect_checkpoint(launch.folder("pp2_vpp"))
    assert finding.scheme == "hybridnorm_star" and finding.num_layers == 4, finding


def test_moe_with_expert_parallelism(launch):
    run = launch("ep2", 2, [*BASE, *spec("hybridnorm"), "--num-experts", "4",
                            "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
                            "--moe-token-dispatcher-type", "alltoall",
                            *saving(launch, "ep2")])
    run.assert_trained()
    from megatron_hybridnorm.inspect import detect_checkpoint

    finding = detect_checkpoint(launch.folder("ep2"))
    assert finding.scheme == "hybridnorm", finding


@pytest.mark.skipif(not HAS_HYBRID, reason=f"megatron-core {VERSION} has no HybridModel "
                    f"(it arrived in {compat.HYBRID_MODEL_SINCE}) or its Megatron-LM no "
                    "pretrain_hybrid.py")
def test_pretrain_hybrid_with_attention_mlp_and_moe_layers(launch):
    args = [a for a in BASE]
    i = args.index("--num-layers")
    del args[i:i + 2]
    run = launch("hybrid", 1, [*args, *spec("hybridnorm_star", HYBRID_SPEC),
                               "--hybrid-layer-pattern", "*-*E*-", "--num-experts", "4",
                               "--moe-router-topk", "2"], script="pretrain_hybrid.py")
    run.assert_trained()
    assert ("megatron-hybridnorm: built hybridnorm_star hybrid stack on local modules, pattern "
            "'*-*E*-', 6 layers") in run.log


# ---- save and resume --------------------------------------------------------------------------

def test_resume_at_one_rank_repeats_the_uninterrupted_run(launch):
    full = one_rank(launch, "hybridnorm_star")
    again = launch("one_rank_resumed", 1, [*BASE, *spec("hybridnorm_star"),
                                           *resumed(launch, "one_rank_hybridnorm_star")])
    assert again.returncode == 0, again.tail()
    assert sorted(again.logged) == [6, 7, 8, 9, 10], again.tail()
    same_losses_after_resume(full, again)


def test_resume_at_tp2_repeats_the_uninterrupted_run(launch):
    full = tp2(launch)
    again = launch("tp2_resumed", 2, [*BASE, *spec("hybridnorm_star"),
                                      "--tensor-model-parallel-size", "2", *SP,
                                      *resumed(launch, "tp2")])
    assert again.returncode == 0, again.tail()
    same_losses_after_resume(full, again)


def test_resume_at_pp2_repeats_the_uninterrupted_run(launch):
    full = pp2(launch)
    again = launch("pp2_resumed", 2, [*BASE, *spec("hybridnorm_star"),
                                      "--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1",
                                      *resumed(launch, "pp2_vpp")])
    assert again.returncode == 0, again.tail()
    same_losses_after_resume(full, again)


def test_a_tp2_checkpoint_resumes_at_pp2(launch):
    """Resharded by megatron-core's loader: the same model and data, summed in another order,
    so the losses agree to rounding, not to the bit."""
    full = tp2(launch)
    again = launch("tp2_as_pp2", 2, [*BASE, *spec("hybridnorm_star"),
                                     "--pipeline-model-parallel-size", "2",
                                     *resumed(launch, "tp2")])
    assert again.returncode == 0, again.tail()
    want = {k: v for k, v in full.microbatches.items() if k[0] >= 6}
    got = again.microbatches
    assert sorted(got) == sorted(want)
    assert max(abs(got[k] - want[k]) for k in want) < 1e-4, (got, want)


def test_megatron_lms_checkpoint_is_named_and_exports_with_the_models_logits(
        launch, megatron_single_rank, tmp_path):
    """``inspect`` names the scheme of the TP=2 checkpoint Megatron-LM wrote; its Hugging Face
    export computes the logits of the model megatron-core builds for that checkpoint from
    Megatron-LM's own saved arguments (its argument conversion and the --spec entry point)."""
    pytest.importorskip("transformers")
    if importlib_find("megatron.training") is None:
        pytest.skip(f"megatron-core {VERSION}'s wheel ships no megatron.training: the saved "
                    "arguments cannot be read in this process")
    from megatron_hybridnorm.hf import convert
    from megatron_hybridnorm.inspect import main as inspect_main

    assert tp2(launch).returncode == 0
    folder = launch.folder("tp2")
    assert inspect_main([str(folder)]) == 0
    hf = convert.export(folder, tmp_path / "hf")
    reference = megatron_model_of(folder)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 32), generator=g)
    with torch.no_grad():
        want = reference(x, torch.arange(32).expand(2, 32), None)
        got = model(x).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def importlib_find(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def megatron_model_of(save_folder):
    """A Megatron-LM checkpoint in the model megatron-core builds from its saved arguments."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_hybridnorm.inspect import checkpoint_folder

    folder = checkpoint_folder(save_folder)
    args = dist_checkpointing.load_common_state_dict(str(folder))["args"]
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.sequence_parallel = False
    config = core_transformer_config_from_args(args)
    build = compat.import_module(tuple(args.spec))
    layer_spec = build(config, vp_stage=None) if compat.SPEC_CALLABLES_ARE_CALLED else build
    model = GPTModel(config=config, transformer_layer_spec=layer_spec,
                     vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     position_embedding_type=args.position_embedding_type,
                     rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"])
    return model.eval()


# ---- bad input: refused before the first iteration, --save untouched ---------------------------

def refused(launch, name, args, match, save=None, nproc=1):
    """The launch exits non-zero before any iteration, says ``match``, and leaves ``--save``'s
    folder (``save``, made and filled beforehand) as it was."""
    save = save or launch.folder(name)
    save.mkdir(parents=True, exist_ok=True)
    (save / "keep.txt").write_text("a file the refused run must leave alone\n")
    before = folder_state(save)
    run = launch(name, nproc, [*args, "--save", str(save), "--save-interval", "5"])
    assert run.returncode != 0, run.tail()
    assert not run.logged, run.tail()
    assert match in run.log, run.tail()
    assert folder_state(save) == before
    return run


def test_an_unknown_scheme_is_refused_naming_the_schemes(launch):
    refused(launch, "unknown_scheme", [*BASE, *spec("hybridnorm_starr")],
            f"--spec {SPEC} hybridnorm_starr: {SPEC} has no scheme 'hybridnorm_starr'; its "
            "entry points are prenorm, ")


def test_a_spec_module_that_does_not_import_is_refused(launch):
    run = refused(launch, "spec_module_typo",
                  [*BASE, "--spec", "megatron_hybridnorm.entrypoint", "hybridnorm"],
                  "megatron_hybridnorm.entrypoint does not import")
    assert "would log this and train its default Pre-Norm model" in run.log


def test_transformer_engine_without_it_is_refused_naming_the_flag(launch):
    if importlib_find("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed")
    args = [a for a in BASE if a != "--transformer-impl" and a != "local"]
    refused(launch, "te_without_te", [*args, *spec("hybridnorm_star"),
                                      "--transformer-impl", "transformer_engine"],
            "--transformer-impl local")


def test_multi_token_prediction_is_refused(launch):
    refused(launch, "mtp", [*BASE, *spec("hybridnorm_star"), "--mtp-num-layers", "1"],
            "unset --mtp-num-layers")


def test_a_checkpoint_of_another_scheme_is_refused_before_loading(launch):
    """--load and --save the same folder, as a resumed job has them: the prenorm checkpoint in
    it stays as it was."""
    assert one_rank(launch, "prenorm").returncode == 0
    folder = launch.folder("one_rank_prenorm")
    refused(launch, "load_other_scheme", [*BASE, *spec("hybridnorm_star"), "--load",
                                          str(folder)],
            f"--load {folder} holds prenorm", save=folder)


OWN_FINAL_NORM = pytest.mark.skipif(
    bool(SP), reason="this Megatron-LM calls the --spec entry point, which builds the scheme's "
    "own final norm (megatron-core's torch norm is not used)")


@OWN_FINAL_NORM
def test_sequence_parallel_with_megatrons_torch_final_norm_is_refused(launch):
    refused(launch, "sp_torch_final_norm", [*BASE, *spec("hybridnorm_star"),
                                            "--tensor-model-parallel-size", "2",
                                            "--sequence-parallel"],
            "drop --sequence-parallel", nproc=2)


@OWN_FINAL_NORM
def test_persist_layer_norm_with_megatrons_torch_final_norm_is_refused(launch):
    """Megatron-LM's default: without --no-persist-layer-norm, refused with the flag to pass."""
    args = [a for a in BASE if a != "--no-persist-layer-norm"]
    refused(launch, "persist_layer_norm", [*args, *spec("hybridnorm_star")],
            "pass --no-persist-layer-norm")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
