"""The Megatron-LM launch scripts in examples/: every variant's arguments are parsed and
validated by megatron-core 0.19's own Megatron-LM argument parser, and the SLURM scripts start
one correctly ranked torchrun per node."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "scripts"))


def dry_run(script, *args, **env):
    out = subprocess.run(["bash", str(EXAMPLES / script), *args], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", **env})
    return out


def pretrain_args(script, *args, **env):
    out = dry_run(script, *args, **env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# torchrun ")
    return lines[0], lines[1:]


def validated(argv, world_size, monkeypatch):
    """Megatron-LM's parse_args + validate_args, on a pretend H100 (they query the device)."""
    from gpu_check import validate_megatron_lm_args

    # launch() exports this before torchrun, as Megatron-LM requires with TP
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in (EXAMPLES / "lib.sh").read_text()
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return validate_megatron_lm_args(argv, world_size)


DENSE = [
    ({}, 8),
    ({"TP": "2", "SP": "1"}, 8),
    ({"PP": "2"}, 8),
    ({"FP8": "delayed"}, 8),
    ({"FP8": "tensorwise"}, 8),
    ({"FP8": "mxfp8"}, 8),
    ({"FP8": "blockwise"}, 8),
    ({"IMPL": "local"}, 8),
    ({"DATA_PATH": "/data/dolma_text_document", "TOKENIZER_MODEL": "some/tokenizer"}, 8),
    ({"TP": "2", "PP": "2", "SP": "1", "FP8": "tensorwise"}, 32),
]


@pytest.mark.parametrize("env,world", DENSE, ids=[str(e) for e, _ in DENSE])
def test_dense_1p2b_variants_are_valid_megatron_lm_arguments(monkeypatch, env, world):
    _, argv = pretrain_args("train_dense_1p2b.sh", **env)
    args = validated(argv, world, monkeypatch)
    assert args.spec == ["megatron_hybridnorm.entrypoints", "hybridnorm_star"]
    # the paper's dense 1.2B configuration
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups,
            args.ffn_hidden_size, args.seq_length) == (16, 2048, 32, 8, 8192, 4096)
    assert args.rotary_base == 500000 and args.swiglu and args.normalization == "RMSNorm"
    assert args.lr == 3e-4 and args.global_batch_size == 1024 and args.train_iters == 238419
    assert not args.untie_embeddings_and_output_weights
    assert args.tensor_model_parallel_size == int(env.get("TP", 1))
    assert args.pipeline_model_parallel_size == int(env.get("PP", 1))
    assert args.sequence_parallel == (env.get("SP") == "1")
    assert args.fp8_recipe == env.get("FP8", args.fp8_recipe)
    assert (args.fp8 is not None) == ("FP8" in env)
    assert args.transformer_impl == env.get("IMPL", "transformer_engine")


MOE = [({}, 8), ({"EP": "4"}, 8), ({"FP8": "tensorwise"}, 16), ({"TP": "2", "SP": "1"}, 16)]


@pytest.mark.parametrize("env,world", MOE, ids=[str(e) for e, _ in MOE])
def test_moe_1b7b_variants_are_valid_megatron_lm_arguments(monkeypatch, env, world):
    _, argv = pretrain_args("train_moe_1b7b.sh", **env)
    args = validated(argv, world, monkeypatch)
    assert args.spec == ["megatron_hybridnorm.entrypoints", "hybridnorm_star"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (16, 2048, 16)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (64, 8, 1024)
    assert args.moe_aux_loss_coeff == 1e-2 and args.moe_z_loss_coeff == 1e-3
    assert args.moe_expert_capacity_factor is None  # dropless
    assert args.untie_embeddings_and_output_weights and args.lr == 4e-4
    assert args.expert_model_parallel_size == int(env.get("EP", 8))


HYBRID = [({}, 8, "*-" * 16), ({"PP": "2"}, 8, "*-" * 8 + "|" + "*-" * 8),
          ({"TP": "2", "SP": "1", "FP8": "tensorwise"}, 8, "*-" * 16),
          ({"IMPL": "local", "PATTERN": "*-*-*-*-|*-*-*-*-*-*-*-*-*-*-*-*-", "PP": "2"}, 8,
           "*-*-*-*-|*-*-*-*-*-*-*-*-*-*-*-*-")]


@pytest.mark.parametrize("env,world,pattern", HYBRID, ids=[str(e) for e, _, _ in HYBRID])
def test_hybrid_dense_1p2b_variants_are_valid_megatron_lm_arguments(monkeypatch, env, world,
                                                                    pattern):
    head, argv = pretrain_args("train_hybrid_dense_1p2b.sh", **env)
    assert head.endswith(" pretrain_hybrid.py")
    args = validated(argv, world, monkeypatch)
    assert args.spec == ["megatron_hybridnorm.hybrid.entrypoints", "hybridnorm_star"]
    assert args.hybrid_layer_pattern == pattern and args.num_layers == 32  # 16 '*-' blocks
    assert (args.hidden_size, args.num_attention_heads, args.num_query_groups,
            args.ffn_hidden_size, args.seq_length) == (2048, 32, 8, 8192, 4096)
    assert args.pipeline_model_parallel_size == int(env.get("PP", 1))
    assert args.transformer_impl == env.get("IMPL", "transformer_engine")


def test_hybrid_pattern_must_split_evenly():
    out = dry_run("train_hybrid_dense_1p2b.sh", PP="3")
    assert out.returncode == 2 and "PP=3 does not divide the 16 blocks" in out.stderr


@pytest.mark.parametrize("script", ["train_dense_1p2b.sh", "train_moe_1b7b.sh",
                                    "train_hybrid_dense_1p2b.sh"])
def test_baseline_differs_only_in_spec(script):
    _, star = pretrain_args(script)
    _, base = pretrain_args(script, "prenorm")
    diff = [(a, b) for a, b in zip(star, base) if a != b]
    assert len(star) == len(base)
    assert diff == [("hybridnorm_star", "prenorm"),
                    *[(a, b) for a, b in diff[1:] if "checkpoints/" in a]]  # the save folder


@pytest.mark.parametrize("env,args,message", [
    ({"SP": "1"}, [], "SP=1 needs TP > 1"),
    ({"FP8": "delayed", "IMPL": "local"}, [], "needs IMPL=transformer_engine"),
    ({"FP8": "fp4"}, [], "FP8 is off, delayed"),
    ({}, ["hybridnorm_plus"], "unknown scheme 'hybridnorm_plus'"),
    ({"DATA_PATH": "/x"}, [], "DATA_PATH needs TOKENIZER_MODEL"),
])
def test_bad_launch_settings_are_named(env, args, message):
    out = dry_run("train_dense_1p2b.sh", *args, **env)
    assert out.returncode == 2 and message in out.stderr


def _fake(bin_dir: Path, name: str, body: str):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def slurm_stand_ins(tmp_path, nodes: int) -> dict:
    """An environment where scontrol and srun are stand-ins: srun runs its command once per node,
    as SLURM would, with that node's SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", 'printf "gpu-a01\\ngpu-a02\\ngpu-a03\\n"\n')
    _fake(bin_dir, "srun", '''
while [ "$1" != bash ]; do shift; done
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit $?; done
''')
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1",
            "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "gpu-a[01-03]",
            "SLURM_NNODES": str(nodes), "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("sbatch,nodes", [("slurm_dense_1p2b.sbatch", 4),
                                          ("slurm_moe_1b7b.sbatch", 8)])
def test_slurm_script_starts_one_ranked_torchrun_per_node(tmp_path, sbatch, nodes):
    """With stand-ins for scontrol and srun: srun runs its command once per node, as SLURM
    would, with that node's SLURM_NODEID."""
    env = slurm_stand_ins(tmp_path, nodes)
    out = subprocess.run(["bash", str(EXAMPLES / sbatch), "prenorm"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    heads = [l for l in out.stdout.splitlines() if l.startswith("# torchrun")]
    assert heads == [f"# torchrun --nproc-per-node 8 --nnodes {nodes} --node-rank {n} "
                     f"--master-addr gpu-a01 --master-port 29500 pretrain_gpt.py"
                     for n in range(nodes)]
    assert "megatron_hybridnorm.entrypoints\nprenorm\n" in out.stdout


def test_scripts_are_valid_bash():
    for f in sorted(EXAMPLES.glob("*.sh")) + sorted(EXAMPLES.glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f


@pytest.mark.parametrize("script,env,world", [
    ("train_dense_1p2b.sh", {}, 8),
    ("train_dense_1p2b.sh", {"TP": "2", "SP": "1", "FP8": "tensorwise"}, 8),
    ("train_dense_1p2b.sh", {"PP": "2", "IMPL": "local"}, 8),
    ("train_moe_1b7b.sh", {"EP": "4"}, 8),
])
def test_check_before_training_has_the_jobs_layout(monkeypatch, script, env, world):
    """CHECK=1: the check runs first on the same processes, with the job's scheme, layout,
    backend and FP8; its arguments are the check command's own, and the layout fits."""
    import shlex

    from megatron.core.extensions import transformer_engine as te_ext

    from megatron_hybridnorm.check.cli import parser, validate

    out = dry_run(script, CHECK="1", **env)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first.startswith("# check: torchrun --nproc-per-node 8 ") and second.startswith(
        "# torchrun ")
    argv = shlex.split(first.removeprefix("# check: "))
    args = parser().parse_args(argv[argv.index("megatron_hybridnorm.check") + 1:])
    job = validated(pretrain_args(script, **env)[1], world, monkeypatch)
    assert args.scheme == job.spec[1]
    assert (args.tp, args.pp, args.ep, args.sp) == (
        job.tensor_model_parallel_size, job.pipeline_model_parallel_size,
        job.expert_model_parallel_size, job.sequence_parallel)
    assert args.backend == ("te" if job.transformer_impl == "transformer_engine" else "local")
    assert args.fp8 == (job.fp8_recipe if job.fp8 else None) and args.distopt
    monkeypatch.setattr(te_ext, "HAVE_TE", True)  # as on the job's machines
    validate(args, world)


def test_slurm_check_then_train_checks_on_every_node_first(tmp_path):
    env = slurm_stand_ins(tmp_path, 4)
    out = subprocess.run(["bash", str(EXAMPLES / "slurm_check_then_train.sbatch")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("# ")]
    for n in range(4):  # per node: the check (its own port), then the training
        assert lines[2 * n] == (
            f"# check: torchrun --nproc-per-node 8 --nnodes 4 --node-rank {n} --master-addr "
            "gpu-a01 --master-port 29501 -m megatron_hybridnorm.check --scheme hybridnorm_star "
            "--tp 1 --pp 1 --distopt --out checks/hybridnorm_star.json --backend te")
        assert lines[2 * n + 1].startswith(f"# torchrun --nproc-per-node 8 --nnodes 4 "
                                           f"--node-rank {n} ")
