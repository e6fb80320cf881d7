"""scripts/gpu_check.py, the GPU day's one command, in the modes that run without a GPU.

Without CUDA it must skip in one line and exit 0 (CI runs it so); bad arguments exit 2 naming the
input; the summary it ends with is one JSON object and a table; and the CPU developer mode runs a
section through the same parent -> child -> summary path a GPU run takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a CI box that has one
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_without_cuda_it_prints_one_line_saying_it_skipped_and_why_and_exits_0():
    answer = run_script()
    assert answer.returncode == 0, answer.stderr
    [line] = answer.stdout.splitlines()
    assert line.startswith("gpu_check: skipped: no CUDA device visible (torch ")
    assert "CUDA_VISIBLE_DEVICES=''" in line


def test_without_cuda_the_json_mode_skips_in_one_json_line(gpu_check, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(["--json", "--out", str(tmp_path / "out")]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["skipped"].startswith("no CUDA device visible")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(line)  # for the copy back


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sections", "augment,warp"], "--sections 'augment,warp': unknown warp; choose from augment, resume"),
        (["--sections", ","], "--sections ',': unknown empty list"),
        (["--budget", "compile=soon"], "--budget 'compile=soon': give SECTION=SECONDS"),
        (["--budget", "warp=10"], "--budget 'warp=10': no section 'warp'"),
        (["--budget", "amp=-1"], "--budget 'amp=-1': seconds must be positive"),
        (["--time-limit", "0"], "--time-limit must be positive"),
        (["--quick"], "--quick is the CPU developer mode: use it with --device cpu"),
        (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: not a folder"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_a_bad_argument_exits_2_with_a_message_naming_it(gpu_check, capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(args)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_an_out_path_that_is_a_file_is_refused(gpu_check, capsys, tmp_path):
    existing = tmp_path / "summary.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--out", str(existing)])
    assert stopped.value.code == 2
    assert f"--out {existing}: exists and is not a folder" in capsys.readouterr().err


def fake_records() -> list[dict]:
    return [
        {
            "name": "augment",
            "question": "device augmentation == CPU recipe",
            "status": "pass",
            "seconds": 4.2,
            "budget_s": 30,
            "headline": "max |cpu - cuda| 3.0e-07",
            "detail": "",
            "figures": {"recipe_without_noise_max_abs_diff": 3e-07},
        },
        {
            "name": "throughput",
            "question": "trainer >= 0.9 x model-bound",
            "status": "fail",
            "seconds": 88.0,
            "budget_s": 130,
            "headline": "model-bound 2000 img/s, trainer 1500",
            "detail": "trainer/model-bound 0.750 < 0.9",
        },
        {
            "name": "compile",
            "question": "torch.compile off vs on",
            "status": "skipped",
            "seconds": 0.0,
            "budget_s": 0,
            "headline": "",
            "detail": "out of time (3 s of --time-limit 450 left)",
        },
    ]


def test_the_summary_is_one_json_object_counting_statuses_and_not_ok_when_a_section_fails(gpu_check):
    machine = {"gpu": "NVIDIA H200", "torch": "2.14.1", "cpu_cores": 16}
    summary = gpu_check.build_summary(fake_records(), machine, "cuda", 97.3, {"missing": []})
    assert json.loads(json.dumps(summary)) == summary
    assert summary["counts"] == {"pass": 1, "fail": 1, "skipped": 1}
    assert summary["ok"] is False
    assert [row["name"] for row in summary["sections"]] == ["augment", "throughput", "compile"]
    assert summary["machine"]["gpu"] == "NVIDIA H200" and summary["seconds"] == 97.3

    passing = [record for record in fake_records() if record["status"] != "fail"]
    assert gpu_check.build_summary(passing, machine, "cuda", 5.0, {})["ok"] is True  # a skip is not a failure


def test_the_table_has_a_row_per_section_with_its_figures_and_why_it_failed(gpu_check):
    summary = gpu_check.build_summary(fake_records(), {"gpu": "NVIDIA H200", "torch": "2.14.1"}, "cuda", 97.3, {})
    lines = gpu_check.format_table(summary).splitlines()
    assert lines[0].startswith("runyard gpu_check on NVIDIA H200 (cuda), torch 2.14.1")
    rows = {line.split()[0]: line for line in lines[2:-1] if not line.startswith(" ")}
    assert rows.keys() == {"augment", "throughput", "compile"}
    assert rows["throughput"].split()[1:3] == ["fail", "88.0"] and "model-bound 2000 img/s" in rows["throughput"]
    assert "-> trainer/model-bound 0.750 < 0.9" in lines[lines.index(rows["throughput"]) + 1]
    assert lines[-1] == "1 fail, 1 pass, 1 skipped; 97 s in all; NOT OK"


@pytest.mark.slow
def test_the_cpu_developer_mode_runs_a_section_in_a_child_and_writes_the_summary(
    gpu_check, capsys, demo_data, tmp_path
):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--quick", "--sections", "augment,nvml", "--data-dir", str(demo_data), "--out", str(out)]
    assert gpu_check.main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])  # the table, then one line of JSON
    assert summary == json.loads((out / "summary.json").read_text())
    augment, nvml = summary["sections"]
    assert augment["status"] == "pass", augment
    assert augment["figures"]["same_draws_for_the_same_seed"] is True
    assert augment["figures"]["recipe_without_noise_max_abs_diff"] == 0.0  # the CPU against itself
    assert (nvml["status"], nvml["detail"]) == ("skipped", "needs a GPU and NVML")
    assert "augment     pass" in (out / "summary.txt").read_text()
    assert "Traceback" not in (out / "logs" / "augment.log").read_text()


def test_a_section_past_its_budget_is_stopped_and_recorded_as_a_timeout(gpu_check, demo_data, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (out / "logs").mkdir(parents=True)
    ctx = gpu_check.Context("cpu", True, demo_data, work)
    section = gpu_check.SECTIONS["resume"][0]
    record = gpu_check.run_section(section, ctx, 1.0, out)  # importing torch alone takes longer
    assert (record["name"], record["status"], record["budget_s"]) == ("resume", "timeout", 1)
    assert record["detail"] == "stopped after its budget of 1 s"
    assert record["seconds"] < 10
    from gpucheck.processes import descendants

    def command_line(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:  # it has just exited
            return ""

    assert not [pid for pid in descendants(os.getpid()) if "--section" in command_line(pid)]  # the section is gone
