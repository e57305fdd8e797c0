"""The pins live in requirements.txt; every other place must agree with it."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return dict(
        re.match(r"^\s*-?\s*([A-Za-z0-9_.-]+)==(\S+)\s*$", ln).groups()
        for ln in lines
        if re.match(r"^\s*-?\s*[A-Za-z0-9_.-]+==", ln)
    )


def test_every_runtime_dependency_is_pinned_exactly():
    lines = [
        ln
        for ln in (ROOT / "requirements.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert all("==" in ln for ln in lines), lines
    names = {n.lower() for n in pins(lines)}
    assert {
        "torch",
        "snakemake",
        "nibabel",
        "simpleitk",
        "scipy",
        "numpy",
        "pandas",
        "matplotlib",
        "seaborn",
    } <= names


def third_party_imports():
    """Top-level modules that the package and the workflow scripts import, stdlib excluded."""
    names = set()
    for path in [*ROOT.glob("src/kinpet/*.py"), *ROOT.glob("workflow/scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "kinpet"}


def test_every_imported_package_is_pinned():
    """Whatever the pipeline imports comes from a distribution pinned in requirements.txt
    (an unpinned torch would pull gigabytes of CUDA wheels)."""
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    pinned = {name.lower() for name in pins((ROOT / "requirements.txt").read_text().splitlines())}
    imported = third_party_imports()
    assert {"torch", "numpy", "nibabel"} <= imported  # the scan itself works
    for module in sorted(imported):
        assert module in distributions, f"{module} is imported but not installed"
        assert {d.lower() for d in distributions[module]} & pinned, f"{module} is not pinned"


def test_conda_environment_has_the_same_pins():
    env = yaml.safe_load((ROOT / "envs" / "kinpet.yaml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_list) == pins((ROOT / "requirements.txt").read_text().splitlines())


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in pins((ROOT / "requirements.txt").read_text().splitlines()).items():
        assert version(name).split("+")[0] == pinned, name


def test_console_command_help_and_errors(tmp_path):
    run = [sys.executable, "-m", "kinpet.cli"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    assert "frames" in out.stdout and "model" in out.stdout
    bad = tmp_path / "sub-01_pet.json"
    bad.write_text('{"FrameTimesStart": [0, 10]}')
    res = subprocess.run([*run, "frames", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert str(bad) in res.stderr and "FrameDuration" in res.stderr
    assert "Traceback" not in res.stderr


def test_model_command_writes_the_curve(tmp_path):
    import numpy as np
    import pandas as pd

    from kinpet.frames import FrameSchedule
    from kinpet.inputfunction import InputFunction
    from kinpet.kinetics import irreversible_2tc

    out = tmp_path / "curve.tsv"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kinpet.cli",
            "model",
            "--params",
            "0.65",
            "0.68",
            "0.0035",
            "0.01",
            "--delay",
            "10",
            "-o",
            str(out),
        ],
        check=True,
    )
    table = pd.read_csv(out, sep="\t", comment="#")
    expected = irreversible_2tc(
        np.array([0.65, 0.68, 0.0035, 0.01]), InputFunction.feng(delay_s=10), FrameSchedule.paper()
    )
    np.testing.assert_allclose(table["activity_kbq_per_ml"], expected, rtol=1e-7)
