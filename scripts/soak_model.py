"""The message API's model test (tests/test_api_model.py) run for longer, by hand.

    PYTHONPATH=. .venv/bin/python scripts/soak_model.py [--examples N] [--steps M]
        [--max-restarts R] [--duration SECONDS] [--seed S] [--fresh] [--no-shrink] [--dir DIR]

The same state machine as the CI test, against real daemons: adds, pauses, resumes, set_files,
cancels, acks, clean restarts and SIGKILLs, with the contract's invariants checked after every
step. One run is `--examples` examples of up to `--steps` steps each, at most `--max-restarts`
restarts or kills per example, from seed `--seed` (random unless given). With `--duration`,
runs follow each other (seed, seed + 1, ...) until that many seconds have passed (the run under
way then finishes). `--fresh`
gives every example a new daemon (by default a passing example's daemon, emptied, serves the
next one). A failure stops the soak: hypothesis prints the failing steps (shrunk to fewer
unless `--no-shrink`; shrinking starts a daemon per replay and may take minutes), then this
prints the seed that found it and the folder with the failed libraries and daemon logs.

Prints what it ran: runs, examples, steps (per rule), restarts, kills, completions, refusals per
error code, and the time. Exit status 0 when nothing failed, 1 when something did.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.test_api_model import Tally, configured, make_payloads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="examples per run")
    parser.add_argument("--steps", type=int, default=50, help="most steps per example")
    parser.add_argument("--max-restarts", type=int, default=3, help="per example")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds of runs in a row")
    parser.add_argument("--seed", type=int, default=None, help="the first run's seed")
    parser.add_argument("--fresh", action="store_true", help="a new daemon for every example")
    parser.add_argument("--no-shrink", action="store_true", help="report a failure as found")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (kept if given)")
    return parser.parse_args(argv)


def report(tally: Tally, runs: int, elapsed: float) -> None:
    print(f"runs         {runs}")
    print(f"examples     {tally.examples}")
    print(f"steps        {tally.steps}")
    print(f"restarts     {tally.restarts} clean (SIGTERM), {tally.kills} SIGKILL")
    print(f"completions  {tally.completions} (every file at priority 0)")
    rules = ", ".join(f"{name} {count}" for name, count in sorted(tally.rules.items()))
    print(f"per rule     {rules}")
    codes = ", ".join(f"{code} {count}" for code, count in sorted(tally.codes.items()))
    print(f"refusals     {codes or 'none'}")
    print(f"time         {elapsed:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="soak-model-"))
    workdir.mkdir(parents=True, exist_ok=True)
    first_seed = args.seed if args.seed is not None else random.randrange(2**32)
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if not args.no_shrink:
        phases.append(Phase.shrink)
    run_settings = settings(
        max_examples=args.examples,
        stateful_step_count=args.steps,
        deadline=None,
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    payloads = make_payloads(workdir)
    tally = Tally()
    started = time.monotonic()
    runs = 0
    failed = False
    print(f"soak_model: seeds from {first_seed}, work folder {workdir}", flush=True)
    while True:
        run_seed = first_seed + runs
        machine = configured(
            workdir / f"run-{runs}",
            payloads,
            max_restarts=args.max_restarts,
            reuse_daemon=not args.fresh,
            tally=tally,
        )
        runs += 1
        try:
            run_state_machine_as_test(seed(run_seed)(machine), settings=run_settings)
        except Exception:
            traceback.print_exc()
            print(f"\nFAILED in run {runs} (seed {run_seed}); libraries and logs in {workdir}")
            failed = True
        finally:
            machine.release()
        elapsed = time.monotonic() - started
        print(
            f"run {runs} (seed {run_seed}): {tally.examples} examples, {tally.steps} steps, "
            f"{tally.restarts + tally.kills} restarts so far, {elapsed:.0f} s",
            flush=True,
        )
        if failed or elapsed >= args.duration:
            break
    print()
    report(tally, runs, time.monotonic() - started)
    if failed:
        return 1
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
