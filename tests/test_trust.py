"""One clear line for each user-reachable failure; phase 2 never worse than phase 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tests.helpers import PROJECT, write_image
from tests.test_datasets import fake_pet
from tests.test_train import tiny_network
from twophase import cache
from twophase.batches import array_batches
from twophase.cache import FeatureCacheError, check_free_space
from twophase.datasets import DatasetError, build_index
from twophase.io import write_json
from twophase.model import WeightsError, build_model
from twophase.params import ParamsError, PhaseParams, parse_params
from twophase.stage import run_stage
from twophase.train import fit

CPU = torch.device("cpu")


def run_stage_script(
    folder: Path, stage: str, *python_flags: str
) -> subprocess.CompletedProcess[str]:
    """stages/<stage>.py run in `folder` as DVC runs it."""
    command = [sys.executable, *python_flags, str(PROJECT / "stages" / f"{stage}.py")]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_numpys_range_is_a_params_error(seed: int) -> None:
    with pytest.raises(ParamsError, match=r"^seed: .* expected an integer in \[0, 2\*\*32\)"):
        parse_params({"seed": seed})


def test_weights_with_the_right_names_but_wrong_shapes(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    state["layer4.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match=r"does not fit resnet18 \(.*layer4.0.conv1.weight"):
        build_model("resnet18", str(tmp_path / "odd.pt"), 224)


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", b"PK\x03\x04 truncated zip"],
    ids=["garbage", "truncated"],
)
def test_corrupt_weights_file_is_one_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(WeightsError, match="is not a PyTorch weights file") as caught:
        build_model("resnet18", str(tmp_path / "bad.pt"), 224)
    assert "\n" not in str(caught.value)


def test_weights_file_without_a_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        build_model("resnet18", str(tmp_path / "meta.pt"), 224)


def _stage_exit(main, capsys: pytest.CaptureFixture[str], **kwargs) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        run_stage(main, **kwargs)
    return int(caught.value.code), capsys.readouterr().err


def test_cuda_out_of_memory_names_the_batch_size_param(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    code, err = _stage_exit(main, capsys, batch_size_param="finetune.batch_size")
    assert code == 1
    assert err.strip().splitlines() == [
        "twophase: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate "
        "2.00 GiB); lower finetune.batch_size and rerun"
    ]


def test_disk_too_small_for_the_feature_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = type("usage", (), {"free": 2**30})
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage)
    check_free_space(tmp_path, needed=2**30)  # exactly 1 GiB: fits
    with pytest.raises(FeatureCacheError, match=r"need 4.00 GiB in .* only 1.00 GiB is free"):
        check_free_space(tmp_path, needed=2**32)


def test_feature_cache_cut_elsewhere_is_one_line(tmp_path: Path) -> None:
    from twophase.phases import finetune

    write_json({"cut": "layer4"}, tmp_path / "activations" / "meta.json")
    params = parse_params(
        {"model": {"weights": "none"}, "finetune": {"unfreeze": ["layer3", "layer4"]}}
    )
    torch.save(_tiny_checkpoint(), tmp_path / "transfer.pt")
    with pytest.raises(
        FeatureCacheError, match=r"starts at layer3 but .* holds the input of layer4"
    ):
        finetune(
            params,
            tmp_path / "activations",
            tmp_path / "transfer.pt",
            tmp_path / "f.pt",
            tmp_path / "h.csv",
        )


def _tiny_checkpoint() -> dict:
    from twophase.checkpoint import build_network

    checkpoint = {
        "arch": "resnet18",
        "model_kwargs": {},
        "classifier": "fc",
        "head": {"in_features": 512, "dense_units": [4], "dropout": 0.0, "num_classes": 2},
        "class_names": ["a", "b"],
    }
    return {**checkpoint, "state_dict": build_network(checkpoint).state_dict()}


def test_corrupt_image_inside_a_torchvision_dataset_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fake_pet(tmp_path)
    (root / "oxford-iiit-pet" / "images" / "Abyssinian_2.jpg").write_bytes(b"\xff\xd8 cut short")
    index = build_index("oxford_iiit_pet", root)
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(
        r"twophase: warning: Oxford-IIIT Pet .* skipped 1 image.*Abyssinian_2.jpg", line
    )
    assert len(index) == 5 and not index["path"].str.contains("Abyssinian_2").any()


def test_torchvision_class_left_without_readable_training_images_is_an_error(
    tmp_path: Path,
) -> None:
    root = fake_pet(tmp_path)
    for name in ("Abyssinian_1", "Abyssinian_2"):
        (root / "oxford-iiit-pet" / "images" / f"{name}.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="no readable training"):
        build_index("oxford_iiit_pet", root)


def test_an_output_linked_into_a_cache_is_replaced_never_written_through(tmp_path: Path) -> None:
    """With DVC's cache.type hardlink an output is a link to a file in .dvc/cache: writing the
    output anew (a file, a stage's folder) must leave the cached copy as it was."""
    from twophase.io import atomic_path, write_json

    cached = tmp_path / "cache"
    (cached / "folder").mkdir(parents=True)
    (cached / "file.json").write_text('{"old": 1}')
    (cached / "folder" / "rows.npy").write_bytes(b"old rows")
    (tmp_path / "out").mkdir()
    os.link(cached / "file.json", tmp_path / "out" / "file.json")
    (tmp_path / "out" / "folder").mkdir()
    os.link(cached / "folder" / "rows.npy", tmp_path / "out" / "folder" / "rows.npy")

    write_json({"new": 2}, tmp_path / "out" / "file.json")
    with atomic_path(tmp_path / "out" / "folder", folder=True) as tmp:
        tmp.mkdir()
        (tmp / "rows.npy").write_bytes(b"new rows")
    assert (cached / "file.json").read_text() == '{"old": 1}'
    assert (cached / "folder" / "rows.npy").read_bytes() == b"old rows"
    assert (tmp_path / "out" / "file.json").read_text().startswith('{\n  "new"')
    assert (tmp_path / "out" / "folder" / "rows.npy").read_bytes() == b"new rows"


def test_leftovers_of_a_killed_rename_are_cleaned(tmp_path: Path) -> None:
    from twophase.io import atomic_path

    for stale in (".cache.tmp-99999998", ".cache.old-99999999"):  # no such processes
        write_image(tmp_path / stale / "x.jpg", seed=0)
    running = write_image(tmp_path / f".cache.tmp-{os.getppid()}" / "x.jpg", seed=0).parent
    with atomic_path(tmp_path / "cache") as tmp:
        tmp.mkdir()
    # a concurrent writer's temporary (its process runs) is not ours to remove
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", running.name])


def test_phase_two_that_only_gets_worse_hands_back_its_starting_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    inputs = torch.randn(24, 4).numpy()
    labels = (torch.arange(24) % 3).numpy()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(
        model,
        (array_batches(inputs, labels, 8, True), array_batches(inputs, labels, 8)),
        PhaseParams(lr=50.0, epochs=3, patience=5),  # every step overshoots the start
        device=CPU,
        start_epoch=10,
    )
    assert result.start_epoch == 10 and result.history[0].epoch == 10
    assert result.kept_starting_weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, start[key]), key


def test_frozen_batchnorm_keeps_running_statistics_while_affine_parameters_train() -> None:
    tail = tiny_network(dropout=0.0)
    tail.freeze_batchnorm = True
    bn = tail.model.layer4[0].bn1
    before = bn.running_mean.clone(), bn.weight.detach().clone()
    tail.train()
    assert not bn.training
    optimizer = torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.1)
    loss = tail(torch.randn(4, 256, 2, 2)).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, before[0]), "statistics fixed"
    assert not torch.equal(bn.weight, before[1]), "affine parameters train"
    tail.freeze_batchnorm = False
    tail.train()
    assert bn.training


def test_negative_seed_fails_the_first_stage_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: -3\n")
    done = run_stage_script(tmp_path, "split")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "twophase: error: seed: -3 is not allowed; expected an integer in [0, 2**32)"
    ]


def test_the_disk_check_counts_the_cache_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enough room for the cache itself is enough: the check must not overcount it."""
    import copy

    from tests.helpers import make_imagefolder
    from twophase.features import extract
    from twophase.model import Preprocessing
    from twophase.network import FrozenTrunk

    root = make_imagefolder(tmp_path / "images", classes=("a", "b"), train=3, test=0)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    tail = tiny_network(classes=2)

    def run(out: Path) -> int:
        extract(
            FrozenTrunk(copy.deepcopy(tail.model), tail.family, "layer4"),
            {"train": (paths, [0, 0, 0, 1, 1, 1])},
            out / "embeddings",
            out / "activations",
            image_size=32,
            prep=Preprocessing(),
            batch_size=4,
            num_workers=0,
            device=CPU,
        )
        return sum(p.stat().st_size for p in out.rglob("*.npy"))

    written = run(tmp_path / "first")  # no backbone.pt here: the arrays are all it writes
    usage = type("usage", (), {"free": 2 * written})  # room for them and DVC's copy, exactly
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(cache, "dvc_copies", lambda: 2)
    assert run(tmp_path / "second") == written
    usage.free = written  # room for the cache, none for DVC's copy of it
    with pytest.raises(FeatureCacheError, match="the feature cache and DVC's copy of it need"):
        run(tmp_path / "third")


@pytest.mark.parametrize(
    ("config", "copies"),
    [
        (None, 2),
        ("[core]\n    remote = x\n", 2),
        ("[cache]\n    type = hardlink\n", 1),
        ("[cache]\n    type = hardlink,symlink\n", 1),
        ("[cache]\n    type = reflink,copy\n", 2),
    ],
)
def test_the_disk_check_counts_dvcs_copy_unless_the_cache_links(
    tmp_path: Path, config: str | None, copies: int
) -> None:
    from twophase.cache import dvc_copies

    path = tmp_path / "config"
    if config is not None:
        path.write_text(config)
    assert dvc_copies(path) == copies
    (tmp_path / "config.local").write_text("[cache]\n    type = hardlink\n")  # dvc config --local
    assert dvc_copies(path) == 1
    (tmp_path / "config.local").write_text("[cache]\n    type = copy\n")
    assert dvc_copies(path) == 2


DEMO_DVC_YAML = """stages:
  demo:
    cmd: python stages/demo.py
    params: [seed, finetune.lr]
    outs: [out.txt, {kept: {persist: true}}]
  paramless:
    cmd: python stages/paramless.py
    outs: [out.txt]
"""


@pytest.mark.parametrize(
    ("stage", "edit", "fails"),
    [
        ("demo", {"finetune": {"lr": 3e-5}}, True),
        ("demo", {"seed": 7}, True),
        ("demo", {"train_transfer": {"lr": 1.0}}, False),
        ("paramless", {"seed": 7}, False),
    ],
    ids=["declared key", "declared section", "another stage's param", "a stage without params"],
)
def test_a_stage_fails_if_its_params_changed_while_it_ran(
    in_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stage: str,
    edit: dict,
    fails: bool,
) -> None:
    """`dvc exp run -S` during a `dvc repro` rewrites params.yaml mid-stage: DVC would then
    record values the stage never used. The stage fails in one line naming what changed, and
    removes what it wrote (a persist output, not its to remove, stays)."""
    import yaml

    from twophase.stage import run_stage

    (in_tmp / "dvc.yaml").write_text(DEMO_DVC_YAML)
    start = {"seed": 42, "finetune": {"lr": 1e-5}, "train_transfer": {"lr": 1e-4}}
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(start))
    (in_tmp / "kept").mkdir()
    monkeypatch.setattr("sys.argv", [f"stages/{stage}.py"])

    def main() -> None:  # the stage writes its output while a user's `-S` edits params.yaml
        (in_tmp / "out.txt").write_text("trained with the old values")
        changed = {
            k: {**v, **edit[k]} if isinstance(v, dict) else edit[k]
            for k, v in start.items()
            if k in edit
        }
        (in_tmp / "params.yaml").write_text(yaml.safe_dump({**start, **changed}))

    if not fails:
        run_stage(main)
        assert (in_tmp / "out.txt").is_file()
        return
    with pytest.raises(SystemExit) as exited:
        run_stage(main)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "params.yaml changed while this stage ran" in err[0], err
    assert next(iter(edit)) in err[0]
    assert not (in_tmp / "out.txt").exists() and (in_tmp / "kept").is_dir()


def test_the_report_lists_no_speed_only_param_as_a_difference() -> None:
    """Speed-only params are no dependency of the report stage, so a value shown there would
    be stale; and they change no result. Real differences are still listed."""
    from twophase.params import Params, to_dict
    from twophase.report import _params_diff

    defaults = to_dict(Params())
    current = to_dict(Params())
    current["compute"].update(nproc=2, num_workers=4)
    current["features"].update(batch_size=16, num_workers=0)
    assert _params_diff(current, defaults) == "None: this run used the default params."
    current["finetune"]["lr"] = 3e-5
    table = _params_diff(current, defaults)
    assert "`finetune.lr`" in table and "compute" not in table and "batch_size" not in table


def test_global_batchnorm_replaces_plain_batchnorm_and_refuses_norm_with_activation() -> None:
    """A BatchNorm subclass may do more than normalise (timm's BatchNormAct2d runs its
    activation too): replacing it would train a network without it, so it is refused."""
    import timm

    from twophase.distributed import GlobalBatchNorm, UnsupportedBatchNormError, global_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    before, keys = net(x), list(net.state_dict())
    global_batchnorm(net, {id(net[1])})
    assert isinstance(net[1], GlobalBatchNorm) and list(net.state_dict()) == keys
    assert torch.equal(net(x), before)  # one process, eval: the same layer
    model = timm.create_model("efficientnet_b0", pretrained=False)
    with pytest.raises(UnsupportedBatchNormError, match=r"^finetune\.batchnorm: .*bn1"):
        global_batchnorm(model, {id(model.bn1)})


def test_any_stage_start_removes_what_a_killed_run_left_beside_its_outputs(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage restored by DVC from its run-cache never runs its own cleanup: every stage's
    start does it, for every stage output it declares."""
    from twophase.stage import run_stage

    (in_tmp / "dvc.yaml").write_text(DEMO_DVC_YAML)
    (in_tmp / "params.yaml").write_text("seed: 42\n")
    stale = [in_tmp / ".out.txt.tmp-99999998", in_tmp / ".kept.old-99999999"]
    for path in stale:
        write_image(path / "x.jpg", seed=0)
    other = write_image(in_tmp / ".photo.jpg.tmp-99999997", seed=0)  # not beside an output
    monkeypatch.setattr("sys.argv", ["stages/demo.py"])
    run_stage(lambda: None)
    assert not any(path.exists() for path in stale) and other.is_file()


def test_leftovers_of_killed_writes_are_git_ignored() -> None:
    done = subprocess.run(
        ["git", "check-ignore", "models/.transfer.pt.tmp-4242", "data/.embeddings.old-17"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split() == ["models/.transfer.pt.tmp-4242", "data/.embeddings.old-17"]


def test_validate_names_a_missing_data_root_before_dvc_does(tmp_path: Path) -> None:
    """DVC stops on a missing dependency with its own words and no param named. The value was
    changed from the committed one, so the line says it stands in params.yaml."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("seed: 42\n")
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "params"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text(
        "data:\n  dataset: imagefolder\n  root: /no/such/folder\n"
    )
    done = run_stage_script(tmp_path, "validate")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("twophase: error: data.root: '/no/such/folder' does not exist")
    assert "git checkout params.yaml" in line


def test_a_stage_run_by_a_python_without_the_packages_says_so_in_one_line(tmp_path: Path) -> None:
    """`dvc repro` outside the project's environment runs a python without torch: one line
    naming that python and the environment to activate, no import traceback."""
    done = run_stage_script(tmp_path, "validate", "-S")  # -S: no site-packages
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"twophase: error: {sys.executable} has no ")
    assert "torch" in line and ".venv/bin/activate" in line


FSIZE_CHILD = """
import resource, signal, sys
sys.path.insert(0, {src!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from twophase.stage import run_stage

def main():
    {body}

run_stage(main)
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("open('big.bin', 'wb').write(b'x' * (4 << 20))", "a file outgrew the file-size limit"),
        (
            "import torch; torch.save(torch.zeros(1 << 20), 'big.pt')",
            "a checkpoint could not be written: the disk is full or a file-size limit",
        ),
        ("open('gone/vanished.jpg', 'rb')", "no such file (gone/vanished.jpg)"),
    ],
    ids=["file", "checkpoint", "vanished"],
)
def test_system_faults_in_a_stage_are_one_line(tmp_path: Path, body: str, expected: str) -> None:
    """A full disk or a file-size limit (EFBIG stands in for ENOSPC here) and a file that
    vanished give one line, not a traceback; TWOPHASE_DEBUG=1 shows the traceback."""
    code = FSIZE_CHILD.format(src=str(PROJECT / "src"), body=body)
    for debug, lines in (("", 1), ("1", None)):
        env = {**os.environ, "TWOPHASE_DEBUG": debug}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
        )
        assert done.returncode == 1
        err = done.stderr.strip().splitlines()
        if lines == 1:
            assert len(err) == 1 and err[0].startswith(f"twophase: error: {expected}"), err
        else:
            assert "Traceback" in done.stderr


def test_validate_names_what_dvc_cannot_hash_in_data_root(tmp_path: Path) -> None:
    """Dangling symlinks, symlink loops and non-UTF-8 names make DVC fail on the dependency
    with no file or param named: validate names them first."""
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "cat" / "loop.jpg").symlink_to(root / "cat" / "loop.jpg")
    with open(os.fsencode(root / "cat") + b"/caf\xe9.jpg", "wb") as handle:
        handle.write(b"x")
    (tmp_path / "params.yaml").write_text(f"data:\n  dataset: imagefolder\n  root: {root}\n")
    done = run_stage_script(tmp_path, "validate")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"twophase: error: data.root: '{root}' holds what DVC cannot hash")
    for what in ("gone.jpg: a symlink to nothing", "loop.jpg: a symlink loop", "not UTF-8"):
        assert what in line, what


def test_epochs_run_counts_trained_epochs_not_the_scored_starting_weights() -> None:
    from twophase.train import EpochStats, FitResult

    rows = [EpochStats(e, 1.0, 0.5, 1.0, 0.5) for e in (6, 7, 8)]
    assert FitResult(history=rows, start_epoch=6).epochs_run == 2  # phase 2: 6 is phase 1's
    assert FitResult(history=rows).epochs_run == 3


def test_processes_a_stage_relaunches_die_when_it_is_killed_with_sigkill(tmp_path: Path) -> None:
    """kill -9 of a stage relaunched under torchrun must not leave torchrun and its ranks
    running on, writing outputs DVC has declared failed."""
    import signal
    import time

    import psutil

    code = (
        # Ctrl-C raises KeyboardInterrupt, as in a terminal's foreground job (a shell's
        # background job, e.g. this test run under `make test &`, starts with SIGINT ignored)
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"import sys; sys.path.insert(0, {str(PROJECT / 'src')!r})\n"
        "from twophase.stage import _relaunch\n"
        "_relaunch([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline:
        children = psutil.Process(parent.pid).children()
        time.sleep(0.1)
    assert children, "the relaunched process never started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "the relaunched process outlived its killed parent"


def test_more_processes_than_gpus_is_a_params_error_before_torchrun_starts(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from twophase.stage import run_stage

    (in_tmp / "params.yaml").write_text("device: cuda\ncompute:\n  nproc: 2\n")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("sys.argv", ["stages/train_transfer.py"])
    started = []
    with pytest.raises(SystemExit) as exited:
        run_stage(lambda: started.append(1), distributed=True)
    assert exited.value.code == 1 and not started
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("twophase: error: compute.nproc: 2 processes per node, but this node")


def test_a_fault_without_errno_keeps_its_message() -> None:
    """A DataLoader worker's error reaches the main process as FileNotFoundError(message) with
    no errno: the line must still say which file."""
    from twophase.errors import fault_line

    worker = FileNotFoundError(
        "Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most "
        "recent call last):\n  ...\nFileNotFoundError: [Errno 2] No such file or directory: "
        "'data/raw/train/cat/1.jpg'"
    )
    assert fault_line(worker) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'data/raw/train/cat/1.jpg'"
    )
    assert fault_line(OSError("image file is truncated (3 bytes not processed)")) == (
        "image file is truncated (3 bytes not processed)"
    )
    assert fault_line(ValueError("a bug")) is None


def test_ctrl_c_of_a_relaunched_stage_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C reaches the stage alone (torchrun runs in a session of its own); the stage stops
    torchrun, waits for it, and says so in one line instead of torchrun's and every rank's
    tracebacks."""
    import signal
    import time

    fake_torchrun = (
        "import signal, sys, time\n"
        "def stop(*_): raise RuntimeError('torchrun: a long traceback, as SignalException')\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('rank 0: started', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    code = (
        # Ctrl-C raises KeyboardInterrupt, as in a terminal's foreground job (a shell's
        # background job, e.g. this test run under `make test &`, starts with SIGINT ignored)
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"import sys; sys.path.insert(0, {str(PROJECT / 'src')!r})\n"
        "from twophase.stage import _relaunch, run_stage\n"
        f"run_stage(lambda: sys.exit(_relaunch([sys.executable, '-c', {fake_torchrun!r}])))\n"
    )
    stage = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert stage.stderr is not None
    assert stage.stderr.readline().strip() == "rank 0: started"  # forwarded while it runs
    time.sleep(0.2)
    os.killpg(stage.pid, signal.SIGINT)  # what Ctrl-C sends: to the foreground group
    rest = stage.stderr.read().strip().splitlines()
    assert stage.wait(timeout=30) == 130
    assert rest == ["twophase: interrupted; unfinished outputs were removed"]
