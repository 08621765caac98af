"""The environment step of ``bench/gpu_check.py``: what torch, CUDA and faiss this venv has, and
putting the faiss GPU build in place of faiss-cpu when a CUDA device is present.

The swap follows ``make install-gpu`` (``pip uninstall faiss-cpu``, then
``pip install "faiss-gpu-cu12>=1.8"``, here with its dependencies), with two guards a bench
run needs and the Makefile does not: the wheel is fetched *before* anything is removed (from the configured
index or mirror, or with ``--no-index --find-links WHEELS`` from a folder carried in), and
faiss-cpu's installed files are copied aside first and put back when the GPU build does not
import or sees no GPU. Every command run and its outcome goes into the report, and the venv
always ends with a working faiss.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

FAISS_GPU_SPEC = "faiss-gpu-cu12>=1.8"  # the Makefile's install-gpu: keep the two in step
FAISS_GPU_DIST = "faiss-gpu-cu12"
FAISS_CPU_DIST = "faiss-cpu"

# Run in a fresh interpreter: a faiss installed by this step is only seen by a new process.
_PROBE = """
import json, platform
report = {"python": platform.python_version()}
try:
    import torch
    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["gpu_count"] = torch.cuda.device_count()
        report["gpu_name"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        report["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        report["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    report["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import faiss
    report["faiss"] = faiss.__version__
    report["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
except Exception as exc:
    report["faiss_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


def probe(python: str = sys.executable, timeout_s: float = 120.0) -> dict[str, Any]:
    """torch / CUDA / GPU / faiss facts as seen by a fresh ``python`` process."""
    done = subprocess.run(
        [python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        return {"probe_error": done.stderr.strip()[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _pip(steps: list[dict[str, Any]], args: list[str], timeout_s: float) -> int:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=max(timeout_s, 1.0), check=False
        )
        rc, tail = done.returncode, (done.stdout + done.stderr).strip()[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout_s:.0f} s"
    steps.append({"command": "pip " + " ".join(args), "rc": rc, "output_tail": tail})
    return rc


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _back_up(dist: str, backup: Path) -> tuple[Path, list[Path]]:
    """Copy ``dist``'s installed files to ``backup``; return its site folder and the files."""
    distribution = metadata.distribution(dist)
    site = Path(str(distribution.locate_file(""))).resolve()
    copied = []
    for file in distribution.files or ():
        source = Path(str(distribution.locate_file(file))).resolve()
        if source.is_file() and source.is_relative_to(site):
            target = backup / source.relative_to(site)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(source.relative_to(site))
    return site, copied


def _restore(site: Path, backup: Path, files: list[Path]) -> None:
    for relative in files:
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(backup / relative, site / relative)


def install_faiss_gpu(work_dir: Path, wheels: Path | None, timeout_s: float) -> dict[str, Any]:
    """Replace faiss-cpu with the faiss GPU wheel in this venv, or leave it as it was.

    Returns ``{"installed": bool, "note": str, "steps": [...]}``; never raises for pip failures.
    """
    steps: list[dict[str, Any]] = []
    source = ["--no-index", "--find-links", str(wheels)] if wheels else []
    download_dir = work_dir / "faiss-gpu-wheel"
    download_dir.mkdir(parents=True, exist_ok=True)
    pip_download = ["download", "--no-deps", "-d", str(download_dir), *source, FAISS_GPU_SPEC]
    if _pip(steps, pip_download, timeout_s * 0.6) != 0:
        where = f"from {wheels}" if wheels else "from the package index (no network or mirror?)"
        note = f"could not fetch {FAISS_GPU_SPEC} {where}: CPU faiss kept"
        return {"installed": False, "note": note, "steps": steps}
    wheel = sorted(download_dir.glob("faiss_gpu_cu12-*.whl"))[-1]
    backup_dir = work_dir / "faiss-cpu-backup"
    site, backed_up = Path(), list[Path]()
    had_cpu = _installed(FAISS_CPU_DIST)
    if had_cpu:
        site, backed_up = _back_up(FAISS_CPU_DIST, backup_dir)
        _pip(steps, ["uninstall", "-y", FAISS_CPU_DIST], 120)
    # With its dependencies (numpy>=2, the CUDA 12 runtime and cuBLAS wheels): pip skips the
    # ones present, and a torch built for another CUDA major version lacks the last two.
    rc = _pip(steps, ["install", *source, str(wheel)], timeout_s * 0.4)
    after = probe()
    if rc == 0 and after.get("faiss_gpus", 0) > 0:
        return {"installed": True, "note": f"installed {wheel.name}", "steps": steps}
    why = after.get("faiss_error") or f"faiss sees {after.get('faiss_gpus', 0)} GPUs"
    if rc == 0:
        _pip(steps, ["uninstall", "-y", FAISS_GPU_DIST], 120)
    if had_cpu:
        _restore(site, backup_dir, backed_up)
    note = f"{wheel.name} did not work ({why}): faiss-cpu restored"
    return {"installed": False, "note": note, "steps": steps}
