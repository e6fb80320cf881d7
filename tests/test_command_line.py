"""What users expect of every command: --help, --json on listings, shell completion."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from runyard.cli.main import main
from tests.helpers import run_cli


@pytest.mark.parametrize("command", ["status", "leaderboard", "doctor"])
def test_every_listing_command_offers_json(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--json" in result.output and "machine-readable JSON" in result.output


def test_every_command_has_help():
    for command in main.commands:
        result = CliRunner().invoke(main, [command, "-h"], prog_name="runyard")
        assert result.exit_code == 0, command
        assert result.output.startswith(f"Usage: runyard {command}")


def complete(program: str, words: str) -> list[str]:
    """What bash completion offers for the last word of `words`, asked of the installed script."""
    env = os.environ | {
        f"_{program.upper()}_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    return run_cli(program, env=env).stdout.split()


def test_bash_completion_script_is_printed_by_the_command_itself():
    result = run_cli("runyard", env=os.environ | {"_RUNYARD_COMPLETE": "bash_source"})
    assert result.returncode == 0
    assert "complete -o nosort -F _runyard_completion runyard" in result.stdout


def test_bash_completion_completes_commands_spec_options_and_their_choices():
    assert complete("runyard", "runyard do") == ["plain,doctor"]
    assert complete("publish", "publish --los") == ["plain,--loss"]
    assert complete("publish", "publish --device c") == ["plain,cpu", "plain,cuda"]
