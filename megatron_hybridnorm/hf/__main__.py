"""python -m megatron_hybridnorm.hf export CHECKPOINT OUT | import HF_FOLDER OUT"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.hf",
                                description="Megatron checkpoints to Hugging Face folders and "
                                            "back (needs the [hf] extra)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a Megatron dist checkpoint to a Hugging Face folder")
    e.add_argument("checkpoint", help="a hybridnorm-train checkpoint (or its run's checkpoints/"
                                      "<scheme> folder) or a Megatron-LM save folder")
    e.add_argument("out", help="the Hugging Face folder to write")
    i = sub.add_parser("import", help="an exported Hugging Face folder to a Megatron-LM "
                                      "checkpoint (release, model only)")
    i.add_argument("folder")
    i.add_argument("out")
    args = p.parse_args(argv)
    try:  # here, after parsing: --help without the [hf] extra, and its absence named
        from megatron_hybridnorm.hf.architecture import ExportError
        from megatron_hybridnorm.hf.convert import export, import_hf
    except ImportError as e:
        p.exit(2, f"error: {e}; install the extra: pip install 'megatron-hybridnorm[hf]'\n")
    try:
        if args.command == "export":
            out = export(args.checkpoint, args.out)
            print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
                  "trust_remote_code=True)")
        else:
            out = import_hf(args.folder, args.out)
            print(f"wrote {out}: Megatron-LM --load {out} (loads at any TP/PP layout)")
    except (ExportError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
