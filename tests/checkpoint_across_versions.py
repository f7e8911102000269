"""One side of a dist checkpoint across megatron-core versions (test_versions.py runs it under
two versions' pythons): ``save DIR SCHEME`` builds a model, saves it and prints
"<megatron-core version> <loss>"; ``load DIR SCHEME`` builds the model from another seed, loads
DIR into it and prints the same for the loaded model."""

import os
import socket
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core import __version__ as version  # noqa: E402

from helpers import batch, build_gpt, randomize_norms, tiny_config  # noqa: E402
from launcher import Parallel, init_rank  # noqa: E402


def main(command: str, folder: str, scheme: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_rank(0, 1, port, Parallel(), seed=1234)
    torch.manual_seed(0 if command == "save" else 1)
    model = build_gpt(tiny_config(), scheme)
    if command == "save":
        randomize_norms(model)
        os.makedirs(folder)
        dist_checkpointing.save(model.sharded_state_dict(), folder)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), folder))
    tokens, labels, pos = batch()
    with torch.no_grad():
        loss = model(tokens, pos, None, labels=labels).float().mean().item()
    print(f"{version} {loss:.9f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
