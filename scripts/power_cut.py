"""Power cuts by hand: many random moments of tests/test_power_cut.py's cut; prints a summary.

    sudo PYTHONPATH=. .venv/bin/python scripts/power_cut.py [--runs 200] [--seed N] [--dir DIR]

Each run makes an ext4 image, mounts it through a loop device (commit=60), starts `dlkeeper
serve` with its library and downloads on it, adds a download of about 28 MiB from a loopback
seeder limited to 10 MiB/s, pauses another download and adds more, and at a random moment of the
download SIGKILLs the daemon and its worker and copies the image file without a sync: what the
loop device wrote, not what sat in the page cache. The copy is mounted where the original was
and judged (see the test's docstring), then dlkeeper finishes the download on it.

Figures: runs, cuts mid-download (the copy's state not `completed`), pieces claimed by the
copy's .fastresume files, corrupt pieces trusted (claimed, but the bytes on the copy are wrong:
must be 0), acknowledged changes lost (must be 0), completed downloads with wrong files and
downloads not finished right after the cut (both must be 0). Needs root (mount, loop devices).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.test_power_cut import CutResult, Site, cleanup, one_cut, power_cut_swarm


def summary(results: list[CutResult], seconds: float) -> list[str]:
    def count(name: str) -> int:
        return sum(len(getattr(result, name)) for result in results)

    mid = sum(1 for result in results if result.mid_download)
    broken = [result for result in results if not result.ok]
    return [
        f"runs                          {len(results)} in {seconds:.0f} s",
        f"cuts mid-download             {mid}",
        f"pieces claimed                {sum(result.pieces_claimed for result in results)}",
        f"corrupt pieces trusted        {count('corrupt_trusted')}   (must be 0)",
        f"acked changes lost            {count('acked_lost')}   (must be 0)",
        f"completed with wrong files    {count('completed_broken')}   (must be 0)",
        f"not finished right after cut  {count('not_finished_right')}   (must be 0)",
        f"  of them all zeros on disk   {sum(result.zero_claimed for result in results)}",
        f"runs trusting a corrupt piece {sum(1 for result in results if result.corrupt_trusted)}",
        "runs whose every claimed piece was zeros "
        f"{sum(1 for r in results if r.pieces_claimed and r.zero_claimed == r.pieces_claimed)}",
        f"copies retried (disk busy)    {sum(result.copy_retries for result in results)}",
        f"verdict                       {'PASS' if not broken else 'FAIL'}",
    ]


def run(directory: Path, runs: int, seed: int) -> int:
    chooser = random.Random(seed)
    results: list[CutResult] = []
    began = time.monotonic()
    with power_cut_swarm(directory) as (payload, seeder):
        for number in range(runs):
            site = Site(directory / f"cut-{number}")
            try:
                result = one_cut(site, payload, seeder, chooser)
            finally:
                cleanup(site)
            results.append(result)
            problems = "" if result.ok else f"  FAIL {result}"
            print(
                f"run {number + 1:>4}: cut at {result.moment:5.2f} s, "
                f"{'mid-download' if result.mid_download else 'completed   '}, "
                f"{result.pieces_claimed:>4} pieces claimed, "
                f"{len(result.corrupt_trusted):>4} corrupt trusted "
                f"({result.zero_claimed} zeros){problems}",
                flush=True,
            )
    print(f"\npower cuts, seed {seed}")
    for line in summary(results, time.monotonic() - began):
        print(f"  {line}")
    return 0 if all(result.ok for result in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dlkeeper under many random power cuts")
    parser.add_argument("--runs", type=int, default=20, help="cuts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new one)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it mounts loop devices")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return run(args.dir, args.runs, seed)
    with tempfile.TemporaryDirectory(prefix="dlkeeper-power-cut-") as directory:
        return run(Path(directory), args.runs, seed)


if __name__ == "__main__":
    sys.exit(main())
