"""kernel/features.py: each answer agrees with an independent oracle on this kernel.

The oracles: the kernel's own build configuration (/proc/config.gz), its
symbol table (/proc/kallsyms, root only) and, for ref_ctr_offset, a real
uprobe definition with a semaphore.
"""
import gzip
import os
import re

import pytest

from sdtrace.kernel import features, tracefs

UPROBE_PMU_FORMAT = "/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset"


def kernel_config():
    with gzip.open("/proc/config.gz", "rt") as config:
        return dict(line.strip().split("=", 1) for line in config if "=" in line)


def kernel_symbols():
    with open("/proc/kallsyms") as symbols:
        return {line.split()[2] for line in symbols}


def release():
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())


def test_pmu_format_files_parse():
    assert features.parse_format("config:32-63\n") == ("config", 32, 63)
    assert features.parse_format("config:0") == ("config", 0, 0)
    assert features.parse_format("config1:0-63") == ("config1", 0, 63)
    for text in ("", "config", "config:", "config:a-b"):
        with pytest.raises(ValueError):
            features.parse_format(text)


def test_the_pmu_ref_ctr_field_is_the_sysfs_file():
    """Root-free: sysfs is world-readable."""
    feature = features.check("uprobe_pmu_ref_ctr")
    assert feature.available == os.path.exists(UPROBE_PMU_FORMAT)
    with open(UPROBE_PMU_FORMAT) as file:
        field, first, last = features.parse_format(file.read())
    assert f"bits {first}-{last} of {field}" in feature.detail


def test_checks_are_cached_and_listed_in_order():
    assert features.check("uprobe_pmu") is features.check("uprobe_pmu")
    assert [feature.name for feature in features.check_all()] == list(features.FEATURES)
    for feature in features.check_all():
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", feature.kernel) and feature.detail


@pytest.mark.kernel
def test_tracefs_ref_ctr_agrees_with_a_real_definition(program, group):
    feature = features.check("tracefs_ref_ctr")
    try:
        tracefs.add_uprobe(group, "with_semaphore", program.path, program.site,
                           ref_ctr_offset=program.semaphore)
        accepted = True
    except tracefs.SdtraceError:
        accepted = False
    assert feature.available == accepted, feature


@pytest.mark.kernel
def test_features_agree_with_the_kernel_configuration():
    config = kernel_config()
    expected = {
        "tracefs_uprobes": config.get("CONFIG_UPROBE_EVENTS") == "y",
        "fanotify_permission": config.get("CONFIG_FANOTIFY_ACCESS_PERMISSIONS") == "y",
        "proc_connector": config.get("CONFIG_PROC_EVENTS") == "y",
        "bpf": config.get("CONFIG_BPF_SYSCALL") == "y",
    }
    assert {name: features.check(name).available for name in expected} == expected


@pytest.mark.kernel
def test_bpf_features_agree_with_the_kernel_symbols():
    symbols = kernel_symbols()
    assert features.check("bpf_ringbuf").available == ("ringbuf_map_alloc" in symbols)
    assert features.check("bpf_uprobe_multi").available == (
        "bpf_uprobe_multi_link_attach" in symbols and release() >= (6, 10))
