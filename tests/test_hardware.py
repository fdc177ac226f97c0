"""Hardware probing: the CPU, and NVIDIA GPUs exactly when the driver lists some."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import nvidia_gpus

from localrun.hardware import MemorySampler, physical_cores, probe, probe_cuda, process_rss_bytes


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
    sampler = MemorySampler(interval_s=0.0)
    start = sampler.peak_ram_bytes
    block = bytearray(64 * 1024 * 1024)  # touch 64 MB
    block[::4096] = b"x" * len(block[::4096])
    sampler.sample()
    assert sampler.peak_ram_bytes >= start + 60 * 1024 * 1024
    if not nvidia_gpus():  # without a GPU there is no VRAM figure at all
        assert sampler.vram_bytes is None and sampler.peak_vram_bytes is None
    assert process_rss_bytes() > 0
    del block
