"""Build script for fastprompt.

Pure Python always; plus the CUDA extension ``fastprompt._C`` (csrc/) when the torch in the build environment is
a CUDA build and nvcc is found. Never downloads anything.

CUDA builds must see the installed CUDA torch, so install with ``pip install --no-build-isolation .`` (an isolated
build env would pull a CPU torch from the index, or another torch than the one you run with).

Whether the extension is built:
  default                        only when a CUDA GPU is visible at install time, for that GPU's architecture
  FASTPROMPT_CUDA_BUILD=1        build even without a GPU (CI does, so the build stays proven), for
                                 TORCH_CUDA_ARCH_LIST or "8.0;9.0"; takes ~3-4 minutes on 2 cores
  FASTPROMPT_CUDA_BUILD=0        never build (pure Python install); FASTPROMPT_SKIP_CUDA_BUILD=1 is the same

Environment:
  TORCH_CUDA_ARCH_LIST           archs to compile for (default: the visible GPUs', else "8.0;9.0")
  MAX_JOBS                       parallel compile jobs (ninja); keep small on small machines
  CUDA_HOME                      toolkit root; found from nvcc when unset
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _packages():
    # Everything lives inside the fastprompt package (the Triton kernels are fastprompt/kernels/): nothing at the
    # repository root may be importable under a name an installed distribution uses (HF's `kernels` is one).
    pkgs = ["fastprompt"] + ["fastprompt." + p for p in find_packages(os.path.join(HERE, "fastprompt"))]
    return sorted(set(pkgs))


def _say(msg):
    print(f"fastprompt setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _cuda_home_from_nvcc(nvcc):
    """Toolkit root for an nvcc that may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:  # nvcc reports where it really lives in its dry-run variables
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            root = os.path.normpath(os.path.join(m.group(1).strip(), ".."))
            if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
                return root
    except (OSError, subprocess.SubprocessError):
        pass
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _wheel_cuda_dirs():
    """Headers/libraries that CUDA torch wheels ship under site-packages/nvidia/ (cusparse.h, cublas_v2.h, ...),
    which a minimal system toolkit may lack."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    inc, lib = [], []
    for root in sorted(glob.glob(os.path.join(site, "nvidia", "*"))):
        if os.path.isdir(os.path.join(root, "include")):
            inc.append(os.path.join(root, "include"))
        for sub in ("lib", "lib64"):
            if os.path.isdir(os.path.join(root, sub)):
                lib.append(os.path.join(root, sub))
    return inc, lib


def _build_request():
    """'force', 'never' or 'auto' from FASTPROMPT_CUDA_BUILD / FASTPROMPT_SKIP_CUDA_BUILD."""
    if os.environ.get("FASTPROMPT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "never"
    value = os.environ.get("FASTPROMPT_CUDA_BUILD", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "never"
    return "auto"


def _visible_gpu_archs(torch):
    """'8.0;9.0'-style list of the visible GPUs' architectures, or None without a usable GPU."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # a driver problem is "no GPU" for the build decision
        return None
    return ";".join(f"{major}.{minor}" for major, minor in caps) or None


def _cuda_extension():
    """Returns (ext_modules, cmdclass); empty when the CUDA build is skipped, with one line saying why."""
    request = _build_request()
    if request == "never":
        _say("FASTPROMPT_CUDA_BUILD=0 / FASTPROMPT_SKIP_CUDA_BUILD=1; installing pure Python (no fastprompt._C)")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable in the build environment; installing pure Python (no fastprompt._C). "
             "For the CUDA kernels: pip install --no-build-isolation .")
        return [], {}
    if not torch.version.cuda:
        _say(f"torch {torch.__version__} is a CPU build; installing pure Python (no fastprompt._C)")
        return [], {}
    gpu_archs = _visible_gpu_archs(torch)
    if request == "auto" and gpu_archs is None:
        # Compiling kernels nothing here can run costs minutes: opt in with FASTPROMPT_CUDA_BUILD=1.
        _say("no CUDA GPU visible; installing pure Python (no fastprompt._C). Set FASTPROMPT_CUDA_BUILD=1 to "
             "compile the CUDA kernels anyway (about 3-4 minutes on 2 cores)")
        return [], {}
    nvcc = _find_nvcc()
    if nvcc is None:
        _say("nvcc not found (set CUDA_HOME or put nvcc on PATH); installing pure Python (no fastprompt._C)")
        return [], {}
    if not os.environ.get("CUDA_HOME"):
        cuda_home = _cuda_home_from_nvcc(nvcc)
        if cuda_home is None:
            _say(f"cannot locate the CUDA toolkit of {nvcc}; installing pure Python (no fastprompt._C)")
            return [], {}
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", gpu_archs or DEFAULT_ARCHS)

    # ninja from the venv's bin/ (pip's ninja package) even when that folder is not on PATH.
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")) and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = ";".join(a.replace("+PTX", "").replace(".", "").strip()
                     for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a.strip())
    nvcc_version = _nvcc_version(nvcc)
    cuda_home = os.environ["CUDA_HOME"]
    wheel_inc, wheel_lib = _wheel_cuda_dirs()
    # Only bindings.cpp (through ATen/cuda headers) needs cusparse.h/cublas_v2.h. -idirafter keeps the toolkit's
    # own headers first and uses the wheel's only for what the toolkit lacks.
    cxx_extra = []
    if not os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        for d in wheel_inc:
            cxx_extra += ["-idirafter", d]
    defines = [f'-DFASTPROMPT_CUDA_ARCHS="{archs}"', f'-DFASTPROMPT_NVCC_VERSION="{nvcc_version}"']
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "bindings.cpp")]
    _say(f"building fastprompt._C for archs {archs} with nvcc {nvcc_version} (CUDA_HOME={cuda_home}, "
         f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}, {len(sources)} sources); expect about "
         f"{2 * len(archs.split(';'))} minutes on 2 cores (pip -v shows the compile steps)")
    ext = CUDAExtension(
        name="fastprompt._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        library_dirs=wheel_lib,
        extra_compile_args={
            "cxx": ["-O3"] + defines + cxx_extra,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=_packages(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
