"""dvc.yaml is exact: each stage depends on every project file its script imports, no more."""

from __future__ import annotations

import pytest
import yaml

from scripts.dvc_deps import import_closure
from tests.helpers import PROJECT

DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def declared_code_deps(stage: dict) -> set[str]:
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    return {d for d in deps if d.endswith(".py")}


def test_every_stage_runs_a_script_of_its_own() -> None:
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"python stages/{name}.py", name


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_the_import_closure(name: str) -> None:
    closure = import_closure(PROJECT / "stages" / f"{name}.py")
    assert "src/twophase/params.py" in closure  # the finder really followed the imports
    declared = declared_code_deps(STAGES[name])
    assert declared == closure, (
        f"stage {name}: missing {sorted(closure - declared)}, extra {sorted(declared - closure)}"
        " (python scripts/dvc_deps.py rewrites them)"
    )


def test_speed_only_params_are_no_stages_dependency() -> None:
    """Except `validate`'s, which checks every key and writes the same file whatever they are."""
    from twophase.params import SPEED_ONLY_PARAMS

    for name, stage in STAGES.items():
        if name == "validate":
            continue
        declared = set()
        for entry in stage.get("params", []):
            declared |= {entry} if isinstance(entry, str) else set(entry)
        for key in SPEED_ONLY_PARAMS:
            section = key.split(".")[0]
            assert key not in declared and section not in declared, f"{name} depends on {key}"


def test_the_users_data_folder_is_no_stages_output() -> None:
    for name, stage in STAGES.items():
        outs = {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
        assert not any(o == "${data.root}" or o.startswith("data/raw") for o in outs), name
    assert "${data.root}" in declared_code_deps(STAGES["index"]) | set(STAGES["index"]["deps"])


def test_validate_sees_every_section_and_every_other_stage_is_downstream_of_it() -> None:
    """A rejected value must fail before DVC removes any stage's outputs: `validate` depends on
    every section of params.yaml and every other stage depends on it, directly or not."""
    import dataclasses

    from twophase.params import Params

    sections = {f.name for f in dataclasses.fields(Params)}
    assert set(STAGES["validate"]["params"]) == sections
    produced = {
        (o if isinstance(o, str) else next(iter(o))): name
        for name, stage in STAGES.items()
        for o in stage.get("outs", [])
    }

    def upstream(name: str) -> set[str]:
        found = set()
        for dep in STAGES[name].get("deps", []):
            if dep in produced:
                found |= {produced[dep]} | upstream(produced[dep])
        return found

    for name in STAGES:
        assert name == "validate" or "validate" in upstream(name), name


@pytest.mark.parametrize(
    ("document", "before"),
    [("data/raw/README.md", "as a dependency of"), ("docs/data.md", "it is a")],
)
def test_the_docs_name_the_stages_that_depend_on_data_root(document: str, before: str) -> None:
    import re

    text = " ".join((PROJECT / document).read_text().split())
    start = text.index(f"{before} dependency of") if before == "it is a" else text.index(before)
    sentence = text[start : text.index("stages", start)]
    named = set(re.findall(r"`(\w+)`", sentence))
    depending = {name for name, stage in STAGES.items() if "${data.root}" in stage["deps"]}
    assert named == depending


TRAINING_MODULES = (
    "train.py",
    "ema.py",
    "optim.py",
    "phases.py",
    "dropout.py",
    "mixing.py",
    "distributed.py",
)


@pytest.mark.parametrize(
    "script",
    ["stages/evaluate.py", "stages/export.py", "src/twophase/predict.py", "src/twophase/cli.py"],
)
def test_inference_imports_no_training_module(script: str) -> None:
    """Scoring, exporting and `twophase predict` run a checkpoint: an edit to the optimizer,
    the training loop, the weight EMA, the phases, dropout or DDP (the modules below) must not
    rerun the evaluate and export stages. `twophase lr-find`, the command's one training
    command, imports its module (and through it the training modules) only when it runs."""
    excludes = ["twophase.lr_find"] if script.endswith("cli.py") else []
    closure = import_closure(PROJECT / script, excludes)
    assert "src/twophase/checkpoint.py" in closure  # the finder really followed the imports
    training = {f"src/twophase/{name}" for name in TRAINING_MODULES}
    assert not closure & training, f"{script} imports {sorted(closure & training)}"
