"""`leantune doctor`: what this environment is, and whether leantune's tested set holds here.

Dependency drift is the anchors' users' 14th pain point: a fresh install pulls a newer transformers and
something breaks that worked yesterday. leantune ships the exact versions its suite passed with
(leantune/assets/constraints.txt, what setup.sh and CI install); doctor prints the versions in use beside
them, the device and whether it computes bf16 in hardware, and whether bitsandbytes' kernels run here
(a 4-bit round trip on the device, checked against its own dequantization error bound).

Exit status: 0 when every check passes (version warnings included: an untested version may well work),
1 when a required package is missing or a check fails.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources

# The packages whose versions matter to leantune's results, in the order they are printed.
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "peft", "bitsandbytes", "gguf",
            "huggingface_hub", "accelerate", "datasets", "pyarrow", "numpy", "tensorboard")
REQUIRED = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "pyyaml")


@dataclass
class Report:
    python: str
    packages: dict[str, str | None]          # name -> version in use (None: not installed)
    tested: dict[str, str]                   # name -> version in the lock set
    device: dict = field(default_factory=dict)
    bitsandbytes: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def tested_versions() -> dict[str, str]:
    """The lock set shipped with leantune: {normalized name: version}."""
    text = resources.files("leantune").joinpath("assets/constraints.txt").read_text(encoding="utf-8")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _public(version: str) -> str:
    return version.split("+", 1)[0]  # 2.13.0+cpu is 2.13.0 built for the CPU


def version_warnings(packages: dict[str, str | None], tested: dict[str, str]) -> list[str]:
    out = []
    for name, version in packages.items():
        want = tested.get(_norm(name))
        if version is None or want is None or _public(version) == _public(want):
            continue
        out.append(f"{name} {version} is not the tested {want}: if something breaks, "
                   f"`pip install -c leantune/assets/constraints.txt {name}=={want}` (or `bash setup.sh`) restores it")
    return out


def device_facts() -> dict:
    import torch

    from ..device import cpu_flags, cpu_has_fast_bf16, pick_dtype, resolve_device

    device = resolve_device("auto")
    facts: dict = {"device": str(device), "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
                   "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     gpus=torch.cuda.device_count())
    else:
        facts.update(name=_cpu_name(), cores=_cores(),
                     bf16_flags=sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()))
    facts["bf16_in_hardware"] = device.type == "cuda" and pick_dtype("auto", device) == torch.bfloat16 \
        or device.type == "cpu" and cpu_has_fast_bf16()
    facts["dtype_auto"] = str(pick_dtype("auto", device)).replace("torch.", "")
    return facts


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bitsandbytes_check(device: str) -> dict:
    """Quantize a random weight to NF4 on the device and back: the kernels load and compute."""
    try:
        import bitsandbytes.functional as F
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return {"ok": False, "error": f"import failed: {type(e).__name__}: {e}".splitlines()[0]}
    try:
        w = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)).to(device)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        back = F.dequantize_4bit(q, state).float()
        rel = float((back - w).norm() / w.norm())
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    # NF4 in blocks of 64 loses ~10% of a Gaussian weight's norm; a broken kernel is far off (or NaN).
    ok = rel == rel and rel < 0.2
    return {"ok": ok, "nf4_relative_error": round(rel, 4)}


def diagnose() -> Report:
    packages = {name: installed(name) for name in PACKAGES}
    report = Report(python=platform.python_version(), packages=packages, tested=tested_versions())
    for name in REQUIRED:
        if installed(name) is None:
            report.failures.append(f"{name} is not installed: `bash setup.sh` (or `pip install leantune`) installs it")
    if report.failures:
        return report
    report.warnings += version_warnings(packages, report.tested)
    py_tested = "3.11"
    if not report.python.startswith(py_tested):
        report.warnings.append(f"Python {report.python}: the tested set was built on Python {py_tested}")
    try:
        report.device = device_facts()
    except Exception as e:  # noqa: BLE001
        report.failures.append(f"torch cannot report its device: {type(e).__name__}: {e}")
        return report
    if packages["bitsandbytes"] is None:
        report.warnings.append("bitsandbytes is not installed: QLoRA (quant.bits 4/8) and 8-bit optimizers "
                               "are unavailable")
    else:
        report.bitsandbytes = bitsandbytes_check(report.device["device"])
        if not report.bitsandbytes["ok"]:
            report.failures.append(f"bitsandbytes' kernels do not work on {report.device['device']}: "
                                   f"{report.bitsandbytes.get('error') or report.bitsandbytes}")
    return report


def render(report: Report) -> str:
    lines = [f"{'python':<16} {report.python}"]
    for name, version in report.packages.items():
        want = report.tested.get(_norm(name))
        mark = "" if version is None or want is None or _public(version) == _public(want) else f"   (tested: {want})"
        lines.append(f"{name:<16} {version or 'not installed'}{mark}")
    d = report.device
    if d:
        where = f"{d['name']}, {d['memory_gib']} GiB, compute {d['capability']}" if d["device"].startswith("cuda") \
            else f"{d['name']}, {d['cores']} cores"
        lines.append(f"{'device':<16} {d['device']} ({where}); torch built for {d['torch_build']}")
        bf16 = "yes" if d["bf16_in_hardware"] else "no (emulated: slower than fp32)"
        lines.append(f"{'bf16':<16} {bf16}; dtype auto -> {d['dtype_auto']}")
    if report.bitsandbytes:
        b = report.bitsandbytes
        lines.append(f"{'bitsandbytes':<16} kernels work (NF4 round trip, relative error "
                     f"{b['nf4_relative_error']})" if b["ok"] else f"{'bitsandbytes':<16} FAILED: {b.get('error', b)}")
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"error: {f}" for f in report.failures]
    if not report.warnings and not report.failures:
        lines.append("all checks passed; every version is the tested one")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    report = diagnose()
    print(json.dumps(asdict(report), indent=2) if as_json else render(report))
    return 1 if report.failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main("--json" in sys.argv))


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, device, bf16 support and bitsandbytes' state; warn on untested versions",
                       description="Checks this environment against the versions leantune was tested with "
                       "(leantune/assets/constraints.txt), reports the device and whether it computes bf16 in "
                       "hardware, and runs a 4-bit round trip through bitsandbytes' kernels. Exit 1 when a check fails.")
    p.add_argument("--json", action="store_true", help="the same report as JSON")
