"""torchrun --standalone --nproc-per-node 2 -m prism_kernels.distributed [prism run options]"""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
