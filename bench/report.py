"""The one table: rows of every benchmark, printed with rich and written as JSON and markdown."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PASS = "PASS"
MISS = "MISS"


@dataclass
class Row:
    """One line of the table; ``verdict`` is PASS/MISS against ``target``, or empty."""

    metric: str
    value: str
    target: str = ""
    verdict: str = ""


@dataclass
class Section:
    """One benchmark's rows, notes and raw data (the raw data goes to results.json only)."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def add(self, metric: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append(Row(metric, value, target, verdict))

    def check(self, metric: str, value: str, target: str, ok: bool | None) -> None:
        """Add a row judged against a target; ``ok=None`` means not measurable this time."""
        verdict = "n/a" if ok is None else (PASS if ok else MISS)
        self.rows.append(Row(metric, value, target, verdict))


def verdict_of(ok: bool) -> str:
    return PASS if ok else MISS


# --- the machine -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM, load, Python and library versions: what the figures depend on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = math.nan
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if match:
            ram = int(match.group(1)) / (1 << 20)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "psutil"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(ram, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def machine_line(info: dict[str, Any]) -> str:
    versions = info["versions"]
    load = ", ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    return (
        f"{info['nproc']} CPUs ({info['cpu_model']}), {info['ram_gib']} GiB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, trl {versions['trl']}, "
        f"peft {versions['peft']}; load average at start {load}"
    )


# --- output ------------------------------------------------------------------------------


def render(sections: list[Section], header: str, console: Console) -> None:
    """Print every section's rows as one table, a rule between benchmarks."""
    table = Table(title=header, show_lines=False, title_justify="left")
    table.add_column("benchmark", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target")
    table.add_column("", justify="center")
    colours = {PASS: "green", MISS: "red"}
    for section in sections:
        rows = section.rows or [Row("(failed)", section.error or "no result")]
        for index, row in enumerate(rows):
            colour = colours.get(row.verdict)
            verdict = f"[{colour}]{row.verdict}[/]" if colour else row.verdict
            table.add_row(
                section.title if index == 0 else "",
                row.metric,
                row.value,
                row.target,
                verdict,
                end_section=index == len(rows) - 1,
            )
    console.print(table)
    for section in sections:
        for note in section.notes:
            console.print(f"[dim]{section.key}:[/] {note}", highlight=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, meta: dict[str, Any], sections: list[Section]) -> None:
    document = {
        **meta,
        "sections": [
            {
                "key": s.key,
                "title": s.title,
                "seconds": round(s.seconds, 1),
                "error": s.error,
                "rows": [asdict(r) for r in s.rows],
                "notes": s.notes,
                "data": s.data,
            }
            for s in sections
        ],
    }
    path.write_text(json.dumps(_jsonable(document), indent=1) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, meta: dict[str, Any], sections: list[Section]) -> None:
    lines = [
        "# trainwarden benchmark results",
        "",
        f"`python -m bench{' --quick' if meta['mode'] == 'quick' else ''}`, "
        f"{meta['finished_at']}, {meta['total_seconds']:.0f} s in all.",
        "",
        f"Machine: {machine_line(meta['machine'])}.",
        "",
        "Every comparison was measured A/B interleaved in this one run; figures are "
        "medians (p95 where stated) and ratios. What each row means: bench/README.md.",
        "",
    ]
    if meta.get("rejudged_at"):
        lines += [
            f"Verdicts re-applied {meta['rejudged_at']} to this run's stored samples "
            "(`python -m bench --rejudge`), under the rules of bench/README.md.",
            "",
        ]
    lines += [
        "| benchmark | metric | value | target | |",
        "| --- | --- | ---: | --- | :---: |",
    ]
    for section in sections:
        rows = section.rows or [Row("(failed)", section.error or "no result")]
        for index, row in enumerate(rows):
            title = section.title if index == 0 else ""
            lines.append(
                f"| {_cell(title)} | {_cell(row.metric)} | {_cell(row.value)} | "
                f"{_cell(row.target)} | {row.verdict} |"
            )
    notes = [(s.key, n) for s in sections for n in s.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- **{key}**: {note}" for key, note in notes]
    path.write_text("\n".join(lines) + "\n")


__all__ = [
    "MISS",
    "PASS",
    "Row",
    "Section",
    "machine",
    "machine_line",
    "render",
    "verdict_of",
    "write_json",
    "write_markdown",
]
