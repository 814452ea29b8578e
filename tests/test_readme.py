"""The README's quick start is exactly two commands, and they work as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [b.strip() for b in blocks]


def test_quick_start_is_two_one_line_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("shardkit demo")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = commands[1].split("&&", 1)[1].strip()  # after activating the venv
    assert test_command == "pip install -e '.[test]' && python -m pytest"
    assert f"\n{test_command}\n" in ci


@pytest.mark.timeout(1200)
def test_first_command_runs_on_a_fresh_checkout(tmp_path):
    """Run the demo command verbatim in a fresh copy of the repository (a new venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    checkout = tmp_path / "checkout"
    for name in files:
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            dest = checkout / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    command = quick_start_commands()[0]
    proc = subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shardkit ShardLoader" in proc.stdout and "ImageFolder + DataLoader" in proc.stdout
