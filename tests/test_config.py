"""The config schema (workflow/schemas/config.schema.yaml), through the validation that
workflow/rules/common.smk runs: snakemake.utils.validate on config/config.yaml with the
user's files merged into it, as Snakemake merges them."""

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.common.configfile import load_configfile
from snakemake.utils import update_config, validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
CONFIGS = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [*ROOT.glob("config/*.yaml"), *ROOT.glob("tests/config/*.yaml")]
)


def merged(*overrides):
    config = load_configfile(ROOT / "config/config.yaml")
    for extra in overrides:
        update_config(config, extra)
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
    validate(merged(load_configfile(ROOT / name)), str(SCHEMA))


@pytest.mark.parametrize(
    "typo, word",
    [
        ({"fitt": {"chunks": 2}}, "'fitt' was unexpected"),
        ({"training": {"epoch": 50}}, "'epoch' was unexpected"),
        ({"data": {"split": {"tests": ["sub-04"]}}}, "'tests' was unexpected"),
        ({"phantom": {"sead": 3}}, "'sead' was unexpected"),
    ],
)
def test_misspelt_keys_are_rejected(typo, word):
    with pytest.raises(Exception, match=word):
        validate(merged(typo), str(SCHEMA))


def object_levels(schema, where="config"):
    """(where, schema) of every object level of the schema."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            yield where, schema
        for key, value in (schema.get("properties") or {}).items():
            yield from object_levels(value, f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            yield from object_levels(extra, f"{where}.*")
        for key in ("oneOf", "anyOf", "allOf"):
            for option in schema.get(key, []):
                yield from object_levels(option, where)
        if isinstance(schema.get("items"), dict):
            yield from object_levels(schema["items"], f"{where}[]")


def test_every_object_level_forbids_unknown_keys():
    schema = yaml.safe_load(SCHEMA.read_text())
    open_levels = [
        where
        for where, level in object_levels(schema)
        if level.get("additionalProperties", True) is True
    ]
    assert open_levels == []


def test_validation_fills_the_defaults_of_a_replaced_split():
    config = merged()
    config["data"]["split"] = copy.deepcopy({"train": ["sub-01"], "test": ["sub-02"]})
    validate(config, str(SCHEMA))
    assert config["data"]["split"] == {"train": ["sub-01"], "validation": [], "test": ["sub-02"]}


def test_the_schema_knows_the_registry_models():
    from kinpet.models import MODELS

    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["model"]["enum"] == list(MODELS)
    assert merged()["model"] == "irreversible_2tc"  # the paper's, by default


def test_common_smk_restates_the_registry():
    """The rules' table of models (workflow/rules/common.smk) is kinpet.models' registry."""
    from kinpet.models import MODELS

    text = (ROOT / "workflow/rules/common.smk").read_text()
    table = ast.literal_eval(re.search(r"^KINETIC_MODELS = (\{.*?^\})", text, re.M | re.S)[1])
    assert table == {
        name: {
            "parameters": list(m.parameters),
            "macro": list(m.macro),
            "fit_methods": list(m.fit_methods),
        }
        for name, m in MODELS.items()
    }


def test_an_unknown_model_is_refused_naming_the_known_ones():
    with pytest.raises(Exception, match=r"'patlak' is not one of \['irreversible_2tc'"):
        validate(merged({"model": "patlak"}), str(SCHEMA))
