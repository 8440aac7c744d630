"""``python -m bench [--quick]``: run every benchmark, print one table, write results.

Execution order differs from the table's: the overhead runs come first after
detection because they calibrate the rest (cold start, step and save time of
the tiny job on this machine, at this moment), and the restart benchmark only
reads the runs of the goodput and save-interval benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench import advice, detection, goodput, mirror, overhead, restart, standby, validation
from bench.common import (
    FULL,
    QUICK,
    Sizes,
    Workspace,
    median,
    sft,
)
from bench.overhead import Calibration, cold_start, save_seconds, steady_rate
from bench.report import (
    Row,
    Section,
    machine,
    machine_line,
    render,
    write_json,
    write_markdown,
)
from bench.runs import RunRecord, run_job
from tests.support.jobs import trainer_child_argv, write_job
from tests.support.processes import REPO_ROOT, Process

KEYS = (
    "detection",
    "restart",
    "overhead",
    "footprint",
    "goodput",
    "validation",
    "advice",
    "standby",
    "hash",
    "mirror",
)
TITLES = {
    "detection": "1 detection",
    "restart": "2 restart latency",
    "overhead": "3 supervision overhead",
    "footprint": "4 supervisor footprint",
    "goodput": "5 goodput under kills",
    "validation": "6 validation cost",
    "advice": "7 save-interval advice",
    "standby": "8 warm standby",
    "hash": "hash throughput",
    "mirror": "9 remote mirror",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks of trainwarden (see bench/README.md)."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(KEYS)} (restart needs goodput or advice)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / "runs" / "bench",
        help="scratch folder, emptied first but for its model cache (default runs/bench)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench",
        help="where results.json and RESULTS.md go (default bench/)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of OUT/results.json that this run does not redo (with --only)",
    )
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="run nothing: re-apply today's verdict rules to OUT/results.json, rewrite both files",
    )
    return parser.parse_args(argv)


def rejudge(out: Path) -> int:
    """Re-apply the verdict rules to the stored samples of the last run; rewrite its files."""
    document = json.loads((out / "results.json").read_text())
    sections = [
        Section(
            key=raw["key"],
            title=raw["title"],
            rows=[Row(**row) for row in raw["rows"]],
            notes=[note for note in raw["notes"] if not note.startswith("verdict ")],
            data=raw["data"],
            seconds=raw["seconds"],
            error=raw["error"],
        )
        for raw in document.pop("sections")
    ]
    for section in sections:
        if section.key == "overhead" and "pair_ratios" in section.data:
            overhead.judge(section, section.data["pair_ratios"], section.data["ratio"])
        if section.key == "overhead" and "standby_pair_ratios" in section.data:
            data = section.data
            overhead.judge(
                section, data["standby_pair_ratios"], data["standby_ratio"], overhead.STANDBY_ROW
            )
        if section.key == "mirror" and "pair_ratios" in section.data:
            mirror.judge(section, section.data["pair_ratios"], section.data["ratio"])
    document["rejudged_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json(out / "results.json", document, sections)
    write_markdown(out / "RESULTS.md", document, sections)
    render(sections, f"trainwarden bench ({document['mode']}, re-judged)", Console())
    return 0


def calibrate(ws: Workspace) -> Calibration:
    """One short bare run, for when the overhead benchmark (the usual calibration) is skipped."""
    folder = ws.fresh("calibration")
    steps = 60
    job = write_job(
        folder / "job.json", folder / "out", sft(max_steps=steps, save_steps=20, logging_steps=60)
    )
    record = run_job(
        Process(trainer_child_argv(job), ws.env, folder / "child.log"),
        folder / "out",
        label="calibration",
        system="bare",
        cap=900,
    )
    return Calibration(
        cold_start=cold_start(record),
        step=1.0 / steady_rate(record, steps),
        save=median(save_seconds(folder / "out")),
        checkpoints=sorted((folder / "out").glob("checkpoint-*")),
    )


def hashing(sizes: Sizes) -> Section:
    """bench/bench_hash.py, unchanged, with its printout turned into rows."""
    from bench import bench_hash

    section = Section("hash", TITLES["hash"])
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        bench_hash.main(["--mib", str(sizes.hash_mib), "--rounds", str(sizes.hash_rounds)])
    lines = buffer.getvalue().splitlines()
    for line in lines[1:]:
        match = re.match(r"\s+(.+?)\s{2,}([\d.]+ (?:MB/s|x))$", line)
        if match:
            section.add(match.group(1), match.group(2))
    if lines:
        section.notes.append(f"bench/bench_hash.py: {lines[0]}")
    section.data["output"] = lines
    return section


def _merged(out: Path, fresh: list[Section]) -> list[Section]:
    """This run's sections, and the earlier run's for the keys it did not redo, in KEYS order."""
    try:
        document = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return fresh
    when = document.get("finished_at", "an earlier run")
    done = {section.key for section in fresh}
    kept = []
    for raw in document.get("sections", []):
        if raw["key"] in done:
            continue
        notes = [n for n in raw["notes"] if not n.startswith("from the run of ")]
        section = Section(
            key=raw["key"],
            title=raw["title"],
            rows=[Row(**row) for row in raw["rows"]],
            notes=[f"from the run of {when} (kept by --merge)", *notes],
            data=raw["data"],
            seconds=raw["seconds"],
            error=raw["error"],
        )
        kept.append(section)
    every = {s.key: s for s in [*kept, *fresh]}
    return [every[k] for k in KEYS if k in every]


def _empty(workdir: Path) -> None:
    """Remove the scratch runs but keep the model cache (built in ~20 s, deterministic)."""
    if not workdir.is_dir():
        return
    for path in workdir.iterdir():
        if path.name != "cache":
            shutil.rmtree(path, ignore_errors=True)


class Suite:
    """Run benchmarks one by one; a failing one becomes a row, not the end of the suite."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.sections: dict[str, Section] = {}

    def run(self, key: str, body: Callable[[], None]) -> None:
        self.console.log(f"[bold]{TITLES[key]}[/] ...")
        started = time.monotonic()
        try:
            body()
        except Exception as exc:
            self.console.log(f"[red]{key} failed[/]: {exc!r}")
            self.sections[key] = Section(key, TITLES[key], error=f"{type(exc).__name__}: {exc}")
            self.sections[key].data["traceback"] = traceback.format_exc()
        seconds = time.monotonic() - started
        if key in self.sections:
            self.sections[key].seconds += seconds
        self.console.log(f"{TITLES[key]} done in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit 1 if a benchmark could not produce its figures."""
    options = _parse(argv)
    if options.rejudge:
        return rejudge(options.out)
    sizes = QUICK if options.quick else FULL
    wanted = [k.strip() for k in options.only.split(",") if k.strip()] or list(KEYS)
    unknown = sorted(set(wanted) - set(KEYS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}: use {', '.join(KEYS)}")
    console = Console()
    info = machine()
    console.print(f"trainwarden bench ({sizes.name}) on {machine_line(info)}", highlight=False)
    _empty(options.workdir)
    ws = Workspace(options.workdir)
    began = time.monotonic()
    console.log(f"building the built-in model: {ws.warm_up():.0f} s")
    suite = Suite(console)
    sections = suite.sections
    runs: list[RunRecord] = []
    state: dict[str, Calibration] = {}

    def calibration() -> Calibration:
        if "calibration" not in state:
            console.log("calibrating on one short bare run (overhead benchmark skipped)")
            state["calibration"] = calibrate(ws)
        return state["calibration"]

    def do_overhead() -> None:
        over, foot, state["calibration"], _ = overhead.run(ws, sizes)
        sections["overhead"], sections["footprint"] = over, foot

    def do_goodput() -> None:
        section, records = goodput.run(ws, sizes, calibration())
        sections["goodput"] = section
        runs.extend(records)

    def do_advice() -> None:
        section, records = advice.run(ws, sizes, calibration())
        sections["advice"] = section
        runs.extend(records)

    def do_validation() -> None:
        sections["validation"] = validation.run(ws, sizes, calibration())

    if "detection" in wanted:
        suite.run("detection", lambda: sections.__setitem__("detection", detection.run(ws, sizes)))
    if "overhead" in wanted or "footprint" in wanted:
        suite.run("overhead", do_overhead)
    if "goodput" in wanted:
        suite.run("goodput", do_goodput)
    if "advice" in wanted:
        suite.run("advice", do_advice)
    if "restart" in wanted:
        suite.run("restart", lambda: sections.__setitem__("restart", restart.analyse(runs)))
    if "detection" in sections and runs:
        detection.real_job_rows(sections["detection"], runs)
    if "validation" in wanted:
        suite.run("validation", do_validation)
    if "standby" in wanted:
        suite.run("standby", lambda: sections.__setitem__("standby", standby.run(ws, sizes)))
    if "hash" in wanted:
        suite.run("hash", lambda: sections.__setitem__("hash", hashing(sizes)))
    if "mirror" in wanted:
        suite.run("mirror", lambda: sections.__setitem__("mirror", mirror.run(ws, sizes)))

    ordered = [sections[k] for k in KEYS if k in sections and k in wanted]
    if options.merge:
        ordered = _merged(options.out, ordered)
    total = time.monotonic() - began
    finished_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "mode": sizes.name,
        "finished_at": finished_at,
        "total_seconds": total,
        "machine": info,
        "sizes": dict(vars(sizes)),
    }
    header = f"trainwarden bench ({sizes.name}, {total:.0f} s)"
    render(ordered, header, console)
    options.out.mkdir(parents=True, exist_ok=True)
    write_json(options.out / "results.json", meta, ordered)
    write_markdown(options.out / "RESULTS.md", meta, ordered)
    console.print(f"wrote {options.out / 'results.json'} and {options.out / 'RESULTS.md'}")
    if not options.keep:
        _empty(options.workdir)
    return 1 if any(s.error for s in ordered) else 0


if __name__ == "__main__":
    raise SystemExit(main())
