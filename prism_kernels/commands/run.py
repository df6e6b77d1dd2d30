"""`prism run`: Prism on several processes with torch.distributed (gloo on CPU).

    prism run --nproc 2 --family vit --size tiny --mode prism --cr 10
        spawns `torchrun --standalone --nproc-per-node 2 -m prism_kernels.distributed ...`
    torchrun --nproc-per-node 2 -m prism_kernels.distributed --family vit --mode prism --cr 10
        the same, launched by torchrun yourself (several machines: --nnodes, --rdzv-endpoint)
    RANK=r WORLD_SIZE=P MASTER_ADDR=... MASTER_PORT=... prism run ...
        one process per rank started by hand (what the netem benchmark does)

Rank 0 is the master: it makes the input, embeds it, partitions it and sends each
device its partition; every rank runs the blocks on its partition and exchanges
segment means (prism) or full partitions (voltage) every layer; the master
gathers what the head needs. Modes: prism, voltage, single. See docs/distributed.md.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    from prism_kernels.distributed import launch
    p = subparsers.add_parser("run", help="run Prism / Voltage / single on several processes (torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_arguments(p)
    p.set_defaults(func=lambda args: launch.main(args=args))
    return p
