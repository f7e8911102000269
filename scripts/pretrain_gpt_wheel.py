"""Run Megatron-LM's ``pretrain_gpt.py`` from a folder that holds it (with ``gpt_builders.py`` and
``model_provider.py`` beside it), on megatron-core installed from its wheel.

    torchrun --nproc-per-node 1 scripts/pretrain_gpt_wheel.py MEGATRON_LM_DIR [pretrain_gpt args]

At start-up Megatron-LM runs ``make`` on the dataset helper; the megatron-core wheel ships the
helper already built but not its Makefile, so that step fails and ends the run. Here it is
skipped (the built helper is used). Everything else is Megatron-LM's own code, unchanged.
"""

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "pretrain_gpt.py").is_file():
        sys.exit("usage: pretrain_gpt_wheel.py MEGATRON_LM_DIR [pretrain_gpt.py arguments]: "
                 "MEGATRON_LM_DIR must hold pretrain_gpt.py (see scripts/gpu_prepare.sh)")
    folder = Path(sys.argv[1]).resolve()
    import megatron.core.datasets.utils as dataset_utils

    from megatron.core.datasets import helpers_cpp  # noqa: F401 - the wheel's built helper

    dataset_utils.compile_helpers = lambda: None
    sys.path.insert(0, str(folder))
    sys.argv = [str(folder / "pretrain_gpt.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
