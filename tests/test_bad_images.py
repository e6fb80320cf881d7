"""A corrupt image in a good dataset: every failure names the file, is a data_error (not retried),
and `bad_images: skip` trains without it, counting it in the result. Also `runyard doctor
--data-dir` decoding every image, center_crop against the images' size, and `runyard infer` on a
bad eval image or an unfinished run.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import torch
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from tests.helpers import BIN, isolated_env, run_cli, tiny_spec
from trainer.data import DataError, UnreadableImage
from trainer.image_cache import decode
from trainer.loaders import build_loaders, load_samples

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def corrupt(path: Path, kind: str) -> Path:
    """Break one image the ways files break: cut short, emptied, or replaced by text."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is a text file with a .jpg name\n")
    return path


def dataset_with(demo_data: Path, root: Path, kind: str, stem: str = "mask1") -> tuple[Path, Path]:
    """A copy of the demo dataset with one image broken; returns (dataset root, the broken file)."""
    shutil.copytree(demo_data, root)
    profile = sorted((root / "train" / "images").iterdir())[3]
    return root, corrupt(profile / f"{stem}.jpg", kind)


REASONS = {"truncated": "incomplete or truncated", "empty": "non empty file", "text": "Unsupported image file"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_decode_names_the_file_the_reason_and_the_fix(demo_data, tmp_path, kind):
    _, broken = dataset_with(demo_data, tmp_path / "data", kind)
    with pytest.raises(UnreadableImage) as raised:
        decode(str(broken))
    message = str(raised.value)
    assert message.startswith(f"{broken}: cannot decode this image") and REASONS[kind] in message
    assert "bad_images: skip" in message and ".cpp" not in message


def loaders(data: Path, **overrides):
    spec = load_spec(tiny_spec(data, resize="32x24") | overrides)
    samples, _ = load_samples(spec)
    return build_loaders(spec, samples, MEAN, STD, torch.device("cpu"))


def test_an_empty_image_without_a_cache_fails_when_a_loader_worker_reaches_it_naming_the_file(demo_data, tmp_path):
    data, broken = dataset_with(demo_data, tmp_path / "data", "empty")
    train_loader, val_loader = loaders(data, image_cache="none", num_workers=1)
    with pytest.raises(UnreadableImage) as raised:
        for loader in (train_loader, val_loader):
            list(loader)
    # Rebuilt from the worker's exception: the message, not the worker's traceback.
    assert str(raised.value).startswith(f"{broken}: cannot decode this image (Expected a non empty file)")
    assert "Traceback" not in str(raised.value)


def test_a_text_file_named_jpg_fails_the_disk_cache_build_and_its_manifest_remembers_it(
    demo_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    data, broken = dataset_with(demo_data, tmp_path / "data", "text")
    with pytest.raises(UnreadableImage, match=r"^1 image\(s\) of .* cannot be decoded:") as raised:
        loaders(data, image_cache="disk", num_workers=0)
    assert f"{broken}: cannot decode this image (Unsupported image file)" in str(raised.value)
    [manifest] = (tmp_path / "home" / "cache" / "images").glob("*/manifest.json")
    assert list(json.loads(manifest.read_text())["unreadable"]) == [str(broken)]
    train_loader, val_loader = loaders(data, image_cache="disk", num_workers=0, bad_images="skip")  # no re-decode
    assert train_loader.dataset.skipped + val_loader.dataset.skipped == [str(broken)]


def test_bad_images_skip_without_a_cache_decodes_once_and_leaves_the_file_out(demo_data, tmp_path):
    data, broken = dataset_with(demo_data, tmp_path / "data", "truncated")
    train_loader, val_loader = loaders(data, image_cache="none", num_workers=0, bad_images="skip")
    paths = [sample.path for sample in train_loader.dataset.samples + val_loader.dataset.samples]
    assert str(broken) not in paths and len(paths) == 251
    assert train_loader.dataset.skipped + val_loader.dataset.skipped == [str(broken)]


def test_a_center_crop_larger_than_the_images_is_refused_before_decoding(demo_data, tmp_path):
    with pytest.raises(DataError, match=r"center_crop 100x40 does not fit the images \(.* is 64x48.*at most 64x48"):
        loaders(demo_data, center_crop="100x40")


def test_publish_refuses_a_center_crop_larger_than_local_images_and_warns_without_them(
    redis_url, connection, tmp_path, demo_data
):
    env = isolated_env(redis_url, tmp_path / "home")
    refused = run_cli("publish", "--data-dir", str(demo_data / "train"), "--center-crop", "500x500", env=env)
    assert refused.returncode == 2 and "center_crop 500x500 does not fit the images" in refused.stderr
    assert not connection.keys("rq:job:*")
    elsewhere = run_cli("publish", "--data-dir", "/data/elsewhere", "--center-crop", "500x500", "--dry-run", env=env)
    assert (
        elsewhere.returncode == 0 and "center_crop 500x500 is not checked against the images here" in elsewhere.stderr
    )


# --- doctor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(REASONS))
def test_doctor_decodes_every_image_and_names_the_bad_one(demo_data, tmp_path, kind):
    data, broken = dataset_with(demo_data, tmp_path / "data", kind)
    env = isolated_env("redis://127.0.0.1:1/0", tmp_path / "home")
    result = run_cli("runyard", "doctor", "--data-dir", str(data / "train"), "--json", env=env)
    assert result.returncode == 1
    [check] = [check for check in json.loads(result.stdout)["checks"] if check["name"] == "data"]
    assert check["status"] == "fail" and check["data"]["decoded"] == 252
    assert list(check["data"]["unreadable"]) == [str(broken)]
    assert str(broken) in check["detail"] and "bad_images: skip" in check["detail"]


def test_doctor_sample_decodes_only_that_many(demo_data, tmp_path):
    env = isolated_env("redis://127.0.0.1:1/0", tmp_path / "home")
    result = run_cli("runyard", "doctor", "--data-dir", str(demo_data / "train"), "--sample", "10", "--json", env=env)
    [check] = [check for check in json.loads(result.stdout)["checks"] if check["name"] == "data"]
    assert check["status"] == "ok" and check["data"]["decoded"] == 10 and "(--sample 10)" in check["detail"]


# --- through a real worker: data_error, not retried; skip trains and counts ----------------------


@pytest.fixture(scope="module")
def worker_jobs(redis_server, demo_data, tmp_path_factory) -> dict[str, Job]:
    """A real `worker --cpu --burst` on two jobs over one dataset with a truncated JPEG (memory cache)."""
    from publisher.queue import publish_experiment

    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    root = tmp_path_factory.mktemp("corrupt")
    data, broken = dataset_with(demo_data, root / "data", "truncated", stem="normal")
    home = root / "home"
    env = isolated_env(redis_server, home)
    jobs = {}
    for name, bad_images in (("fail", "fail"), ("skip", "skip")):
        spec = load_spec(tiny_spec(data, image_cache="memory", run_name=name, bad_images=bad_images, pictures=False))
        jobs[name] = publish_experiment(connection, spec, retries=2)
    worker = subprocess.Popen(
        [str(BIN / "worker"), "--cpu", "--burst"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output = worker.communicate(timeout=240)[0]
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    for job in jobs.values():
        job.refresh()
    jobs["broken"] = broken
    jobs["output"] = output
    return jobs


@pytest.mark.slow
def test_a_truncated_jpeg_with_the_memory_cache_fails_as_data_error_before_training(worker_jobs):
    job = worker_jobs["fail"]
    assert job.get_status() == JobStatus.FAILED and job.meta["failure_reason"] == "data_error"
    assert job.retries_left == 0  # a broken file does not mend by retrying
    message = job.meta["failure_message"]
    assert f"{worker_jobs['broken']}: cannot decode this image (Image is incomplete or truncated)" in message
    assert "bad_images: skip" in message and "Traceback" not in message
    assert not job.meta.get("history")  # found while filling the cache, before epoch 1


@pytest.mark.slow
def test_bad_images_skip_trains_without_the_file_and_counts_it_in_the_result(worker_jobs):
    job = worker_jobs["skip"]
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert result["images"]["skipped"] == 1 and result["skipped_images"] == [str(worker_jobs["broken"])]
    assert result["images"]["train"] + result["images"]["val"] == 251
    assert f"bad_images: skip: skipping {worker_jobs['broken']}" in worker_jobs["output"]


# --- infer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("infer-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("RUNYARD_HOME", str(home))
    patch.setenv("WANDB_MODE", "disabled")
    try:
        from trainer.train import train

        quick = {"run_name": "one", "pictures": False, "num_workers": 0, "resize": "32x24"}
        result = train(load_spec(tiny_spec(demo_data, **quick)))
    finally:
        patch.undo()
    return Path(result["run_dir"])


def infer(*args: str, home: Path):
    """`runyard infer` in this process (torch is imported already; a subprocess pays for it again)."""
    from click.testing import CliRunner

    from runyard.cli.infer import infer_command

    return CliRunner().invoke(infer_command, list(args), env={"RUNYARD_HOME": str(home)})


def test_infer_on_an_empty_eval_image_names_the_file_without_a_traceback(trained_run, demo_data, tmp_path):
    eval_dir = tmp_path / "eval"
    shutil.copytree(demo_data / "eval", eval_dir)
    broken = corrupt(sorted((eval_dir / "images").iterdir())[2], "empty")
    result = infer(str(trained_run), "--eval-dir", str(eval_dir), "-o", str(tmp_path / "s.csv"), home=tmp_path)
    assert result.exit_code == 2 and f"error: {broken}: cannot decode this image" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "s.csv").exists()
    assert "did not finish" not in result.stderr  # a finished run: no warning


def test_infer_from_a_run_that_did_not_finish_warns(trained_run, demo_data, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run, unfinished)
    (unfinished / "result.json").unlink()
    result = infer(str(unfinished), "--eval-dir", str(demo_data / "eval"), "-o", str(tmp_path / "s.csv"), home=tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning: run unfinished did not finish (no result.json)" in result.stderr


# --- resume ----------------------------------------------------------------------------------------


def test_a_resume_that_falls_back_to_epoch_0_says_why_in_the_log(connection, caplog):
    from rq import Queue

    from trainer.interrupt import ResumeInfo
    from worker.jobs import JobProgress

    job = Queue("default", connection=connection, serializer=JSONSerializer).enqueue_call("math.sqrt", args=(4,))
    job.meta["history"] = [{"epoch": 1}, {"epoch": 2}]
    job.save_meta()
    with caplog.at_level(logging.WARNING, logger="runyard.jobs"):
        JobProgress(job).on_resume(ResumeInfo())
    assert f"job {job.id}: restarted from epoch 0" in caplog.text
    assert "the checkpoint of epoch 2 is not reachable here" in caplog.text
    assert job.meta["resume_note"] in caplog.text
