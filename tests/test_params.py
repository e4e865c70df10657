from pathlib import Path

import pytest

from twophase.params import Params, ParamsError, load_params, parse_params, read_yaml

PROJECT = Path(__file__).resolve().parent.parent


def test_workspace_params_file_is_valid_whatever_experiment_is_applied() -> None:
    load_params(PROJECT / "params.yaml")


def test_defaults_are_the_reference_experiment() -> None:
    params = Params()
    assert params.data.dataset == "oxford_iiit_pet"
    assert params.model.dense_units == (256,)
    assert params.train_transfer.lr == pytest.approx(1e-4)
    assert params.finetune.unfreeze == ("1",)  # layer4 of a ResNet


def test_dvc_exp_run_spelling_of_small_floats_reads_as_float(tmp_path: Path) -> None:
    # `dvc exp run -S finetune.lr=1e-5` writes `lr: 1e-05`, which YAML 1.1 reads as a string
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  lr: 1e-05\ntrain_transfer:\n  lr: 3E-4\n")
    params = load_params(path)
    assert params.finetune.lr == 1e-05 and isinstance(params.finetune.lr, float)
    assert params.train_transfer.lr == 3e-4


def test_plain_yaml_values_keep_their_types() -> None:
    assert read_yaml("a: 1\nb: 1.5\nc: text\nd: [1, 2]") == {
        "a": 1,
        "b": 1.5,
        "c": "text",
        "d": [1, 2],
    }


def test_missing_keys_take_defaults() -> None:
    assert parse_params({}) == Params()
    assert parse_params(None) == Params()


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(
        ParamsError,
        match=r"finetune.learning_rate: unknown key; did you mean "
        r"finetune.lr\?",
    ):
        parse_params({"finetune": {"learning_rate": 1e-5}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"dataset": "cifar"}}, r"data.dataset: 'cifar' is not allowed; expected one of"),
        ({"data": {"val_ratio": 1.0}}, r"data.val_ratio: 1.0 is not allowed"),
        ({"finetune": {"lr": 0}}, r"finetune.lr: 0.0 is not allowed; expected a number > 0"),
        ({"train_transfer": {"batch_size": 0}}, r"train_transfer.batch_size: 0"),
        ({"train_transfer": {"patience": 0}}, r"train_transfer.patience: 0"),
        ({"finetune": {"unfreeze": ["all", "layer4"]}}, r"finetune.unfreeze: \['all', 'layer4'\]"),
        ({"finetune": {"unfreeze": [0]}}, r"finetune.unfreeze: 0 is not allowed; expected an int"),
        ({"features": {"dtype": "int8"}}, r"features.dtype: 'int8' is not allowed; expected one"),
        ({"model": {"dense_units": [-1]}}, r"model.dense_units: \[-1\]"),
        ({"train_transfer": {"solver": "lbfgs"}}, r"train_transfer.solver: 'lbfgs' fits a linear"),
        ({"finetune": {"optimizer": "rmsprop"}}, r"finetune.optimizer: 'rmsprop' is not allowed"),
        ({"finetune": {"schedule": "step"}}, r"finetune.schedule: 'step' is not allowed"),
        ({"finetune": {"lr_decay": 0}}, r"finetune.lr_decay: 0.0 is not allowed"),
        ({"train_transfer": {"warmup_epochs": 50}}, r"train_transfer.warmup_epochs: 50"),
        ({"finetune": {"label_smoothing": 1}}, r"finetune.label_smoothing: 1.0"),
        ({"finetune": {"class_weights": "auto"}}, r"finetune.class_weights: 'auto' is not all"),
        ({"train_transfer": {"mixup": -0.2}}, r"train_transfer.mixup: -0.2 is not allowed; exp"),
        ({"finetune": {"mixup": float("nan")}}, r"finetune.mixup: nan is not allowed"),
        ({"finetune": {"cutmix": float("inf")}}, r"finetune.cutmix: inf is not allowed"),
        ({"finetune": {"cutmix": 1.0}}, r"finetune.cutmix: 1.0 pastes .* finetune.input: images"),
        ({"train_transfer": {"cutmix": 1.0}}, r"train_transfer.cutmix: unknown key"),
        (
            {"finetune": {"mixup": 0.2}, "compute": {"nproc": 2}},
            r"finetune.mixup: 0.2 pairs the rows of one process's batch, so 2 processes",
        ),
        (
            {
                "train_transfer": {"mixup": 0.4},
                "compute": {"nnodes": 2, "rdzv_endpoint": "n1:29400"},
            },
            r"train_transfer.mixup: 0.4 pairs .* mix in one process",
        ),
        (
            {"train_transfer": {"mixup": 0.2, "solver": "lbfgs"}, "model": {"dense_units": []}},
            r"train_transfer.mixup: 0.2 mixes minibatches, but the L-BFGS probe",
        ),
        ({"finetune": {"ema": 1}}, r"finetune.ema: 1.0 is not allowed; expected a number in \[0"),
        ({"train_transfer": {"ema": -0.5}}, r"train_transfer.ema: -0.5 is not allowed"),
        ({"finetune": {"ema": float("nan")}}, r"finetune.ema: nan is not allowed"),
        (
            {"model": {"dense_units": []}, "train_transfer": {"solver": "lbfgs", "ema": 0.9}},
            r"train_transfer.ema: 0.9 averages the weights of optimizer steps",
        ),
        ({"model": {"dense_units": [0]}}, r"model.dense_units: \[0\]"),
        ({"model": {"dropout": 1.0}}, r"model.dropout: 1.0"),
        ({"model": {"arch": "res net"}}, r"model.arch: 'res net'"),
        ({"train_transfer": {"epochs": "ten"}}, r"train_transfer.epochs: expected an integer"),
        ({"finetune": {"lr": True}}, r"finetune.lr: expected a number"),
        ({"device": "tpu"}, r"device: 'tpu'"),
        ({"evaluate": {"tta": "crops"}}, r"evaluate.tta: 'crops' is not allowed; expected one of"),
        ({"finetune": 3}, r"finetune: expected a mapping"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_dotted_key(raw: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message) as caught:
        parse_params(raw)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "unfreeze",
    [
        ["layer4"],
        ["layer3", "layer4"],
        ["layer4", "layer3"],
        ["all"],
        ["stem", "layer1", "layer2", "layer3", "layer4"],
    ],
)
def test_unfreeze_accepts_the_last_blocks(unfreeze: list[str]) -> None:
    parse_params({"finetune": {"unfreeze": unfreeze}})


def test_invalid_yaml_is_a_params_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("finetune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_params_file_lists_every_key_so_that_dvc_exp_run_set_param_reaches_it() -> None:
    """`dvc exp run -S finetune.lr_decay=0.5` fails with DVC's "Could not override" unless the
    key is in params.yaml: every param has its line there (values are the applied experiment's)."""
    from twophase.params import flatten, to_dict

    listed = flatten(read_yaml((PROJECT / "params.yaml").read_text()))
    assert set(listed) == set(flatten(to_dict(Params())))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"seed: 1\nseed: 2\n", r"params\.yaml: key 'seed' appears twice \(line 2\)"),
        (b"finetune:\n  lr: 0.1\n  lr: 0.2\n", r"key 'lr' appears twice \(line 3\)"),
        (b"", r"is empty, which DVC refuses"),
        (b"  \n", r"is empty, which DVC refuses"),
        (b"seed: 4\xff\n", r"is not UTF-8 text"),
    ],
    ids=["duplicate key", "duplicate nested key", "empty", "blank", "not utf-8"],
)
def test_files_dvc_refuses_are_one_line_params_errors(
    tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from twophase.cli import main

    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match=message):
        load_params(path)
    assert main(["params", str(path)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_yaml_merge_keys_still_load() -> None:
    assert read_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n") == {
        "a": {"b": 1},
        "c": {"b": 1, "d": 2},
    }


def test_a_key_that_is_no_name_is_a_params_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ParamsError, match=r"a key that is not a name \(line 1\)"):
        load_params(path)
