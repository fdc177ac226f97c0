"""Hardware probing and memory reading, in one module; nothing here runs at import time."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One compute device: kind is "cpu", "cuda" or "metal"."""

    kind: str
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    physical_cores: int | None = None
    logical_cores: int | None = None
    driver: str | None = None
    compute_capability: str | None = None


def physical_cores() -> int:
    """Physical cores (llama.cpp's own default of cpu_count // 2 runs on one thread on a 2-core box)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_cpu() -> DeviceInfo:
    import psutil

    mem = psutil.virtual_memory()
    return DeviceInfo(
        kind="cpu",
        index=0,
        name=_cpu_name(),
        total_bytes=mem.total,
        free_bytes=mem.available,
        physical_cores=physical_cores(),
        logical_cores=psutil.cpu_count(logical=True),
    )


def _may_have_nvidia() -> bool:
    """False where no NVIDIA driver can be present (Linux without its device or proc entries, WSL's /dev/dxg
    counts): NVML is then not even imported, which saves every CPU-only start ~15 ms."""
    import sys

    if sys.platform != "linux":
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg"))


def probe_cuda() -> list[DeviceInfo]:
    """NVIDIA GPUs through NVML; an empty list when there is no driver."""
    if not _may_have_nvidia():
        return []
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append(
                DeviceInfo(
                    kind="cuda",
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    driver=driver.decode() if isinstance(driver, bytes) else driver,
                    compute_capability=f"{major}.{minor}",
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def probe_metal() -> list[DeviceInfo]:
    """Apple Silicon: Metal shares the unified memory with the CPU."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    import psutil

    mem = psutil.virtual_memory()
    return [
        DeviceInfo(
            kind="metal",
            index=0,
            name=f"Apple {platform.machine()} GPU (Metal)",
            total_bytes=mem.total,
            free_bytes=mem.available,
        )
    ]


def probe() -> list[DeviceInfo]:
    """Every device this machine has: the CPU first, then GPUs."""
    return [probe_cpu(), *probe_cuda(), *probe_metal()]


@lru_cache(maxsize=1)
def llama_cpp_build() -> dict[str, bool | str]:
    """What the installed llama.cpp was built with (GPU offload, CUDA, Metal) and its version."""
    from localrun.llama_lib import llama_cpp as load

    llama_cpp = load()

    info: dict[str, bool | str] = {"version": getattr(llama_cpp, "__version__", "?")}
    info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    info["system_info"] = system
    info["cuda"] = "CUDA" in system
    info["metal"] = "METAL" in system.upper() and platform.system() == "Darwin"
    return info


def process_rss_bytes() -> int:
    """Resident memory of this process right now."""
    import psutil

    return psutil.Process().memory_info().rss


class MemorySampler:
    """Reads process RSS and GPU memory, throttled so a fast decode loop pays almost nothing.

    VRAM is torch's peak allocation when torch already runs on CUDA here, else this process's
    use reported by NVML, else None (no GPU).
    """

    def __init__(self, *, interval_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval_s = interval_s
        self._last_t = 0.0
        self.ram_bytes = self._proc.memory_info().rss
        self.peak_ram_bytes = self.ram_bytes
        self._vram_reader = _vram_reader()
        self.vram_bytes = self._vram_reader() if self._vram_reader else None
        self.peak_vram_bytes = self.vram_bytes

    def sample(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_t < self._interval_s:
            return
        self._last_t = now
        self.ram_bytes = self._proc.memory_info().rss
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
        if self._vram_reader is not None:
            self.vram_bytes = self._vram_reader()
            self.peak_vram_bytes = max(self.peak_vram_bytes or 0, self.vram_bytes)


@lru_cache(maxsize=1)
def _nvml_handles() -> tuple:
    """NVML handles of every GPU, probed once per process; empty without a driver."""
    if not _may_have_nvidia():
        return ()
    try:
        import pynvml

        pynvml.nvmlInit()
        return tuple(pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # no driver, no library: no VRAM figure
        return ()


def _vram_reader():
    """A callable returning this process's GPU bytes, or None when there is no CUDA GPU."""
    import sys

    torch = sys.modules.get("torch")  # only if already imported: never pull torch in for a GGUF chat
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return lambda: int(max(torch.cuda.max_memory_allocated(), torch.cuda.memory_reserved()))
    if not _nvml_handles():
        return None
    pid = os.getpid()
    return lambda: process_vram_bytes(pid) or 0


def process_vram_bytes(pid: int) -> int | None:
    """GPU bytes a process holds on every NVIDIA GPU (NVML), or None without one (a model pool row's VRAM)."""
    handles = _nvml_handles()
    if not handles:
        return None
    import pynvml

    total = 0
    for handle in handles:
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        except pynvml.NVMLError:
            continue
    return total
