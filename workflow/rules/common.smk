import copy
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Config files merge into config/config.yaml key by key. A split is one choice, not three:
# a user's split replaces the demo's whole (leaving out validation: must not bring in the
# demo's sub-03). overwrite_config holds what --configfile and --config gave.
_USER_DATA = (workflow.config_settings.overwrite_config or {}).get("data") or {}
_USER_SPLIT = _USER_DATA.get("split")
if _USER_SPLIT is not None:
    config["data"]["split"] = copy.deepcopy(_USER_SPLIT)

# The training keys the config files give, before the schema fills in its defaults: a
# training recipe (training.recipe) sets only the keys that are not given.
_GIVEN_TRAINING = copy.deepcopy(config.get("training") or {})
_USER_TRAINING = (workflow.config_settings.overwrite_config or {}).get("training") or {}

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as err:
    # Snakemake's message prints the whole schema; keep the problem and where it is.
    _lines = str(err).splitlines()
    _what = next((l for l in _lines if l.startswith("ValidationError: ")), _lines[0])
    _where = next((l for l in _lines if l.startswith("On instance")), "On instance:")
    _where = _where.removeprefix("On instance").rstrip(":") or "the top level"
    _files = " + ".join(dict.fromkeys(map(str, workflow.configfiles)))
    raise WorkflowError(
        f"config ({_files}): {_what.removeprefix('ValidationError: ')} at {_where}"
    ) from None

# Scripts import the kinpet package from src/, installed or not (e.g. in --use-conda
# environments or on cluster nodes sharing the checkout).
_SRC = str(Path(workflow.basedir) / "src")
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)
)
# The Snakefile itself imports only kinpet's standard-library modules (kinpet.resources),
# from the same src/: Snakemake's own environment may lack numpy.
sys.path.insert(0, _SRC)


# -- The kinetic model (model:) ----------------------------------------------------------
# kinpet.models' registry as the rules need it, restated because the Snakefile must not
# need the package (see bids_inputs); tests/test_config.py compares the two. Per model: its
# parameters, its macro-parameters and the methods the organ and voxel fits run it with.
KINETIC_MODELS = {
    "irreversible_2tc": {
        "parameters": ["K1", "k2", "k3", "Vb"],
        "macro": ["Ki"],
        "fit_methods": ["fast", "curve_fit", "curve_fit_paper"],
    },
    "reversible_2tc": {
        "parameters": ["K1", "k2", "k3", "k4", "Vb"],
        "macro": ["VT", "VS"],
        "fit_methods": ["fast", "curve_fit"],
    },
    "one_tc": {
        "parameters": ["K1", "k2", "Vb"],
        "macro": ["VT"],
        "fit_methods": ["fast", "curve_fit", "curve_fit_paper"],
    },
}
MODEL = config["model"]
MODEL_PARAMETERS = KINETIC_MODELS[MODEL]["parameters"]
# The maps of the network and the figures: the model's parameters, then its macro-parameters;
# the voxel-wise fits add their SSE.
MAP_NAMES = MODEL_PARAMETERS + KINETIC_MODELS[MODEL]["macro"]
FIT_MAP_NAMES = MAP_NAMES + ["SSE"]


# -- Subjects and PET-BIDS inputs (preprocess.smk) ---------------------------------------
def canonical(value):
    """A config value with every mapping's keys sorted, for a rule's params: Snakemake
    compares params by their text, so reordering the keys of a config file would
    otherwise rerun the jobs that read them."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


DATA = config["data"]
PREPROCESS = config["preprocess"]
SPLIT = {role: DATA["split"].get(role, []) for role in ("train", "validation", "test")}
# Slices per test subject: preprocess.n_slices_test (null: the whole lungs-to-bladder
# range, as the published test), else n_slices like every subject.
N_SLICES_TEST = PREPROCESS.get("n_slices_test", PREPROCESS["n_slices"])
SUBJECTS = [s for role in ("train", "validation", "test") for s in SPLIT[role]]
if len(set(SUBJECTS)) != len(SUBJECTS):
    raise ValueError(
        f"config data.split: a subject appears twice (train / validation / test must be disjoint): {SPLIT}"
    )

# The phantom's subjects are read where `simulate` writes them; a user's dataset is anywhere.
BIDS_ROOT = Path(
    config["phantom"]["root"] if DATA["source"] == "phantom" else DATA["bids_root"]
)


wildcard_constraints:
    subject="sub-[A-Za-z0-9]+",


def bids_inputs(wildcards):
    """Files of one subject: the layout of kinpet.bids.bids_paths, restated because the
    Snakefile must not need the package's dependencies (with --use-conda, snakemake's own
    environment may lack nibabel). The dry run in tests/test_pipeline.py runs on files
    written with bids_paths, so the two cannot drift apart unnoticed."""
    subject = wildcards.subject
    pet, labels = (
        BIDS_ROOT / subject / "pet",
        BIDS_ROOT / "derivatives" / "labels" / subject,
    )
    files = {
        "pet": pet / f"{subject}_pet.nii.gz",
        "pet_json": pet / f"{subject}_pet.json",
        "dseg": labels / f"{subject}_dseg.nii.gz",
        "dseg_tsv": labels / f"{subject}_dseg.tsv",
    }
    if DATA["input_function"] == "blood":
        blood = pet / f"{subject}_recording-{DATA['blood_recording']}_blood.tsv"
        files.update(blood=blood, blood_json=blood.with_suffix(".json"))
    return {key: str(path) for key, path in files.items()}


# -- Training and prediction (train.smk) -------------------------------------------------
TRAINING = config.get("training") or {}
for _name in TRAINING.get("run", []):
    if _name not in TRAINING["ablations"]:
        raise ValueError(f"config training.run names an unknown ablation: {_name}")
ABLATIONS = {name: TRAINING["ablations"][name] for name in TRAINING.get("run", [])}
_SETTING_KEYS = (
    "recipe",
    "epochs",
    "batch_size",
    "learning_rate",
    "halve_every",
    "validate_every",
    "sampling",
    "mask_threshold",
    "seed",
    "device",
    "amp",
    "scaling",
    "loss_weights",
    "schedule",
    "warmup_epochs",
    "flips",
    "projection",
    "milestones",
    "gamma",
    "early_stopping_patience",
    "mask_auc",
    "straight_through",
    "head_init",
    "shared_temporal",
    "decimate_time",
    "loss",
    "blend_equal_share",
    "projection_equal_share",
    "ema_decay",
    "swa_start",
)
# The settings of kinpet.training.TrainSettings, in two layers (settings_from_config): a
# recipe named in a --configfile / --config overrides the keys of config/config.yaml
# (TRAINING_UNDERNEATH) and yields to the keys given with it (TRAINING_SETTINGS); a
# recipe named in config/config.yaml yields to all of them. The recipe itself expands in
# kinpet.training, in one place.
if "recipe" in _USER_TRAINING:
    TRAINING_SETTINGS = {
        k: _GIVEN_TRAINING[k] for k in _SETTING_KEYS if k in _USER_TRAINING
    }
    TRAINING_UNDERNEATH = {
        k: _GIVEN_TRAINING[k]
        for k in _SETTING_KEYS
        if k in _GIVEN_TRAINING and k not in _USER_TRAINING
    }
else:
    TRAINING_SETTINGS = {
        k: _GIVEN_TRAINING[k] for k in _SETTING_KEYS if k in _GIVEN_TRAINING
    }
    TRAINING_UNDERNEATH = {}
# The recipe these settings train with, as kinpet.settings.settings_from_config reads it;
# it also chooses the organ curve fit and Table 1's test domain when those are not given.
RECIPE = TRAINING_SETTINGS.get("recipe", TRAINING_UNDERNEATH.get("recipe", "kinpet"))
# Projection, the Newton loss, the log-beta head and the convergence monitor are made for the
# irreversible model (beta = k2 + k3). Both recipes train without the first three
# (kinpet.settings.RECIPES), so only a key given in a config file turns them on.
if MODEL != "irreversible_2tc":
    _ONLY_IRREVERSIBLE = {
        "training.projection: true": TRAINING_SETTINGS.get("projection", False),
        "training.loss: newton": TRAINING_SETTINGS.get("loss") == "newton",
        "training.monitor: true": TRAINING.get("monitor", False),
        **{
            f"ablation {name} (activation: log_beta)": ablation["activation"]
            == "log_beta"
            for name, ablation in ABLATIONS.items()
        },
    }
    _REFUSED = [key for key, used in _ONLY_IRREVERSIBLE.items() if used]
    if _REFUSED:
        raise ValueError(
            f"config model ({MODEL}): {', '.join(_REFUSED)} "
            f"{'needs' if len(_REFUSED) == 1 else 'need'} model: irreversible_2tc (built on "
            "beta = k2 + k3); set projection: false, loss: curves, monitor: false or another "
            "activation, or choose model: irreversible_2tc"
        )


wildcard_constraints:
    ablation="[0-9A-Za-z._-]+",


def prediction_outputs():
    """Every trained ablation's maps and slice metrics for every test subject."""
    return expand(
        "results/prediction/{ablation}/{subject}/slice_metrics.tsv",
        ablation=list(ABLATIONS),
        subject=SPLIT["test"],
    )


def phantom_subject_ids(subjects):
    """sub-01 ... sub-NN from a count, or the listed ids."""
    if isinstance(subjects, int):
        return [f"sub-{i:02d}" for i in range(1, subjects + 1)]
    return [str(s) for s in subjects]


def phantom_outputs():
    """The phantom dataset and its figure, when the pipeline analyses the phantom."""
    if DATA["source"] != "phantom":
        return []
    return [
        f"{BIDS}/dataset_description.json",
        *expand(
            f"{BIDS}/{{subject}}/pet/{{subject}}_pet.nii.gz", subject=PHANTOM_SUBJECTS
        ),
        "results/figures/phantom_coronal.png",
    ]


def phantom_motion(phantom):
    """simulate's motion param (phantom.motion) when it moves, else none: the jobs of the
    still phantom keep their params, and so do those of breathing alone (no cardiac blur).
    """
    motion = dict(phantom.get("motion") or {})
    if not (
        motion.get("amplitude_z_mm")
        or motion.get("amplitude_y_mm")
        or motion.get("cardiac_fwhm_mm")
    ):
        return {}
    if not motion.get("cardiac_fwhm_mm"):
        motion.pop("cardiac_fwhm_mm", None)  # breathing alone keeps its params
    return {"motion": motion}


def anatomy_inputs(phantom):
    """The label map's files (phantom.anatomy), as inputs of simulate: none for the
    procedural body, so that its jobs stay as they were. The label table beside the map
    (<name>.tsv, as kinpet.labelmap.label_table_beside) counts when it exists."""
    path = phantom.get("anatomy", "procedural")
    if path == "procedural":
        return {}
    stem = Path(path).name.removesuffix(".gz").removesuffix(".nii")
    files = {"anatomy": path, "anatomy_classes": phantom["anatomy_classes"]}
    beside = Path(path).with_name(f"{stem}.tsv")
    if beside.exists():
        files["anatomy_labels"] = str(beside)
    if phantom.get("anatomy_ct"):
        files["anatomy_ct"] = phantom["anatomy_ct"]
    return files


# -- Curve fitting (fit.smk) -----------------------------------------------------------
FIT = {
    "chunks": 4,
    "methods": ["fast", "curve_fit"],
    "reference_slices": "all",
    "weights": "none",
    "sampling": "average",
    **config.get("fit", {}),
}
# Fig. 2's organ curve fit (KP_CF) beside the fast fitter: fit.organ_method, else the
# published organ_curve_fit.py under the paper recipe.
ORGAN_FIT_METHODS = [
    FIT.get("organ_method")
    or ("curve_fit_paper" if RECIPE == "paper" else "curve_fit"),
    "fast",
]
_FIT_METHODS = KINETIC_MODELS[MODEL]["fit_methods"]
if ORGAN_FIT_METHODS[0] not in _FIT_METHODS:
    raise ValueError(
        f"config fit.organ_method ({ORGAN_FIT_METHODS[0]}, or training.recipe: paper): not "
        f"available for model {MODEL}, which is fitted with {', '.join(_FIT_METHODS)}; set "
        "fit.organ_method: curve_fit"
    )
_UNFITTED = [m for m in FIT["methods"] if m not in _FIT_METHODS]
if _UNFITTED:
    raise ValueError(
        f"config fit.methods ({', '.join(_UNFITTED)}): not available for model {MODEL}, "
        f"which is fitted with {', '.join(_FIT_METHODS)}"
    )
if ORGAN_FIT_METHODS[0] == "curve_fit_paper" and FIT["weights"] != "none":
    raise ValueError(
        f"config fit.weights ({FIT['weights']}): the organ fit curve_fit_paper (fit.organ_method, "
        "or training.recipe: paper) weighs its grid points equally; set fit.weights: none or "
        "fit.organ_method: curve_fit"
    )


def fit_outputs():
    """Organ tables and voxel-wise maps of every test subject, for every method."""
    return expand("results/fit/organ/{subject}.tsv", subject=SPLIT["test"]) + expand(
        f"results/fit/{{method}}/{{subject}}/{{subject}}_desc-{FIT_MAP_NAMES[0]}_kinpar.nii.gz",
        method=FIT["methods"],
        subject=SPLIT["test"],
    )


# -- Evaluation: tables and figures (evaluate.smk) ---------------------------------------
EVALUATION = {
    "organs": ["lungs", "liver", "kidneys", "spleen"],
    "reference_values": None,
    "reference_name": "reference",
    "figure_subject": None,
    "erode_voxels": 1,
    **(config.get("evaluation") or {}),
}
# Table 1's test domain (kinpet.metrics.TEST_DOMAINS): evaluation.test_domain, else the
# published one under the paper recipe.
TEST_DOMAIN = EVALUATION.get("test_domain") or (
    "paper" if RECIPE == "paper" else "kinpet"
)
BEST = TRAINING.get("best")
if ABLATIONS and BEST not in ABLATIONS:
    raise ValueError(
        f"config training.best ({BEST}) must be one of the trained ablations training.run: "
        f"{list(ABLATIONS)}"
    )
FIGURE_SUBJECT = EVALUATION["figure_subject"] or (SPLIT["test"] or [None])[0]
if FIGURE_SUBJECT is not None and FIGURE_SUBJECT not in SPLIT["test"]:
    raise ValueError(
        f"config evaluation.figure_subject ({FIGURE_SUBJECT}) is not a test subject: {SPLIT['test']}"
    )
# Fig. 4 sets the network beside the reference fit; without it, beside the first fitter.
FIGURE4_METHOD = "curve_fit" if "curve_fit" in FIT["methods"] else FIT["methods"][0]
# Fig. 3a's fit beside the network: one that covers every slice (the reference may not).
FIGURE3_METHOD = "fast" if "fast" in FIT["methods"] else FIT["methods"][0]


MONITOR = bool(
    TRAINING.get("monitor") and DATA["source"] == "phantom" and SPLIT["test"]
)


def monitor_inputs(wildcards):
    """Files of the convergence study's monitor (training.monitor, phantom only): the
    first test subject's image, labels, input, frames and true maps."""
    if not MONITOR:
        return {}
    subject = SPLIT["test"][0]
    pre = f"results/preprocessed/{subject}"
    return {
        "monitor_pet": f"{pre}/pet_2p5mm.nii.gz",
        "monitor_labels": f"{pre}/labels_2p5mm.nii.gz",
        "monitor_labels_tsv": f"{pre}/labels.tsv",
        "monitor_blood": f"{pre}/input_blood.tsv",
        "monitor_pet_json": f"{pre}/pet.json",
        "monitor_truth": expand(
            "results/evaluation/truth/{subject}/{subject}_desc-{name}_truth.nii.gz",
            subject=subject,
            name=TRUTH_NAMES,
        ),
    }


def job_threads(name):
    """Threads a job of rule ``name`` gets (its threads, profile overrides included, capped
    by --cores); None when they depend on the job."""
    value = getattr(getattr(rules, name).rule.resources["_cores"], "value", None)
    if not isinstance(value, int):
        return None
    try:
        cores = workflow.cores
    except Exception:  # e.g. `snakemake --report`, which gives no --cores
        return value
    return min(value, cores) if isinstance(cores, int) else value


def fixed_mem_mb(name):
    """The mem_mb of rule ``name`` when it is a number (the rule's, a profile's or
    --set-resources'), else None (unset, or computed per job)."""
    resource = getattr(rules, name).rule.resources.get("mem_mb")
    if resource is None or resource.is_evaluable():
        return None
    return resource.value if isinstance(resource.value, int) else None


# -- Paths keyed by wildcards, for the rules that aggregate over subjects --------------
# Such a rule takes the leaves of a keyed() tree as its input and the tree itself as a
# param of the same name, so its script looks each file up by its wildcards
# (params.truth["sub-04"]["K1"]) instead of relying on the order of expand().


def keyed(pattern, **wildcards):
    """The paths of ``pattern`` as nested dicts, one level per keyword in the order given.

    keyed("{s}/{n}.nii", s=["a"], n=["K1", "k2"]) == {"a": {"K1": "a/K1.nii", "k2": "a/k2.nii"}}
    """
    if not wildcards:
        return pattern
    (name, values), *rest = wildcards.items()
    return {
        str(value): keyed(pattern.replace(f"{{{name}}}", str(value)), **dict(rest))
        for value in values
    }


def leaves(tree):
    """Every path of a keyed() tree, in order."""
    if isinstance(tree, dict):
        return [path for branch in tree.values() for path in leaves(branch)]
    return [tree]


def test_files(pattern):
    """``pattern`` for every test subject, keyed by subject."""
    return keyed(pattern, subject=SPLIT["test"])


def network_maps(subjects, ablation=BEST, names=MAP_NAMES):
    """The maps of the best ablation (the figures' network), keyed by subject and name."""
    return keyed(
        f"results/prediction/{ablation}/{{subject}}/{{subject}}_desc-{{name}}_kinpar.nii.gz",
        subject=subjects,
        name=names,
    )


def best_prediction_maps(subjects, ablation=BEST):
    """The maps of the best ablation for these subjects, as a list."""
    return leaves(network_maps(subjects, ablation))


def truth_maps(names=None):
    """The true maps of the test subjects at 2.5 mm (``names``, default all of
    TRUTH_NAMES), keyed by subject and name."""
    return keyed(
        "results/evaluation/truth/{subject}/{subject}_desc-{name}_truth.nii.gz",
        subject=SPLIT["test"],
        name=TRUTH_NAMES if names is None else names,
    )


def fit_maps(names=MAP_NAMES):
    """The voxel-wise fits of the test subjects, keyed by method, subject and name."""
    return keyed(
        "results/fit/{method}/{subject}/{subject}_desc-{name}_kinpar.nii.gz",
        method=FIT["methods"],
        subject=SPLIT["test"],
        name=names,
    )


def reference_is_truth():
    """Fig. 2's reference: the phantom's true maps unless a table of values is given."""
    return not EVALUATION["reference_values"] and DATA["source"] == "phantom"


def figure2_reference(wildcards):
    """Reference organ values: the configured table, else on the phantom the true maps
    (their organ means, on the same masks as the network's)."""
    if EVALUATION["reference_values"]:
        return [EVALUATION["reference_values"]]
    return leaves(truth_maps(COMPARED_NAMES)) if reference_is_truth() else []


def evaluation_outputs():
    """Every table and figure the configuration can make: none without a trained network
    and a test subject; the truth recovery only on the phantom (the truth is known)."""
    if not ABLATIONS or not SPLIT["test"]:
        return []
    outputs = [
        f"results/tables/{name}.{ext}"
        for name in ("table1", "organ_values", "runtime")
        for ext in ("csv", "md")
    ] + [
        f"results/figures/{name}.{ext}"
        for name in ("figure2", "figure3", "figure4")
        for ext in ("png", "pdf")
    ]
    if MONITOR:
        outputs += [f"results/figures/convergence.{ext}" for ext in ("png", "pdf")] + [
            "results/tables/convergence.csv"
        ]
    if DATA["source"] == "phantom":
        outputs += [
            f"results/tables/{name}.{ext}"
            for name in ("truth_recovery", "smoothness")
            for ext in ("csv", "md")
        ] + [
            f"results/figures/{name}.{ext}"
            for name in ("truth_recovery", "smoothness")
            for ext in ("png", "pdf")
        ]
    return outputs
