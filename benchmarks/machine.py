"""Machine facts written into every benchmark result (issue #16.6): CPU model, cores, load average, versions."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """CPU model, usable cores, 1/5/15-min load average now, platform, Python, torch and (if present) GPU."""
    info = {"cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "load_avg": load_average(),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (``VmHWM``) to its current RSS (Linux >= 4.0), so that a
    later peak belongs to what ran after it; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_result(path: str | Path, result: dict) -> None:
    """Write ``result`` with ``machine`` (and the load average at the end) as indented JSON."""
    result = {**result, "machine": {**machine_info(), **result.get("machine", {})}}
    result["machine"]["load_avg_at_end"] = load_average()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
