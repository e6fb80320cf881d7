"""The queue on the device: a real worker, a real out-of-memory, NVML politeness."""

from __future__ import annotations

from typing import Any

from gpucheck.context import Context, tiny_spec
from gpucheck.processes import WorkerRun

KEEP_FREE_GIB = 6  # what the oom section's ballast leaves of the GPU: efficientnet_b2 at batch 256 needs more


def check_worker(ctx: Context) -> dict[str, Any]:
    """A published job, run to finished by `worker --gpus 0 --burst` on the embedded Redis."""
    with WorkerRun(ctx, "worker") as run:
        job_id = run.publish(tiny_spec(ctx, "worker-job"))
        run.start_worker()
        status, result, waited = run.wait_finished(job_id, timeout=120)
    passed = status == "finished" and result is not None and result.get("device", "").startswith(ctx.device)
    return {
        "passed": passed,
        "detail": "" if passed else f"job {status}; result device {result and result.get('device')}",
        "headline": f"job {status} in {waited:.0f} s on {result and result.get('device')}",
        "figures": {"status": status, "seconds": round(waited, 1), "device": result and result.get("device")},
    }


def check_oom(ctx: Context) -> dict[str, Any]:
    """A real CUDA out-of-memory: a ballast process leaves KEEP_FREE_GIB; the job must halve its batch."""
    if ctx.cuda:
        spec = tiny_spec(
            ctx,
            "oom-job",
            model="efficientnet_b2",
            resize=(260, 260),
            batch_size=256,
            valid_batch_size=256,
            augmentation="base",
        )
        env, how = {}, f"another process holds all but {KEEP_FREE_GIB} GiB"
    else:  # the CPU cannot run out of GPU memory: the fault hook walks the same path
        spec = tiny_spec(ctx, "oom-job", batch_size=32, min_batch_size=4)
        env, how = {"RUNYARD_FAULT_OOM_ABOVE_BATCH": "8"}, "fault hook (CPU developer mode)"
    with WorkerRun(ctx, "oom", extra_env=env) as run:
        if ctx.cuda:
            run.hold_gpu_memory(keep_free_gib=KEEP_FREE_GIB)
        job_id = run.publish(spec)
        run.start_worker("--gpu-busy-above", "1")  # the ballast is the point here, not a colleague
        status, result, waited = run.wait_finished(job_id, timeout=150)
    adjustments = (result or {}).get("oom_adjustments", [])
    passed = status == "finished" and bool(adjustments)
    final = f"batch {result.get('batch_size')} x {result.get('grad_accum_steps')} accumulated" if result else ""
    return {
        "passed": passed,
        "detail": "" if passed else f"job {status}, {len(adjustments)} adjustments",
        "headline": f"{how}: job {status}, {len(adjustments)} halvings, {final}",
        "figures": {"status": status, "seconds": round(waited, 1), "oom_adjustments": adjustments, "how": how},
    }


def nvml_view(index: int = 0) -> dict[str, Any]:
    """NVML's answers for GPU `index`: memory in GiB and the compute processes it lists."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    return {
        "total_gib": round(memory.total / 2**30, 1),
        "used_gib": round(memory.used / 2**30, 1),
        "processes": [
            {
                "pid": process.pid,
                "gib": None if process.usedGpuMemory is None else round(process.usedGpuMemory / 2**30, 1),
            }
            for process in processes
        ],
    }


def check_nvml(ctx: Context) -> dict[str, Any]:
    """Another process holds 40% of the GPU: the worker waits, says why, and runs the job once released."""
    with WorkerRun(ctx, "nvml", extra_env={"RUNYARD_GPU_POLL_SECONDS": "2"}) as run:
        holder = run.hold_gpu_memory(fraction=0.4)
        seen = nvml_view()  # what the worker's check will be told: a container may hide processes
        job_id = run.publish(tiny_spec(ctx, "nvml-job"))
        run.start_worker()
        reason = run.wait_for_heartbeat("gpu_wait", timeout=40)
        status_while_held = run.job_status(job_id)
        holder.kill()
        holder.wait()
        status, _, after_release = run.wait_finished(job_id, timeout=90)
    passed = bool(reason) and status_while_held == "queued" and status == "finished"
    return {
        "passed": passed,
        "detail": "" if passed else f"wait reason {reason!r}, job {status_while_held} while held, then {status}",
        "headline": f"waited ({reason or 'no reason given'}); released: job {status}",
        "figures": {
            "gpu_wait": reason,
            "status_while_held": status_while_held,
            "status": status,
            "seconds_after_release": round(after_release, 1),
            "nvml_while_held": seen,
        },
    }
