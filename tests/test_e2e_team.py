"""A team's workflow through real `dvc`, offline (docs/team.md): a bare git repository stands for
GitHub and a local folder for the team's DVC remote. Clone A pushes the digits project and an
experiment, clone B pulls them and retrains nothing; the model registry's two artifacts come back
through `dvc artifacts get` and load into plain torchvision and onnxruntime; the CI workflow
(.github/workflows/pipeline.yml) runs its steps in a fresh clone, as for a pull request that
changes finetune.lr."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tests.dvc_project import GIT_USER, commit, digits_project, ran, run, set_params
from tests.helpers import PROJECT, docs_block
from twophase.params import read_yaml

pytestmark = pytest.mark.e2e

EXPERIMENT, EXPERIMENT_LR = "lr-5e-4", "0.0005"  # docs/team.md's experiment
CI_LR = 0.002  # no run here trained with it: the run-cache cannot answer the CI's run
AFFECTED = {
    "validate",
    "finetune",
    "evaluate",
    "export",
    "report",
}  # what a finetune.lr change reruns
UPSTREAM = ("download", "index", "split", "features", "train_transfer")
ARTIFACTS = {"image-classifier": "models/finetune.pt", "image-classifier-onnx": "models/model.onnx"}
VERSION = "v1.0.0"
DOCS_REPO = "https://github.com/you/twophase"  # the repository URL the docs' examples use
WORKFLOW = PROJECT / ".github" / "workflows" / "pipeline.yml"


@dataclass
class Team:
    origin: Path  # the bare git repository everyone pushes to
    a: Path  # the clone that ran the DAG and pushed it
    main: dict[str, bytes]  # main's models and predictions, as A pushed them


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Team:
    """docs/team.md's first commands in clone A: the remote, git push, dvc push."""
    a = digits_project(tmp_path_factory, "team-a")
    shared = tmp_path_factory.mktemp("team-shared")
    origin, storage = shared / "origin.git", shared / "storage"
    run(shared, "git", "init", "-q", "--bare", "--initial-branch=main", str(origin))
    run(a, "git", "branch", "-M", "main")
    for key, value in (("user.name", "A"), ("user.email", "a@example.com")):  # for gto's tags
        run(a, "git", "config", key, value)
    # as after a user's `dvc repro`: what the run wrote for git is not committed yet
    run(a, "git", "reset", "-q", "HEAD~1")
    assert run(a, "git", "status", "--porcelain", "dvc.lock").startswith("??")
    run(a, "dvc", "remote", "add", "-d", "storage", str(storage))
    run(a, "git", "add", ".dvc/config", "params.yaml", "dvc.lock", "metrics", "plots")
    run(a, "git", *GIT_USER, "commit", "-qm", "DVC remote; results of dvc repro")
    assert not run(a, "git", "status", "--porcelain"), "the docs' git add leaves nothing behind"
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "push", "-q", "origin", "main")
    run(a, "dvc", "push")
    kept = [*ARTIFACTS.values(), "plots/evaluate/predictions_finetune.csv"]
    return Team(origin, a, {path: (a / path).read_bytes() for path in kept})


def exp_show(repo: Path) -> list[dict[str, Any]]:
    """`dvc exp show`'s rows but the workspace's (each clone's own)."""
    rows = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    return [row for row in rows if row["rev"] != "workspace"]


def test_a_colleague_pulls_the_experiment_and_retrains_nothing(team: Team, tmp_path: Path) -> None:
    a = team.a
    output = run(a, "dvc", "exp", "run", "-n", EXPERIMENT, "-S", f"finetune.lr={EXPERIMENT_LR}")
    assert ran(output) == AFFECTED, output[-3000:]
    run(a, "dvc", "exp", "push", "origin", EXPERIMENT)

    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(team.origin), str(b))
    run(b, "dvc", "pull")
    for path in ARTIFACTS.values():
        assert (b / path).read_bytes() == team.main[path], path
    assert "Data and pipelines are up to date" in run(b, "dvc", "status")

    run(b, "dvc", "exp", "pull", "origin")
    shown = exp_show(b)
    assert shown == exp_show(a)
    [experiment] = shown[0]["experiments"]
    assert experiment["name"] == EXPERIMENT
    assert experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]["finetune"][
        "lr"
    ] == float(EXPERIMENT_LR)

    run(b, "dvc", "exp", "apply", EXPERIMENT)
    assert (b / "models/finetune.pt").read_bytes() != team.main["models/finetune.pt"]
    for path in (*ARTIFACTS.values(), "params.yaml", "dvc.lock", "metrics/finetune.json"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert (b / "metrics/evaluate.json").read_bytes() == (a / "metrics/evaluate.json").read_bytes()
    output = run(b, "dvc", "repro")
    assert ran(output) == set(), output[-3000:]
    assert "Data and pipelines are up to date" in output, output[-3000:]


def test_the_registry_serves_both_models_of_a_version(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dvc.yaml's artifacts, a version registered by git tags, fetched from the bare repository
    and the local remote; the checkpoint loaded with plain torchvision (Use the model's code),
    the ONNX file with onnxruntime (docs/team.md's code): both give evaluate's probability."""
    from dvc.repo import Repo

    a, origin = team.a, str(team.origin)
    with Repo(str(a)) as repo:
        declared = repo.artifacts.read()["dvc.yaml"]
    assert {name: artifact.path for name, artifact in declared.items()} == ARTIFACTS
    for artifact in declared.values():
        assert artifact.type == "model" and artifact.desc
        assert {"resnet18", "digits"} <= set(artifact.labels), artifact.labels

    # a lightweight tag is no version: DVC's registry reads annotated tags only
    run(a, "git", "tag", "image-classifier@v0.1.0")
    run(a, "git", "push", "-q", "origin", "image-classifier@v0.1.0")
    refused = run(tmp_path, "dvc", "artifacts", "get", origin, "image-classifier", check=False)
    assert "via DVC remote: Unable to find artifact 'image-classifier'" in refused, refused
    run(a, "git", *GIT_USER, "tag", "-a", f"image-classifier@{VERSION}", "-m", "resnet18")
    run(a, "gto", "register", "image-classifier-onnx", "HEAD", "--version", VERSION)
    run(a, "git", "push", "-q", "origin", *(f"{name}@{VERSION}" for name in ARTIFACTS))

    got = run(tmp_path, "dvc", "artifacts", "get", origin, "image-classifier")
    got += run(
        tmp_path, "dvc", "artifacts", "get", origin, "image-classifier-onnx", "--rev", VERSION
    )
    assert "ERROR" not in got, got  # the Studio attempt is said only when the remote fails too
    for path in ARTIFACTS.values():
        assert (tmp_path / Path(path).name).read_bytes() == team.main[path], path

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    namespace: dict[str, Any] = {}
    exec(docs_block("team.md", "### From Python").replace(DOCS_REPO, origin), namespace)
    main = run(a, "git", "rev-parse", "main").strip()
    assert namespace["info"] == {"rev": main, "path": "models/finetune.pt"}
    assert namespace["checkpoint"] == team.main["models/finetune.pt"]

    predictions = pd.read_csv(io.BytesIO(team.main["plots/evaluate/predictions_finetune.csv"]))
    first = predictions.iloc[0]
    monkeypatch.chdir(tmp_path)  # the snippets name finetune.pt and model.onnx as fetched here
    loader = docs_block("use-the-model.md", "## Load a checkpoint without twophase")
    exec(loader.replace("models/finetune.pt", "finetune.pt"), namespace)
    prepare = docs_block("use-the-model.md", "## Preprocess an image without twophase")
    exec(prepare.replace("photo.jpg", str(a / first["path"])), namespace)
    exec(docs_block("team.md", "### Load the two models"), namespace)

    import torch

    probabilities = namespace["probabilities"][0]
    assert namespace["class_names"][probabilities.argmax()] == str(first["predicted"])
    assert abs(probabilities.max() - first["probability"]) < 1e-4
    model = namespace["model"].eval()
    with torch.no_grad():
        torchvision_probabilities = torch.softmax(model(namespace["batch"]), dim=1)[0]
    assert torch.allclose(torchvision_probabilities, torch.from_numpy(probabilities), atol=1e-4)


# The CI workflow, run here as GitHub's runner would run it for a pull request.

EVENT = {
    "github.event_name": "pull_request",
    "github.base_ref": "main",
    "runner.os": "Linux",
    "inputs.experiment": None,  # a pull request has no workflow_dispatch inputs
}


def expression(text: str, context: dict[str, Any]) -> Any:
    """A GitHub Actions expression of the forms the workflow uses: a context value, a 'literal',
    `a || b`, `a == b`. Any other form fails the test instead of being guessed."""
    text = text.strip()
    if "||" in text:
        values = [expression(term, context) for term in text.split("||")]
        return next((value for value in values if value), values[-1])
    if "==" in text:
        left, right = text.split("==")
        return expression(left, context) == expression(right, context)
    if literal := re.fullmatch(r"'([^']*)'", text):
        return literal.group(1)
    if text.startswith("secrets."):
        return ""  # a secret the repository does not set is the empty string
    assert text in context, f"the test does not simulate the expression {text!r}"
    return context[text]


def interpolate(value: str, context: dict[str, Any]) -> str:
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: str(expression(m.group(1), context) or ""), value)


def guard(step: dict[str, Any], context: dict[str, Any]) -> bool:
    """A step's `if:` (with or without `${{ }}`); no `if:` runs the step."""
    condition = str(step.get("if", "true")).strip()
    inner = re.fullmatch(r"\$\{\{(.*)\}\}", condition)
    return condition == "true" or bool(expression(inner.group(1) if inner else condition, context))


def project_venv(clone: Path) -> None:
    """The effect of the `make setup` step without its 5 GB install (.ci/run runs `make setup`
    itself): .venv, a virtual environment of the same Python whose site-packages reach this
    test's environment through a .pth, with the clone's src/ first (as the editable install
    puts it), and the `dvc` command of the workflow's steps. Nothing is written outside the
    clone."""
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    ours = sysconfig.get_path("purelib")
    Path(site, "test_environment.pth").write_text(
        f"{clone / 'src'}\nimport site; site.addsitedir({ours!r})\n"
    )
    dvc = venv / "bin" / "dvc"
    dvc.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom dvc.cli import main\n\nsys.exit(main())\n"
    )
    dvc.chmod(0o755)


def uses(step: dict[str, Any], clone: Path, paths: list[str]) -> None:
    """A `uses:` step replaced by its documented effect on the runner."""
    action, options = step["uses"].split("@")[0], step.get("with", {})
    if action == "actions/checkout":  # the clone of the branch; fetch-depth 0: every branch
        assert options.get("fetch-depth") == 0
        run(clone, "git", "rev-parse", "--verify", f"origin/{EVENT['github.base_ref']}")
    elif action == "actions/setup-python":  # that Python, without packages, first on PATH
        assert options["python-version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
        paths.append(str(Path(sys._base_executable).parent))
    elif action == "actions/upload-artifact":  # uploads these paths: they exist
        for path in options["path"].split():
            assert (clone / path).exists(), path
    elif action not in ("actions/cache", "iterative/setup-cml"):
        # actions/cache on a first run misses and restores nothing; setup-cml installs `cml`,
        # which only the posting step (never run here) calls
        raise AssertionError(f"the test does not simulate {step['uses']}")


def run_workflow(clone: Path, steps: list[dict[str, Any]], env: dict[str, str]) -> dict[str, str]:
    """Each step in order, as the runner would for EVENT: `run:` in `bash -e` in the clone with
    the job's and the step's env and the paths steps add to $GITHUB_PATH; each must succeed.
    Returns the output of each step that ran, by name."""
    runner = clone.parent / "runner"
    runner.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    system_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    paths: list[str] = []
    outputs: dict[str, str] = {}
    for index, step in enumerate(steps):
        if not guard(step, EVENT):
            continue
        if "uses" in step:
            uses(step, clone, paths)
            continue
        if step["run"].strip() == "make setup":
            project_venv(clone)
            continue
        script = runner / f"step{index}.sh"
        script.write_text(interpolate(step["run"], EVENT))
        github_path = runner / f"path{index}"
        step_env = {
            **env,
            **{k: interpolate(str(v), EVENT) for k, v in step.get("env", {}).items()},
            "GITHUB_PATH": str(github_path),
            "PATH": os.pathsep.join([*reversed(paths), system_path]),
        }
        done = subprocess.run(
            ["bash", "-e", str(script)], cwd=clone, env=step_env, capture_output=True, text=True
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"step {step.get('name', index)!r}:\n{output[-4000:]}"
        outputs[step.get("name", str(index))] = output
        if github_path.exists():
            paths += github_path.read_text().split()
    return outputs


def table_row(markdown: str, first_cells: tuple[str, ...]) -> list[str]:
    """The cells of the Markdown table row that starts with these cells."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if tuple(cells[: len(first_cells)]) == first_cells:
            return cells
    raise AssertionError(f"no row {first_cells} in:\n{markdown}")


def test_the_ci_workflow_reruns_the_changed_stages_and_writes_the_comment(
    team: Team, tmp_path: Path
) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # PyYAML reads the key `on` as True
    [job] = workflow["jobs"].values()
    steps = job["steps"]

    branch = "lower-finetune-lr"
    dev = tmp_path / "dev"
    run(tmp_path, "git", "clone", "-q", str(team.origin), str(dev))
    run(dev, "git", "checkout", "-q", "-b", branch)
    set_params(dev / "params.yaml", {"finetune": {"lr": CI_LR}})
    commit(dev, f"finetune.lr {CI_LR}")
    run(dev, "git", "push", "-q", "origin", branch)
    changed = run(dev, "git", "diff", "--name-only", "origin/main...HEAD").split()
    assert changed == ["params.yaml"]
    assert any(fnmatch.fnmatch("params.yaml", p) for p in triggers["pull_request"]["paths"])

    clone = tmp_path / "clone"  # actions/checkout: the pushed branch, every branch fetched
    run(tmp_path, "git", "clone", "-q", "--branch", branch, str(team.origin), str(clone))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("DVC_", "PYTEST_"))
    }
    env |= {
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": EVENT["github.event_name"],
        "GITHUB_BASE_REF": EVENT["github.base_ref"],
        "GITHUB_HEAD_REF": branch,
        "GITHUB_WORKSPACE": str(clone),
        "RUNNER_OS": EVENT["runner.os"],
    }
    env |= {k: interpolate(str(v), EVENT) for k, v in job.get("env", {}).items()}
    post = steps[-1]  # posting is the last step, the one not run here
    assert "cml comment create" in post["run"] and guard(post, EVENT)
    assert not guard(post, {**EVENT, "github.event_name": "push"})
    outputs = run_workflow(clone, steps[:-1], env)

    not_run = [s["name"] for s in steps[:-1] if "run" in s and s["name"] not in outputs]
    assert not_run == [  # replaced by project_venv; on pushes only
        "Set up (the README's command)",
        "Push outputs to the DVC remote, when one is configured",
    ]
    assert "::warning::" not in outputs["Pull outputs from the DVC remote, when one is configured"]
    pipeline = outputs["Run the pipeline"]
    assert ran(pipeline) == AFFECTED, pipeline[-3000:]
    for stage in UPSTREAM:
        assert f"Stage '{stage}' didn't change, skipping" in pipeline, (stage, pipeline[-3000:])

    folder, name = re.fullmatch(
        r"cd (\S+) && cml comment create (\S+)", post["run"].strip()
    ).groups()  # type: ignore[union-attr]
    comment = (clone / folder / name).read_text()
    assert comment.startswith(f"## Params against origin/{EVENT['github.base_ref']}\n| Path ")
    base = read_yaml(run(clone, "git", "show", "origin/main:params.yaml"))["finetune"]["lr"]
    assert table_row(comment, ("params.yaml", "finetune.lr"))[2:] == [str(base), str(CI_LR)]
    now = json.loads((clone / "metrics/evaluate.json").read_text())
    before = json.loads(run(clone, "git", "show", "origin/main:metrics/evaluate.json"))
    row = table_row(comment, ("metrics/evaluate.json", "finetune.accuracy"))
    assert float(row[2]) == pytest.approx(before["finetune"]["accuracy"], abs=1e-5)
    assert float(row[3]) == pytest.approx(now["finetune"]["accuracy"], abs=1e-5)
    metrics_part = comment[comment.index("## Metrics") : comment.index("# twophase report")]
    assert "transfer.accuracy" not in metrics_part  # phase 1 did not rerun
    report = (clone / "plots/report.md").read_text()
    assert comment.endswith(report)
    accuracy = table_row(report, ("accuracy",))
    assert accuracy[1:3] == [f"{now[p]['accuracy']:.4f}" for p in ("transfer", "finetune")]
    assert f"| `finetune.lr` | `{CI_LR}` |" in report
