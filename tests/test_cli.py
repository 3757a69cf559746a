"""The `almost-ray` command line."""

import subprocess
import sys

from almost_ray.cli import SUBCOMMANDS


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "almost_ray.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out
    assert {"generate", "demo"} <= set(SUBCOMMANDS)
