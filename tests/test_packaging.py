"""The project installs and describes itself consistently."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def _pyproject_pins():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + [r for extra in meta["optional-dependencies"].values()
                                   for r in extra]
    pins = {}
    for req in reqs:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][^;\s]*)", req).groups()
        pins[CONDA_NAMES.get(name.lower(), name.lower())] = version
    return pins


def _environment_pins():
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"\s*-\s*([A-Za-z0-9_.-]+)=([0-9][^=\s#]*)", line)
        if m and m.group(1) != "python":
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _constraint_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip()):
            pins[CONDA_NAMES.get(m.group(1).lower(), m.group(1).lower())] = m.group(2)
    return pins


def test_environment_yml_lists_the_same_packages_and_versions_as_pyproject():
    """Every package pyproject.toml names, at its version; and beyond those, only pins that
    constraints.txt holds for a reason a conda user has too (jsonschema's: why there)."""
    env, project = _environment_pins(), _pyproject_pins()
    assert {k: v for k, v in env.items() if k in project} == project
    beyond = {k: v for k, v in env.items() if k not in project}
    assert beyond == {k: _constraint_pins().get(k) for k in beyond}


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    assert _pyproject_pins()["pytorch"] == "2.13.0"
    assert "pytorch=2.13.0=cpu_*" in (ROOT / "environment.yml").read_text()


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "backprop_ninja.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for cmd in ("data", "build", "grade", "autograde", "train"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), cmd
        sub = subprocess.run([sys.executable, "-m", "backprop_ninja.cli", cmd, "--help"],
                             capture_output=True, text=True)
        assert sub.returncode == 0 and f"usage: backprop-ninja {cmd}" in sub.stdout


def test_names_txt_is_never_committed():
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert "data/names.txt" not in tracked
    assert "data/names.txt" in (ROOT / ".gitignore").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
