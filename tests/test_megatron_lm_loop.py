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
from pathlib import Path

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm import compat
from megatron_lm_loop import (BASE, HYBRID_SPEC, SPEC, folder_state, importlib_find,
                              megatron_model_of, rehearse, rehearse_many, tree_for,
                              version_of)

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

    def many(self, jobs):
        """Launch those not run yet side by side (1-rank launches two at a time on 2 cores)."""
        todo = list({job["name"]: dict(job, tree=TREE) for job in jobs
                     if job["name"] not in self.runs}.values())
        self.runs.update(rehearse_many(self.out, todo))

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

def one_rank_job(launch, scheme):
    extra = saving(launch, f"one_rank_{scheme}") if scheme in ("hybridnorm_star", "prenorm") else []
    return dict(name=f"one_rank_{scheme}", nproc=1, args=[*BASE, *spec(scheme), *extra])


def one_rank(launch, scheme):
    return launch(**one_rank_job(launch, scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pretrain_gpt_trains_every_scheme(launch, scheme):
    # with the launches the resume and refusal tests read
    launch.many([one_rank_job(launch, s)
                 for s in dict.fromkeys((*SCHEMES, "hybridnorm_star", "prenorm"))])
    run = one_rank(launch, scheme)
    run.assert_trained()
    assert f"megatron-hybridnorm: built {scheme} on local modules, 4 layers" in run.log


def test_the_runner_says_first_what_it_emulates(launch):
    run = one_rank(launch, "hybridnorm_star")
    first = run.log.splitlines()[0]
    # the runner names the tree by its resolved path (a symlinked tree prints its target)
    assert first.startswith("hybridnorm-rehearse: Megatron-LM's pretrain_gpt.py from "
                            f"{TREE.resolve()}")
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


# ---- bad input: refused before the first iteration, --save untouched ---------------------------

NO_TE = [a for a in BASE if a not in ("--transformer-impl", "local")]
PERSIST = [a for a in BASE if a != "--no-persist-layer-norm"]
OLDER_THAN_0_19 = tuple(int(x) for x in VERSION.split(".")[:2]) < (0, 19)
OWN_FINAL_NORM = ("this Megatron-LM calls the --spec entry point, which builds the scheme's own "
                  "final norm (megatron-core's torch norm is not used)")
# name: (Megatron-LM's arguments, what the refusal says, ranks, why it cannot run here or "")
REFUSALS = {
    "unknown_scheme": (
        [*BASE, *spec("hybridnorm_starr")],
        f"--spec {SPEC} hybridnorm_starr: {SPEC} has no scheme 'hybridnorm_starr'; its entry "
        "points are prenorm, ", 1, ""),
    "spec_module_typo": (  # the runner's own check: Megatron-LM before 0.20 would fall back
        [*BASE, "--spec", "megatron_hybridnorm.entrypoint", "hybridnorm"],
        "megatron_hybridnorm.entrypoint does not import", 1,
        "the runner's own check, the same on every version" if LEG else ""),
    "te_without_te": (
        [*NO_TE, *spec("hybridnorm_star"), "--transformer-impl", "transformer_engine"],
        "--transformer-impl local", 1,
        "Transformer Engine is installed" if importlib_find("transformer_engine") else ""),
    "dyt": (  # DyT on TE is ours to refuse; Megatron-LM's parser offers no DyT to begin with
        [*[a if a != "RMSNorm" else "DyT" for a in BASE], *spec("hybridnorm_star")],
        "invalid choice: 'DyT'", 1, ""),
    "mtp": (
        [*BASE, *spec("hybridnorm_star"), "--mtp-num-layers", "1"], "unset --mtp-num-layers", 1,
        "Megatron-LM core_v0.16 to 0.18's gpt_builders.py fails on --spec with --mtp-num-layers "
        "by itself, building the MTP block's spec (UnboundLocalError: use_te)"
        if OLDER_THAN_0_19 else ""),
    "load_other_scheme": (  # --load and --save one folder, as a resumed job has them
        [*BASE, *spec("hybridnorm_star"), "--load", "{prenorm}"], "--load {prenorm} holds prenorm",
        1, ""),
    "sp_torch_final_norm": (
        [*BASE, *spec("hybridnorm_star"), "--tensor-model-parallel-size", "2",
         "--sequence-parallel"], "drop --sequence-parallel", 2, OWN_FINAL_NORM if SP else ""),
    "persist_layer_norm": (  # Megatron-LM's default
        [*PERSIST, *spec("hybridnorm_star")], "pass --no-persist-layer-norm", 1,
        OWN_FINAL_NORM if SP else ""),
}


def refusal_runs(launch):
    """Every refusal launch that can run here, side by side; each --save folder made and filled
    beforehand, its state noted: {name: (run, save folder, its state before)}."""
    if "refusals" not in launch.runs:
        launch.many([one_rank_job(launch, "prenorm")])
        prenorm = str(launch.folder("one_rank_prenorm"))
        jobs, saves = [], {}
        for name, (args, _, nproc, why_not) in REFUSALS.items():
            if why_not:
                continue
            save = Path(prenorm) if name == "load_other_scheme" else launch.folder(name)
            save.mkdir(parents=True, exist_ok=True)
            (save / f"keep_{name}.txt").write_text("a file the refused run must leave alone\n")
            saves[name] = (save, folder_state(save))
            args = [a.format(prenorm=prenorm) for a in args]
            jobs.append(dict(name=name, nproc=nproc,
                             args=[*args, "--save", str(save), "--save-interval", "5"]))
        launch.many(jobs)
        launch.runs["refusals"] = {n: (launch.runs[n], *saves[n]) for n in saves}
    return launch.runs["refusals"], str(launch.folder("one_rank_prenorm"))


@pytest.mark.parametrize("name", REFUSALS)
def test_bad_input_is_refused_before_the_first_iteration(launch, name):
    """Exit non-zero before any iteration, say what to change, leave --save's folder as it was
    (for load_other_scheme, the prenorm checkpoint the run was pointed at)."""
    if REFUSALS[name][3]:
        pytest.skip(REFUSALS[name][3])
    runs, prenorm = refusal_runs(launch)
    run, save, before = runs[name]
    assert run.returncode != 0, run.tail()
    assert not run.logged, run.tail()
    assert REFUSALS[name][1].format(prenorm=prenorm) in run.log, run.tail()
    assert folder_state(save) == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
