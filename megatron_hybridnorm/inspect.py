"""Which norm scheme does a checkpoint actually have?

    python -m megatron_hybridnorm.inspect CHECKPOINT_DIR

CHECKPOINT_DIR may be a Megatron-LM save folder (with ``latest_checkpointed_iteration.txt``), an
``iter_*`` folder, or a ``hybridnorm-train`` checkpoint folder. It prints the scheme the norm
parameters form, layer by layer (exit 1 when no scheme matches). In Python:
``megatron_hybridnorm.models.detection`` (``detect_scheme(model)``, ``detect_checkpoint(path)``),
whose names this module also gives, as before.
"""

from __future__ import annotations

import argparse
import sys

from megatron_hybridnorm.models.detection import (  # noqa: F401  (the names this path gave)
    Finding,
    check_checkpoint,
    checkpoint_folder,
    detect_checkpoint,
    detect_from_keys,
    detect_scheme,
    layer_checkpoint_params,
    layer_norm_keys,
    match,
    match_pattern,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.inspect",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a dist checkpoint folder")
    args = p.parse_args(argv)
    try:
        finding = detect_checkpoint(args.checkpoint)
    except (FileNotFoundError, OSError) as e:
        p.exit(2, f"error: {e}\n")
    print(finding)
    return 0 if finding.scheme else 1


if __name__ == "__main__":
    sys.exit(main())
