"""The Snakemake profiles (profiles/local, profiles/slurm): they load, and they say what the
README promises. The real SLURM run is tests/cluster/run_slurm_test.sh (make cluster-test)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def load(name):
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def workflow_rules():
    text = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    return set(re.findall(r"^(?:rule|checkpoint) (\w+):", text, flags=re.M))


def test_slurm_profile_names_only_known_rules():
    slurm = load("slurm")
    named = set(slurm["set-resources"]) | set(slurm["set-threads"])
    defined = workflow_rules()
    assert {"simulate", "train", "predict", "fit_chunk"} <= defined  # the parse itself works
    # Snakemake silently ignores set-resources for unknown rules: a typo would go unnoticed.
    assert named <= defined, named - defined


def test_slurm_profile_resources():
    slurm = load("slurm")
    assert slurm["executor"] == "slurm"
    defaults = slurm["default-resources"]
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb"} <= set(defaults)
    for rule in ("train", "predict"):
        res = slurm["set-resources"][rule]
        assert res["gpu"] == 1 and res["slurm_partition"] == "gpu" and res["cpus_per_gpu"] >= 1
    # Job arrays stay off: the pinned plugin misreports array tasks' states (see the profile).
    assert "slurm-array-jobs" not in slurm
    assert slurm["set-threads"]["fit_chunk"] == 1


def test_local_profile_caps_gpus():
    local = load("local")
    assert local["cores"] == "all" and local["resources"]["gpu"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_with_profile(profile, tmp_path):
    for name in ("Snakefile", "workflow", "config", "envs", "src", "profiles", "tests/config"):
        src, dst = ROOT / name, tmp_path / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    res = subprocess.run(
        [SNAKEMAKE, "-n", "--workflow-profile", f"profiles/{profile}"]
        + ["--configfile", "tests/config/tiny.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    if profile == "slurm":
        assert "slurm_account=kinpet" in res.stdout
