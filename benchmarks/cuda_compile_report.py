"""Compile report for the csrc/ kernels: registers, shared memory, spills, tensor-core instructions.

Each csrc/*.cu is compiled alone to a cubin per arch with `nvcc -Xptxas -v`; ptxas' resource lines are parsed per
kernel, and `cuobjdump -sass` counts HMMA (mma.sync) / HGMMA (wgmma) instructions per kernel. Prints a markdown
table and writes it to benchmarks/cuda_compile_report.md. Spills in a hot kernel are a defect: --fail-on-spill
makes them an error (exit 1).

cuobjdump: taken from PATH, CUDA_HOME/bin, the nvidia-cuda-cuobjdump wheel, or the copy Triton ships.

    python benchmarks/cuda_compile_report.py [--archs 80,90] [--jobs 2] [--fail-on-spill]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
OUT_MD = os.path.join(ROOT, "benchmarks", "cuda_compile_report.md")


def find_tool(name: str):
    cands = [shutil.which(name)]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", name))
    cands.append(os.path.join("/usr/local/cuda/bin", name))
    site = sysconfig.get_paths()["purelib"]
    cands += glob.glob(os.path.join(site, "nvidia", "*", "bin", name))
    cands.append(os.path.join(site, "triton", "backends", "nvidia", "bin", name))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """prefix_attention_fwd_kernel<__nv_bfloat16, 128, 4, 64> etc., without namespaces and arguments."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"\b(fastprompt|attn|gm)::", "", s)
    s = re.sub(r"\(.*\)$", "", s)
    s = s.replace("void ", "")
    return s


def dynamic_smem(demangled: str):
    """Dynamic shared memory the launcher requests (mirrors FwdTraits::kSmemBytes)."""
    m = re.search(r"prefix_attention_fwd_kernel<([^,]+), (\d+), (\d+), (\d+)>", demangled)
    if not m:
        return 0
    d, nwarps, bn = int(m.group(2)), int(m.group(3)), int(m.group(4))
    bm, rs = 16 * nwarps, d + 8
    return bm * rs * 2 + 4 * bn * rs * 2 + 2 * bn


def compile_one(nvcc, cuobjdump, src, arch, tmp):
    cubin = os.path.join(tmp, f"{os.path.basename(src)}.sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", "-std=c++17", "-O3", "--use_fast_math", f"-arch=sm_{arch}", "-Xptxas", "-v",
           "-I", CSRC, src, "-o", cubin]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src} sm_{arch}:\n{res.stderr}")
    kernels, current = {}, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = dict(regs=0, smem=0, stack=0, spill_st=0, spill_ld=0, hmma=0, hgmma=0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    sass_ok = False
    if cuobjdump:
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
        if sass.returncode == 0:
            sass_ok = True
            current = None
            for line in sass.stdout.splitlines():
                m = re.search(r"Function : (\S+)", line)
                if m:
                    current = m.group(1)
                    continue
                if current in kernels:
                    if re.search(r"\bHGMMA\b", line):
                        kernels[current]["hgmma"] += 1
                    elif re.search(r"\bHMMA\b", line):
                        kernels[current]["hmma"] += 1
    return src, arch, kernels, sass_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--fail-on-spill", action="store_true")
    ap.add_argument("--out", default=OUT_MD)
    args = ap.parse_args(argv)
    nvcc = find_tool("nvcc")
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    cuobjdump = find_tool("cuobjdump")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    rows, sass_missing = [], False
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futs = [pool.submit(compile_one, nvcc, cuobjdump, s, a, tmp) for s in sources for a in archs]
        for fut in futs:
            src, arch, kernels, sass_ok = fut.result()
            sass_missing |= not sass_ok
            names = demangle(list(kernels))
            for mangled, r in kernels.items():
                rows.append((os.path.basename(src), arch, short_name(names[mangled]), r, dynamic_smem(names[mangled]),
                             sass_ok))
    nvcc_ver = re.search(r"release [\d.]+, V[\d.]+", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                      text=True).stdout)
    lines = [
        "# CUDA compile report",
        "",
        f"nvcc: {nvcc_ver.group(0) if nvcc_ver else 'unknown'}; flags: -O3 --use_fast_math; "
        f"cuobjdump: {'yes' if cuobjdump and not sass_missing else 'NOT FOUND (tensor-core column unknown)'}.",
        "smem = static (ptxas) + dynamic (launcher); TC = tensor-core instructions in the SASS (HMMA = mma.sync, "
        "HGMMA = wgmma).",
        "",
        "| file | arch | kernel | regs | smem static+dynamic (B) | stack (B) | spill st/ld (B) | TC instr |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    spills = []
    for f, arch, name, r, dyn, sass_ok in sorted(rows, key=lambda x: (x[0], x[1], x[2])):
        tc = (f"HMMA x{r['hmma']}" if r["hmma"] else "") + (f" HGMMA x{r['hgmma']}" if r["hgmma"] else "")
        tc = tc.strip() or ("none" if sass_ok else "?")
        if r["spill_st"] or r["spill_ld"]:
            spills.append(f"{f} sm_{arch} {name}")
        lines.append(f"| {f} | sm_{arch} | `{name}` | {r['regs']} | {r['smem']}+{dyn} | {r['stack']} | "
                     f"{r['spill_st']}/{r['spill_ld']} | {tc} |")
    lines += ["", f"Spills: {'none' if not spills else '; '.join(spills)}."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    if spills and args.fail_on_spill:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
