"""Compare the results/ folders of two runs of the same config (local and SLURM).

    python compare_results.py LOCAL_RESULTS CLUSTER_RESULTS

Tables (.tsv, .csv) must hold the same values (numbers to 1e-9 relative), JSON the same
content, arrays (.npy, .npz, .nii, .nii.gz) the same numbers; other files are reported
as identical bytes or not (figures embed dates, checkpoints may differ). Tables of run
times (in benchmarks/, or a name with "runtime" or "benchmark") are only checked for shape,
and a column named "seconds" (wall time per epoch) is ignored.
Exit status 1 when the file sets differ or a table, JSON or array differs.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

RTOL = 1e-9


def same_table(a: Path, b: Path) -> bool:
    sep = "\t" if a.suffix == ".tsv" else ","
    ta, tb = pd.read_csv(a, sep=sep), pd.read_csv(b, sep=sep)
    if list(ta.columns) != list(tb.columns) or ta.shape != tb.shape:
        return False
    if "runtime" in a.name or "benchmark" in a.name or "benchmarks" in a.parts:
        return True  # wall times differ from run to run by nature
    # Per-epoch wall times of the training log differ too; its losses must not.
    for col in [c for c in ta.columns if c != "seconds"]:
        x, y = ta[col], tb[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            if not np.allclose(x, y, rtol=RTOL, atol=0, equal_nan=True):
                return False
        elif not x.astype(str).equals(y.astype(str)):
            return False
    return True


def load_arrays(path: Path) -> list[np.ndarray]:
    if path.suffix == ".npy":
        return [np.load(path)]
    if path.suffix == ".npz":
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files)]
    import nibabel

    return [np.asanyarray(nibabel.load(path).dataobj)]


def same_arrays(a: Path, b: Path) -> bool:
    xa, xb = load_arrays(a), load_arrays(b)
    return len(xa) == len(xb) and all(
        x.shape == y.shape and _same_values(x, y) for x, y in zip(xa, xb, strict=True)
    )


def _same_values(x: np.ndarray, y: np.ndarray) -> bool:
    """Numbers within RTOL; anything else (e.g. the subject id of a slices file) equal."""
    if np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number):
        return bool(np.allclose(x, y, rtol=RTOL, atol=0, equal_nan=True))
    return bool(np.array_equal(x, y))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(local: Path, cluster: Path) -> int:
    files_l = {p.relative_to(local) for p in local.rglob("*") if p.is_file()}
    files_c = {p.relative_to(cluster) for p in cluster.rglob("*") if p.is_file()}
    ok = True
    for rel in sorted(files_l ^ files_c):
        print(f"  ONLY IN {'local' if rel in files_l else 'cluster'}: {rel}")
        ok = False
    counts = {"identical bytes": 0, "same values": 0, "differ (allowed)": 0}
    for rel in sorted(files_l & files_c):
        a, b = local / rel, cluster / rel
        name = rel.name
        if digest(a) == digest(b):
            status = "identical bytes"
        elif name.endswith((".tsv", ".csv")):
            status = "same values" if same_table(a, b) else "DIFFERENT TABLE"
        elif name.endswith(".json"):
            same = json.loads(a.read_text()) == json.loads(b.read_text())
            status = "same values" if same else "DIFFERENT JSON"
        elif name.endswith((".npy", ".npz", ".nii", ".nii.gz")):
            status = "same values" if same_arrays(a, b) else "DIFFERENT ARRAYS"
        else:
            status = "differ (allowed)"  # e.g. PDF creation dates
        print(f"  {status:17s} {rel}")
        if status in counts:
            counts[status] += 1
        else:
            ok = False
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    print(f"  {len(files_l & files_c)} files compared: {summary}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
