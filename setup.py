"""Builds the C++ CPU kernels, once per CPU capability.

Each variant compiles the same csrc/ sources with different ISA flags into its
own module (prism_kernels._C_default / _C_avx2 / _C_avx512); prism_kernels._cpp
loads the widest the running CPU supports, so one build runs anywhere.
Set PRISM_SKIP_CPP=1 to install without compiling (the reference then serves
CPU tensors). Set PRISM_SANITIZE=1 for an ASan/UBSan build (see README).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("PRISM_SKIP_CPP") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    base = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if os.environ.get("PRISM_SANITIZE") == "1":
        base = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fopenmp", "-std=c++20"]
        link += ["-fsanitize=address,undefined"]
    # CPU_CAPABILITY_* is what at::vec keys its specialisations on.
    variants = {
        "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
        "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
        "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                   "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    }
    only = os.environ.get("PRISM_CPU_VARIANTS")  # e.g. "avx512" for a quick dev build
    for name, flags in variants.items():
        if only and name not in only.split(","):
            continue
        ext_modules.append(CppExtension(
            f"prism_kernels._C_{name}", sources,
            extra_compile_args=base + flags + [f"-DPRISM_EXT_NAME=_C_{name}"],
            extra_link_args=link,
        ))
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["prism_kernels", "prism_kernels.*", "python_ref", "python_ref.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
