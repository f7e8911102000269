"""The core install (no extras) is what the specs need: it builds every scheme, through the spec
builders and the --spec entry points; a tool without its extra names the extra.

"Without the extras" is a fresh interpreter in which their modules (and pytest's) are marked
absent, as Python's import system knows them, so the test needs no second venv."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("matplotlib", "tqdm", "transformers", "safetensors", "lm_eval", "accelerate",
                 "pytest", "transformer_engine", "apex")

BLOCK = f"""
import sys
BLOCKED = {EXTRA_MODULES!r}
for name in BLOCKED:  # as if not installed: import raises ModuleNotFoundError, find_spec is None
    sys.modules[name] = None
"""

BUILD = BLOCK + """
import socket, torch
from megatron.core.models.gpt import GPTModel
import megatron_hybridnorm as mh
from megatron_hybridnorm import compat, entrypoints
from megatron_hybridnorm.harness.gpt_config import gpt_config
sys.path.insert(0, "tests")  # the tests' launcher, beside them (not in the wheel)
from launcher import Parallel, init_rank

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
init_rank(0, 1, port, Parallel(), seed=1)
sizes = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=64, transformer_impl="local")
tokens = torch.randint(0, 64, (1, 16)); pos = torch.arange(16)[None]
built = []
for scheme in mh.SCHEMES:
    for how, spec in (("builder", lambda c: mh.get_decoder_block_spec(c, scheme)),
                      ("entry point", getattr(entrypoints, scheme))):
        config = gpt_config(**sizes)
        model = GPTModel(config=config, transformer_layer_spec=spec(config), vocab_size=64,
                         max_sequence_length=16, position_embedding_type="rope")
        assert torch.isfinite(model(tokens, pos, None)).all(), (scheme, how)
        built.append(f"{scheme}/{how}")
if compat.HAVE_HYBRID_MODEL:
    from megatron_hybridnorm.hybrid import entrypoints as hybrid_entrypoints
    for scheme in mh.SCHEMES:
        assert mh.get_hybrid_stack_spec(gpt_config(**sizes), scheme, "*-*-") is not None
        assert getattr(hybrid_entrypoints, scheme) is not None
        built.append(f"{scheme}/hybrid")
leaked = sorted(m for m, v in sys.modules.items() if m.split(".")[0] in BLOCKED and v is not None)
assert not leaked, leaked
print("built", len(built))
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_core_requirements_are_what_the_specs_need():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert core == {"torch", "megatron-core", "psutil", "numpy"}
    assert set(project["optional-dependencies"]["train"]) == {"matplotlib", "tqdm"}
    from megatron_hybridnorm.extras import EXTRAS

    assert EXTRAS["train"] == ("matplotlib", "tqdm")


@pytest.mark.slow
def test_a_core_install_builds_every_scheme_through_builders_and_entry_points():
    import megatron_hybridnorm as mh
    from megatron_hybridnorm import compat

    out = run(BUILD)
    assert out.returncode == 0, out.stderr[-3000:]
    per_scheme = 3 if compat.HAVE_HYBRID_MODEL else 2
    assert out.stdout.split()[-1] == str(per_scheme * len(mh.SCHEMES))


def test_hybridnorm_train_without_its_extra_names_the_extra():
    out = run(BLOCK + "from megatron_hybridnorm.train.cli import main\nmain(['--steps', '1'])")
    assert out.returncode == 2
    assert ("hybridnorm-train: error: hybridnorm-train needs matplotlib, tqdm, from the [train] "
            "extra: pip install 'megatron-hybridnorm[train]'") in out.stderr
    assert "Traceback" not in out.stderr
