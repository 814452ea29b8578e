"""What the README promises: the quick start is two commands that work as written, every
command and flag it documents exists, and every import it shows resolves."""

from __future__ import annotations

import argparse
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
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=1100, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # "compares the rate with reading the same images as small files, and cleans up"
    assert "shardkit ShardLoader" in proc.stdout and "ImageFolder + DataLoader" in proc.stdout
    assert re.search(r"\d+\.\d+x the small-files rate", proc.stdout), proc.stdout[-2000:]
    assert [p.name for p in scratch.iterdir() if p.name.startswith("shardkit-demo-")] == []


def _readme() -> str:
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_every_documented_command_and_flag_exists():
    from shardkit.cli.parser import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    rows = re.findall(r"^\| `shardkit ([a-z]+)([^`]*)` \|", _readme(), re.M)
    assert len(rows) >= 10
    for command, rest in rows:
        assert command in sub.choices, f"README documents `shardkit {command}`, which does not exist"
        flags = {o for a in sub.choices[command]._actions for o in a.option_strings}
        own = rest.split(" -- ", 1)[0]  # after `--`: arguments the command passes on (bench)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", own):
            assert flag in flags, f"README documents `shardkit {command} {flag}`, which it does not take"


def test_every_import_the_readme_shows_resolves():
    import importlib

    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    imports = [
        (m.group(1), [n.strip().split(" as ")[0] for n in m.group(2).split(",")])
        for block in blocks
        for m in re.finditer(r"^\s*from (shardkit[\w.]*) import ([\w, ]+)$", block, re.M)
    ]
    assert len(imports) >= 4
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name), f"README imports {name} from {module}, which has no such name"
