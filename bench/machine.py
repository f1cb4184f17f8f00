"""What every benchmark prints first (the machine), and how it prints its table."""

from __future__ import annotations

import json
import os
import platform
import sys
import timeit
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "machine",
    "print_machine",
    "print_table",
    "reference_loop_ms",
    "rss_kb",
    "rss_parts_kb",
    "write_json",
]


def machine() -> dict[str, str]:
    """CPU model, core count, Python and load average (figures are only comparable as
    ratios measured in the same run: machines here are shared and noisy)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "speed": f"sum(range(10**6)) in {reference_loop_ms():.1f} ms (best of 5)",
    }


@cache
def reference_loop_ms() -> float:
    """Milliseconds one ``sum(range(10**6))`` takes here (best of 5): the CPU's speed."""
    # The same model name covers hosts whose cores run at very different speeds (we saw
    # 10.8 and 18.2 ms here, both "AMD EPYC"): a fixed interpreter loop tells a reader
    # which machine a table came from, so figures against absolute targets compare.
    return min(timeit.repeat("sum(range(10**6))", number=1, repeat=5)) * 1000


def print_machine(extra: Mapping[str, str] | None = None) -> None:
    """Print the machine description block."""
    info = {**machine(), **(extra or {})}
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """An aligned plain-text table (numbers right-aligned)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    print(line(list(headers)))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rss_kb() -> int:
    """This process's resident set size in KiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_parts_kb() -> dict[str, int]:
    """RSS split into anonymous (heap: what objects cost) and file-backed (mapped files,
    e.g. LMDB pages that were read, which the kernel can drop at will), in KiB."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            parts[key] = int(value.split()[0])
    return parts


def write_json(path: str, figures: Mapping[str, Any]) -> None:
    """Write one flat JSON object: the figures, plus ``machine_*`` strings."""
    flat: dict[str, Any] = {k: v for k, v in figures.items() if isinstance(v, int | float)}
    flat.update({f"machine_{k}": v for k, v in machine().items()})
    flat["machinereference_loop_ms"] = reference_loop_ms()
    Path(path).write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
