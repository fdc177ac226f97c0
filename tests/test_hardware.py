"""Hardware probing on a machine with no NVIDIA driver and no Metal."""

from __future__ import annotations

import os

from localrun.hardware import MemorySampler, physical_cores, probe, probe_cuda, process_rss_bytes


def test_probe_reports_this_cpu():
    devices = probe()
    cpu = devices[0]
    assert cpu.kind == "cpu" and cpu.name
    assert 1 <= cpu.physical_cores <= (os.cpu_count() or 1)
    assert cpu.total_bytes > cpu.free_bytes > 0


def test_no_nvidia_driver_means_no_cuda_devices():
    assert probe_cuda() == []
    assert [d.kind for d in probe()] == ["cpu"]


def test_physical_cores_matches_psutil():
    import psutil

    assert physical_cores() == (psutil.cpu_count(logical=False) or os.cpu_count())


def test_memory_sampler_tracks_peak_rss():
    sampler = MemorySampler(interval_s=0.0)
    start = sampler.peak_ram_bytes
    block = bytearray(64 * 1024 * 1024)  # touch 64 MB
    block[::4096] = b"x" * len(block[::4096])
    sampler.sample()
    assert sampler.peak_ram_bytes >= start + 60 * 1024 * 1024
    assert sampler.vram_bytes is None and sampler.peak_vram_bytes is None
    assert process_rss_bytes() > 0
    del block
