"""`prism generate`: a Prism prefill on several processes, then greedy decoding on the
last rank (--decode prism | exact | voltage). See prism_kernels/distributed/generate.py
and docs/distributed.md "Generation"."""
from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    from prism_kernels.distributed import generate
    p = subparsers.add_parser("generate", help="generate text: Prism prefill on several processes, "
                                               "decoding on the last rank",
                              description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(p)
    p.set_defaults(func=lambda args: generate.main(args=args))
    return p
