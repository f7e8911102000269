"""The loss of Megatron-LM checkpoints on fixed tokens, under this interpreter's megatron-core
(test_megatron_lm_upgrades.py runs it under each version's python):

    python tests/megatron_lm_logits.py TREE SAVE_FOLDER...   prints "<version> <folder> <loss>"

The model is the one this version's Megatron-LM builds for the loop tests' command line
(``megatron_lm_loop.BASE``, HybridNorm*): its own parser and argument conversion and the --spec
entry point, at one rank; each checkpoint's latest iteration is loaded into it. TREE (that
version's Megatron-LM) supplies ``megatron.training`` where the wheel has none (0.16)."""

import os
import socket
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")


def main(tree: str, folders: list[str]) -> None:
    sys.path.insert(1, tree)  # after tests/: megatron.training from the tree, core from the wheel
    import argparse

    import torch
    from megatron.core import __version__ as version
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import add_megatron_arguments, core_transformer_config_from_args

    from megatron_hybridnorm import compat
    from megatron_hybridnorm.inspect import checkpoint_folder
    from launcher import Parallel, init_rank
    from megatron_lm_loop import BASE, SPEC

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_rank(0, 1, port, Parallel(), seed=1234)
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args, _ = parser.parse_known_args([*BASE, "--spec", SPEC, "hybridnorm_star"])
    args.padded_vocab_size, args.kv_channels, args.params_dtype = 256, 16, torch.float32
    config = core_transformer_config_from_args(args)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 64), generator=g)
    positions = torch.arange(64).expand(2, 64)
    for folder in folders:
        build = compat.import_module(tuple(args.spec))
        spec = build(config, vp_stage=None) if compat.SPEC_CALLABLES_ARE_CALLED else build
        torch.manual_seed(1)  # weights unlike any checkpoint's until it loads
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256,
                         max_sequence_length=64, position_embedding_type="rope",
                         rotary_base=args.rotary_base,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
        path = str(checkpoint_folder(__import__("pathlib").Path(folder)))
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            logits = model.eval()(tokens, positions, None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256).float(),
                                                 tokens[:, 1:].reshape(-1)).item()
        print(f"{version.split('+')[0]} {folder} {loss:.9f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
