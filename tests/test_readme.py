"""The README says what the programs do: its `--help` blocks are what they print, and its test
command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

# "```\n$ dlkeeper ls --help\n<output>```": the command, and what the README says it prints.
HELP_BLOCK = re.compile(
    r"^```\n\$ (dlkeeper(?:-state)?(?: [a-z]+)?) --help\n(.*?)^```$", re.M | re.S
)
HELP_FOUND = HELP_BLOCK.findall(README)
HELP_BLOCKS = dict(HELP_FOUND)
COMMANDS = {
    "dlkeeper": [
        "serve",
        "ls",
        "info",
        "add",
        "pause",
        "resume",
        "cancel",
        "ack",
        "retry",
        "stats",
        "watch",
        "demo",
    ],
    "dlkeeper-state": ["show", "check", "repair", "rebuild", "restore", "remove"],
}
EVERY_COMMAND = [
    f"{program} {sub}".strip() for program, subs in COMMANDS.items() for sub in ["", *subs]
]


def test_the_readme_shows_the_help_of_every_command_once() -> None:
    assert sorted(command for command, _ in HELP_FOUND) == sorted(EVERY_COMMAND)


@pytest.mark.parametrize("command", sorted(HELP_BLOCKS))
def test_a_help_block_in_the_readme_is_what_the_command_prints(command: str) -> None:
    program, *sub = command.split()
    printed = subprocess.run(
        [str(BIN / program), *sub, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=30,
        check=True,
    ).stdout
    assert printed == HELP_BLOCKS[command]


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    commands = re.findall(r"^```sh\n(.*?)\n```$", README, re.M)
    install_and_demo, install_and_test = commands[:2]
    assert install_and_demo.endswith("dlkeeper demo")
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()
