"""Inference: submissions from one run, k fold runs (soft voting) and ensembles; `runyard infer`.

One module fixture trains the runs once (1 epoch each): the three folds of a 3-fold CV (fold 0
with an eval_dir, so the job writes its own submission), a multi-head run and a 3-class
ImageFolder run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.io import decode_image

from contracts.spec import load_spec
from runyard.cli.infer import infer_command
from tests.helpers import isolated_env, make_image_folder, run_cli, tiny_spec
from trainer.infer import (
    choose_voting,
    load_run,
    load_runs,
    predict_probabilities,
    predict_submission,
    read_eval_dir,
    vote,
)
from trainer.train import train


@dataclass
class Runs:
    home: Path
    eval_dir: Path
    folds: list[dict]
    multi: dict
    three_classes: dict


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> Runs:
    home = tmp_path_factory.mktemp("infer-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("RUNYARD_HOME", str(home))
    patch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core box: one thread is several times faster
    try:
        quick = {"pictures": False, "resize": "32x24"}
        folds = [
            train(
                load_spec(
                    tiny_spec(
                        demo_data,
                        run_name=f"cv-fold{fold}",
                        kfold={"k": 3, "fold": fold},
                        eval_dir=str(demo_data / "eval") if fold == 0 else None,
                        **quick,
                    )
                )
            )
            for fold in range(3)
        ]
        multi = train(load_spec(tiny_spec(demo_data, run_name="multi", heads="multi", **quick)))
        folder_spec = tiny_spec(demo_data, run_name="three-classes", **quick) | {
            "dataset": "image_folder",
            "data_dir": str(make_image_folder(demo_data, home / "folders")),
        }
        three = train(load_spec(folder_spec))
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    return Runs(home, demo_data / "eval", folds, multi, three)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def infer(runs: Runs, *args: str):
    return CliRunner().invoke(infer_command, [*args], env={"RUNYARD_HOME": str(runs.home)})


def test_job_with_an_eval_dir_writes_and_scores_its_own_submission(runs):
    submission = runs.folds[0]["submission"]
    assert Path(submission["path"]) == Path(runs.folds[0]["run_dir"]) / "submission.csv"
    rows = read_rows(Path(submission["path"]))
    assert [row["ImageID"] for row in rows] == read_eval_dir(runs.eval_dir)
    assert 0.0 <= submission["eval"]["f1"] <= 1.0 and submission["eval"]["images"] == len(rows)
    assert "submission" not in runs.folds[1]


def test_runyard_infer_writes_one_row_per_eval_image_in_info_order(runs, tmp_path):
    output = tmp_path / "one.csv"
    env = isolated_env("unix:///nowhere", runs.home) | {"OMP_NUM_THREADS": "1"}  # inference needs no Redis
    result = run_cli(
        "runyard",
        "infer",
        runs.multi["run_name"],
        "--eval-dir",
        str(runs.eval_dir),
        "-o",
        str(output),
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["submission"] == str(output) and summary["voting"] == "soft" and summary["runs"] == 1
    assert 0.0 <= summary["score"]["f1"] <= 1.0  # the demo's eval dir ships answers.csv
    rows = read_rows(output)
    with open(runs.eval_dir / "info.csv", newline="") as handle:
        info = [row["ImageID"] for row in csv.DictReader(handle)]
    assert [row["ImageID"] for row in rows] == info
    assert all(0 <= int(row["ans"]) < 18 for row in rows)
    assert "predicting 18 images" in result.stderr


def test_kfold_soft_voting_is_the_argmax_of_the_mean_fold_probabilities(runs, tmp_path):
    fold_dirs = [fold["run_dir"] for fold in runs.folds]
    loaded = load_runs(fold_dirs)
    assert choose_voting(loaded, "auto") == "soft"
    probabilities = torch.stack([predict_probabilities(run, runs.eval_dir) for run in loaded])
    assert probabilities.shape == (3, 18, 18)
    assert torch.allclose(probabilities.sum(dim=2), torch.ones(3, 18, dtype=torch.float64))
    path = predict_submission(fold_dirs, runs.eval_dir, output=tmp_path / "cv.csv")
    written = [int(row["ans"]) for row in read_rows(path)]
    assert written == probabilities.mean(dim=0).argmax(dim=1).tolist()


def test_hard_voting_takes_the_majority_and_breaks_ties_by_training_frequency():
    def one_hot(*classes):
        return torch.nn.functional.one_hot(torch.tensor(classes), 8).double()

    # image 0: runs say 2, 2, 5; image 1: 1, 4, 7 (a three-way tie)
    probabilities = [one_hot(2, 1), one_hot(2, 4), one_hot(5, 7)]
    counts = [10, 10, 10, 10, 50, 10, 10, 10]  # class 4 was the most frequent in training
    assert vote(probabilities, "hard", counts).tolist() == [2, 4]
    assert vote(probabilities, "hard", [10, 10, 10, 10, 10, 10, 10, 90]).tolist() == [2, 7]
    assert vote(probabilities, "hard").tolist() == [2, 1]  # no counts: the lower class
    # soft voting can disagree with the majority when one run is far surer
    confident = [torch.tensor([[0.4, 0.6]]), torch.tensor([[0.4, 0.6]]), torch.tensor([[1.0, 0.0]])]
    assert vote(confident, "hard").tolist() == [1] and vote(confident, "soft").tolist() == [0]


def test_auto_voting_is_hard_for_an_ensemble_of_different_runs(runs, tmp_path):
    ensemble = [runs.folds[0]["run_dir"], runs.multi["run_dir"], runs.folds[1]["run_dir"]]
    assert choose_voting(load_runs(ensemble), "auto") == "hard"
    result = infer(runs, *ensemble, "--eval-dir", str(runs.eval_dir), "-o", str(tmp_path / "e.csv"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["voting"] == "hard"
    assert len(read_rows(tmp_path / "e.csv")) == 18


def test_hflip_tta_averages_the_image_and_its_mirror(runs, tmp_path):
    mirrored = tmp_path / "mirrored"
    (mirrored / "images").mkdir(parents=True)
    (mirrored / "info.csv").write_bytes((runs.eval_dir / "info.csv").read_bytes())
    for image_id in read_eval_dir(runs.eval_dir):
        pixels = decode_image(str(runs.eval_dir / "images" / image_id)).flip(-1)
        # lossless PNG bytes under the same name: the decoder reads the content, not the suffix
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(mirrored / "images" / image_id, format="PNG")
    run = load_run(runs.multi["run_dir"])
    plain = predict_probabilities(run, runs.eval_dir)
    flipped = predict_probabilities(run, mirrored)
    with_tta = predict_probabilities(run, runs.eval_dir, tta="hflip")
    assert not torch.allclose(plain, flipped)
    assert torch.allclose(with_tta, (plain + flipped) / 2, atol=1e-5)


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing-run", "run nowhere-run: no such run dir"),
        ("no-info", "no info.csv"),
        ("mixed-classes", "runs predict different classes"),
        ("no-checkpoint", "no checkpoints/best.pt"),
        ("missing-image", "1 of 18 images of info.csv are not in images/"),
    ],
)
def test_bad_input_to_infer_exits_2_with_a_clear_error(runs, tmp_path, case, words):
    eval_dir, run_args = runs.eval_dir, [runs.multi["run_name"]]
    if case == "missing-run":
        run_args = ["nowhere-run"]
    elif case == "no-info":
        eval_dir = tmp_path / "empty-eval"
        (eval_dir / "images").mkdir(parents=True)
    elif case == "mixed-classes":
        run_args = [runs.multi["run_dir"], runs.three_classes["run_dir"]]
    elif case == "no-checkpoint":
        (tmp_path / "half-run").mkdir()
        run_args = [str(tmp_path / "half-run")]
    elif case == "missing-image":
        eval_dir = tmp_path / "partial-eval"
        (eval_dir / "images").mkdir(parents=True)
        (eval_dir / "info.csv").write_bytes((runs.eval_dir / "info.csv").read_bytes())
        for image_id in read_eval_dir(runs.eval_dir)[1:]:
            (eval_dir / "images" / image_id).write_bytes((runs.eval_dir / "images" / image_id).read_bytes())
    output = tmp_path / "never.csv"
    result = infer(runs, *run_args, "--eval-dir", str(eval_dir), "-o", str(output))
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not output.exists()


def test_infer_help_explains_every_option():
    result = CliRunner().invoke(infer_command, ["--help"])
    assert result.exit_code == 0
    options = [param for param in infer_command.params if param.param_type_name == "option"]
    assert len(options) == 9
    for option in options:
        assert option.help and len(option.help) > 20, f"{option.opts} has no explanation"
        assert option.opts[-1] in result.output
    assert "ties to the class most frequent in training" in " ".join(result.output.split())
