"""Hardware probing: the CPU, and NVIDIA GPUs exactly when the driver lists some."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import nvidia_gpus

from localrun.hardware import physical_cores, probe, probe_cuda


def test_probe_reports_this_cpu():
    devices = probe()
    cpu = devices[0]
    assert cpu.kind == "cpu" and cpu.name
    assert 1 <= cpu.physical_cores <= (os.cpu_count() or 1)
    assert cpu.total_bytes > cpu.free_bytes > 0


def test_cuda_devices_are_the_drivers_gpus():
    gpus = probe_cuda()
    assert len(gpus) == len(nvidia_gpus())
    assert [d.kind for d in probe()] == ["cpu"] + ["cuda"] * len(gpus)
    for gpu in gpus:
        assert gpu.name and gpu.total_bytes >= gpu.free_bytes > 0 and gpu.driver


def _cores_from_cpuinfo() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo: hyper-threads share a pair."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def test_physical_cores_counts_cores_not_threads():
    expected = _cores_from_cpuinfo()
    if expected is None:
        pytest.skip("no /proc/cpuinfo core ids on this system")
    assert physical_cores() == expected
    assert physical_cores() <= (os.cpu_count() or 1)


def test_memory_sampler_tracks_peak_rss():
    # In a fresh process: a test process that freed memory earlier can hand the same resident pages
    # back to a new allocation, and RSS would not move.
    code = """
from localrun.hardware import MemorySampler, process_rss_bytes
sampler = MemorySampler(interval_s=0.0)
start = sampler.peak_ram_bytes
block = bytearray(64 * 1024 * 1024)
block[::4096] = b"x" * len(block[::4096])
sampler.sample()
print(sampler.peak_ram_bytes - start, process_rss_bytes(), sampler.vram_bytes, sampler.peak_vram_bytes)
"""
    grown, rss, vram, peak_vram = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(grown) >= 60 * 1024 * 1024
    assert int(rss) > 0
    if not nvidia_gpus():  # without a GPU there is no VRAM figure at all
        assert vram == "None" and peak_vram == "None"
