"""The prepared GPU check (issue 17): everything only a GPU can show, in one command and one markdown report.

    python scripts/gpu_check.py --out gpu_check.md            # one H100 / H200, at most --budget (480) seconds
    python scripts/gpu_check.py --smoke --out /tmp/check.md   # the same code paths on the CPU, tiny sizes

Sections (docs/gpu_check.md says what each shows and the goals it is judged against):
  a. ``omnimae-cli fit`` on the demo data, bf16-mixed + compile, ~50 steps of both modalities
  b. configs/trainer/fsdp.yaml (FSDP1) and fsdp2.yaml with ViT-H on one device: peak memory, step time
  c. model-only samples/s and MFU, ViT-B / L / H, eager and compiled, decoder head padding, CUDA graphs
  d. end-to-end ViT-B against model-only: worker-side augmentation, device-side augmentation and device-side
     augmentation with the JPEGs decoded on the device (each where the datamodule has the option)
  e. DDP on one process: the probe-touch fix against ``find_unused_parameters=True``, steps/s
  f. the ViT-H compile, in its own process; a crash is recorded with its first error line

Each section runs in its own subprocess under a timeout (its share of ``--budget``), so a crash or a hang costs
that section only; every command it ran, with its log, is kept under ``--workdir``. Fits are timed by
``StepTimer`` (below), a callback the fits load from this file (``gpu_check.StepTimer``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
TITLES = {
    "a": "fit on the demo data, bf16-mixed + compile",
    "b": "FSDP1 and FSDP2 with ViT-H on one device",
    "c": "model-only samples/s and MFU: ViT-B / L / H, eager and compiled, head padding, CUDA graphs",
    "d": "end to end ViT-B against model-only",
    "e": "DDP: the probe-touch fix against find_unused_parameters=True",
    "f": "the ViT-H compile",
}
# most wanted first, what a short budget leaves out last: the MFU and end-to-end goals (c, d), the user's own
# fit (a), FSDP (b), the ViT-H compile (f), issue 16's DDP figure (e)
RUN_ORDER = "cdabfe"
# (GPU, smoke): the smoke's sections share two loaded cores side by side, so its caps only catch hangs; d runs
# three compiled benches after waiting for c, and its worker run timed out under a 240 s cap on a busy machine
CAPS = {"a": (90, 240), "b": (150, 240), "c": (270, 240), "d": (120, 330), "e": (90, 240), "f": (110, 240)}
MFU_GOAL = {"base": 0.40, "large": 0.45, "huge": 0.50}
E2E_GOAL = 0.90  # end-to-end ViT-B samples/s over model-only at the same mix
COMPILE_GOAL = 1.15  # ViT-L video compiled over eager
TINY_MODEL = "embed_dim=64,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,decoder_num_heads=4"


def _step_timer_class():
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """Each training step's start and end (the device synchronised at the end), its modality and MAE loss
        (``train/loss``) and the peak device memory, written as JSON to ``out`` when the fit ends."""

        def __init__(self, out: str) -> None:
            self.out, self.steps, self._start = out, [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            end = time.perf_counter()
            loss = trainer.callback_metrics.get("train/loss")
            self.steps.append({"modality": batch["modality"], "start": self._start, "end": end,
                               "loss": None if loss is None else float(loss)})

        def on_fit_end(self, trainer, pl_module) -> None:
            import torch

            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            Path(self.out).write_text(json.dumps({"steps": self.steps, "peak_mem_gib": peak}))

    StepTimer.__module__ = __name__
    return StepTimer


def __getattr__(name: str):
    # ``gpu_check.StepTimer`` for the fits' configs, built on first use: the check's own processes never
    # import Lightning for it
    if name == "StepTimer":
        globals()[name] = _step_timer_class()
        return globals()[name]
    raise AttributeError(name)


# -- the run of one command, and what the report says about it -------------------------------------------------


class Section:
    """What one section ran and found; saved to ``path`` after every command, so a timeout keeps the rest."""

    def __init__(self, key: str, ctx: dict) -> None:
        self.key, self.ctx = key, ctx
        self.work = Path(ctx["workdir"])
        self.path = self.work / f"section_{key}.json"
        self.data = {"status": "ran", "reason": "", "commands": [], "configs": [], "lines": [], "goals": []}

    @property
    def smoke(self) -> bool:
        return self.ctx["smoke"]

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))

    def line(self, text: str) -> None:
        self.data["lines"].append(text)
        self.save()

    def goal(self, name: str, value: str, ok: bool | None, speed: bool = False) -> None:
        """A goal and whether it is met; a speed goal is not judged in the smoke (None)."""
        self.data["goals"].append([name, value, None if speed and self.smoke else ok])
        self.save()

    def run(self, name: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``argv`` (logged to ``<workdir>/logs/<name>.log``); (exit code, its output). A timeout is 124."""
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.data["commands"].append((shown + " " if shown else "") + shlex.join(argv))
        self.save()
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get(
            "PYTHONPATH")])), **(env or {})}
        with log.open("w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)
            rc = wait_or_kill(proc, timeout)
        return rc, log.read_text(errors="replace")


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code, or 124 after killing the process and everything it started (its loader workers, its
    compile workers) once ``timeout`` has passed."""
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def first_error_line(text: str) -> str:
    """The first line that names an error (an exception, a CUDA error, omnimae-cli's one-line error)."""
    for line in text.splitlines():
        if re.match(r"^\s*([\w.]+(Error|Exception)\b|omnimae-cli: error|CUDA error)", line):
            return line.strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def fail(section: Section, what: str, rc: int, text: str) -> None:
    reason = f"timed out ({what})" if rc == 124 else f"{what} exited {rc}: {first_error_line(text)}"
    section.data.update(status="failed", reason=reason)
    section.save()


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _pct(mfu: float | None) -> str:
    return fmt(None if mfu is None else mfu * 100, ".1f", " %")


# -- fits (a, b, e) -----------------------------------------------------------------------------------------


def demo_sources(ctx: dict) -> list[dict]:
    root = Path(ctx["demo_root"])
    return [
        {"name": "imagenet_demo", "kind": "imagenet", "root": str(root / "imagenet"), "val_split": "val",
         "weight": 1.0},
        {"name": "ssv2_demo", "kind": "ssv2", "root": str(root / "ssv2" / "videos"),
         "annotations": str(root / "ssv2"), "val_split": "validation", "weight": 1.0},
    ]


def fit_overlay(section: Section, name: str, model: dict, data: dict, trainer: dict) -> tuple[Path, Path]:
    """A config (written as YAML-compatible JSON) laid over configs/demo.yaml: the demo data built here, the sizes
    given (not the config's), no validation, checkpoint or logger, and the step timer."""
    steps = section.work / f"{name}_steps.json"
    cfg = {
        "model": {"init_args": model},
        "data": {"init_args": {"sources": demo_sources(section.ctx), "val_samples": 8, **data}},
        "trainer": {"limit_val_batches": 0, "enable_checkpointing": False, "logger": False, "max_epochs": 1000,
                    "callbacks": [{"class_path": "gpu_check.StepTimer", "init_args": {"out": str(steps)}}],
                    **trainer},
    }
    path = section.work / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    section.data["configs"].append(f"{path.name}: {json.dumps(cfg)}")
    section.save()
    return path, steps


def demo_fit_sizes(ctx: dict) -> tuple[dict, dict]:
    """(model, data) arguments of the demo-sized fits (a, e)."""
    if ctx["smoke"]:
        model = {"size": "tiny", "model_overrides": dict(kv.split("=") for kv in TINY_MODEL.split(","))}
        model["model_overrides"] = {k: int(v) for k, v in model["model_overrides"].items()}
        data = {"img_size": 32, "num_frames": 4, "short_side": 36, "image_batch_size": 8, "video_batch_size": 8}
    else:
        model = {"size": "tiny", "model_overrides": {"depth": 4}}
        data = {"img_size": 64, "num_frames": 8, "short_side": 72, "image_batch_size": 64, "video_batch_size": 32}
    data.update(patch_size=[2, 8, 8], replicas=4, clip_duration=2.7, num_workers=ctx["workers"],
                pin_memory=not ctx["smoke"], image_masking={"mask_type": "random", "ratio": 0.75},
                video_masking={"mask_type": "random", "ratio": 0.9})
    return model, data


def trainer_config(ctx: dict, name: str) -> list[str]:
    """configs/trainer/<name>.yaml on one device; the smoke runs single_gpu as cpu.yaml and the others on the CPU."""
    if ctx["smoke"] and name == "single_gpu":
        return ["--config", "configs/trainer/cpu.yaml"]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"] if ctx["smoke"] else []
    return ["--config", f"configs/trainer/{name}.yaml", "--trainer.devices", "1", *cpu]


def step_figures(path: Path, skip: int) -> dict | None:
    """Median step (device synchronised) and cycle (step + waiting for data) after ``skip`` warm-up steps."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    steps = rec["steps"]
    kept = steps[skip:] if len(steps) > skip + 1 else steps
    cycles = [b["start"] - a["start"] for a, b in zip(kept, kept[1:])]
    losses = {m: next((st["loss"] for st in reversed(steps) if st["modality"] == m and st["loss"] is not None), None)
              for m in ("image", "video")}
    out = {"steps": len(steps), "losses": {m: v for m, v in losses.items() if v is not None},
           "peak_mem_gib": rec["peak_mem_gib"], "skipped": len(steps) - len(kept),
           "modalities": {m: sum(s["modality"] == m for s in steps) for m in ("image", "video")},
           "step_ms": statistics.median(s["end"] - s["start"] for s in kept) * 1e3,
           "steps_per_s": 1.0 / statistics.median(cycles) if cycles else None}
    for m in ("image", "video"):
        own = [s["end"] - s["start"] for s in kept if s["modality"] == m]
        out[f"step_ms_{m}"] = statistics.median(own) * 1e3 if own else None
    return out


def _losses(fig: dict) -> str:
    return ", ".join(f"{m} {v:.4f}" for m, v in fig["losses"].items()) or "none logged"


def fit_command(ctx: dict, configs: list[str], launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [ctx["python"], "-m", "omnimae_pl"]), "fit", "--config", "configs/demo.yaml", *configs]


def section_a(s: Section) -> None:
    model, data = demo_fit_sizes(s.ctx)
    model["compile"] = not s.smoke  # Inductor on a CPU compiles for minutes: the smoke runs eager
    steps = 6 if s.smoke else 50
    overlay, timer = fit_overlay(s, "a_fit", model, data, {"max_steps": steps, "log_every_n_steps": 5})
    cmd = fit_command(s.ctx, [*trainer_config(s.ctx, "single_gpu"), "--config", str(overlay)])
    rc, text = s.run("a_fit", cmd, s.ctx["timeout"] - 5)
    fig = step_figures(timer, skip=1 if s.smoke else 10)
    if rc != 0 or fig is None:
        return fail(s, "fit", rc, text)
    finite = len(fig["losses"]) == 2 and all(math.isfinite(v) for v in fig["losses"].values())
    both = all(fig["modalities"].values())
    s.line(f"{fig['steps']} steps ({fig['modalities']['image']} image, {fig['modalities']['video']} video), "
           f"{fmt(fig['steps_per_s'], '.2f')} steps/s after the first {fig['skipped']} (compile warm-up), median step "
           f"{fmt(fig['step_ms_image'])} ms image / {fmt(fig['step_ms_video'])} ms video, peak memory "
           f"{fmt(fig['peak_mem_gib'], '.2f', ' GiB')}; last MAE loss per modality {_losses(fig)}")
    ok = fig["steps"] == steps and finite and both
    s.goal("ran every step, both modalities, final losses finite", f"{fig['steps']} / {steps} steps", ok)
    s.data["status"] = "pass" if ok else "fail"


def section_b(s: Section) -> None:
    if s.smoke:
        s.data.update(status="skipped", reason="FSDP1 refuses the CPU (tests/test_fsdp1.py checks its config and wrap "
                      "policy); FSDP2 on CPU processes is tests/test_distributed.py's equality test")
        return s.save()
    model = {"size": "huge", "model_overrides": {}, "compile": False}
    data = {"img_size": 224, "num_frames": 16, "short_side": 256, "patch_size": [2, 14, 14], "replicas": 4,
            "image_batch_size": 64, "video_batch_size": 16, "num_workers": s.ctx["workers"], "clip_duration": 2.7,
            "image_masking": {"mask_type": "random", "ratio": 0.9}, "video_masking": {"mask_type": "random",
                                                                                       "ratio": 0.95}}
    s.line("| strategy | steps (image / video) | median step image / video | peak memory | last losses |")
    s.line("| --- | --- | --- | --- | --- |")
    ok_all = True
    for name in ("fsdp", "fsdp2"):
        overlay, timer = fit_overlay(s, f"b_{name}", model, data, {"max_steps": 8})
        cmd = fit_command(s.ctx, [*trainer_config(s.ctx, name), "--config", str(overlay)])
        rc, text = s.run(f"b_{name}", cmd, s.ctx["timeout"] / 2 - 5)
        fig = step_figures(timer, skip=2)
        if rc != 0 or fig is None:
            s.line(f"| {name} | failed: {first_error_line(text) if rc != 124 else 'timed out'} | | | |")
            ok_all = False
            continue
        s.line(f"| {name} | {fig['modalities']['image']} / {fig['modalities']['video']} | "
               f"{fmt(fig['step_ms_image'])} / {fmt(fig['step_ms_video'])} ms | "
               f"{fmt(fig['peak_mem_gib'], '.1f', ' GiB')} | {_losses(fig)} |")
    s.goal("FSDP1 and FSDP2 run ViT-H on one device", "both ran" if ok_all else "see the table", ok_all)
    s.data["status"] = "pass" if ok_all else "fail"


def section_e(s: Section) -> None:
    model, data = demo_fit_sizes(s.ctx)
    steps = 8 if s.smoke else 120
    variants = {  # name: (extra arguments, launcher)
        "shipped (probes touched, find_unused_parameters=False)": ("e_shipped", [], None),
        "find_unused_parameters=True, probes not touched": (
            "e_find_unused", ["--trainer.strategy", "ddp_find_unused_parameters_true"],
            [s.ctx["python"], str(Path(__file__).resolve()), "--untouched-probes"]),
    }
    s.line("| DDP on 1 process | steps/s (with data waits) | median step (device synchronised) |")
    s.line("| --- | --- | --- |")
    results = {}
    for label, (name, extra, launcher) in variants.items():
        overlay, timer = fit_overlay(s, name, model, data, {"max_steps": steps})
        cmd = fit_command(s.ctx, [*trainer_config(s.ctx, "ddp"), "--config", str(overlay), *extra], launcher)
        rc, text = s.run(name, cmd, s.ctx["timeout"] / 2 - 5)
        fig = step_figures(timer, skip=2 if s.smoke else 20)
        if rc != 0 or fig is None:
            return fail(s, name, rc, text)
        results[name] = fig
        s.line(f"| {label} | {fmt(fig['steps_per_s'], '.2f')} | {fig['step_ms']:.2f} ms |")
    cost = results["e_find_unused"]["step_ms"] / results["e_shipped"]["step_ms"]
    s.line(f"find_unused_parameters=True takes {cost:.3f}x the shipped step time (demo model, "
           f"{model['size']} {model['model_overrides']}, {steps} steps, the first ones left out).")


# -- benchmarks (c, d, f) ---------------------------------------------------------------------------------


def bench_command(s: Section, name: str, size: str, extra: list[str]) -> tuple[list[str], Path]:
    out = s.work / f"{name}.json"
    if s.smoke:
        base = ["--device", "cpu", "--size", "tiny", "--model-overrides", TINY_MODEL, "--img-size", "32",
                "--num-frames", "4", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                "--compile-backend", "aot_eager"]
    else:
        base = ["--size", size, "--steps", "10", "--repeats", "2", "--warmup", "3"]
    return [s.ctx["python"], "-m", "omnimae_pl", "bench", *base, *extra, "--json", str(out)], out


def run_bench(s: Section, name: str, size: str, extra: list[str], timeout: float) -> dict | None:
    """``omnimae-cli bench``; its JSON, None after a failure."""
    cmd, out = bench_command(s, name, size, extra)
    rc, text = s.run(name, cmd, timeout)
    if rc != 0 or not out.exists():
        s.line(f"- `{name}`: {'timed out' if rc == 124 else 'failed: ' + first_error_line(text)}")
        return None
    return json.loads(out.read_text())


def bench_table(s: Section, label: str, result: dict) -> None:
    for r in result["rows"]:
        if "error" in r:
            s.line(f"| {label} | {r['modality']} | {r['batch']} | {r['compiled'] or 'eager'} | {r['error']} | | |")
            continue
        e2e = " (end to end)" if r["impl"] == "ours-e2e" else ""
        batch = r["batch"] if isinstance(r["batch"], int) else "/".join(str(v) for v in r["batch"].values())
        s.line(f"| {label}{e2e} | {r['modality']} | {batch} | "
               f"{r['compiled'] or 'eager'} | {r['samples_per_s']:.1f} | {_pct(r['mfu'])}"
               f" | {fmt(r['peak_mem_gib'], '.1f')} |")
    if result["info"].get("compile_error"):
        s.line(f"| {label} | compile failed: {result['info']['compile_error'].splitlines()[0][:200]} | | | | | |")


def best(result: dict | None, modality: str, compiled: bool | None = None) -> dict | None:
    rows = [r for r in (result or {}).get("rows", []) if r.get("impl") == "ours" and r["modality"] == modality
            and "error" not in r and (compiled is None or bool(r["compiled"]) == compiled)]
    return max(rows, key=lambda r: r["samples_per_s"]) if rows else None


def section_c(s: Section) -> None:
    """Eager head-padding variants first; the compiled padded run uses the padding that won in eager."""
    ctx = s.ctx
    e2e = ["--end-to-end", "--data-root", ctx["demo_root"], "--workers", str(ctx["workers"])]
    s.line("| run | modality | batch | compiled | samples/s | MFU | peak GiB |")
    s.line("| --- | --- | --- | --- | --- | --- | --- |")
    plan = [("c_base", "base", ["--compile", *e2e]), ("c_base_pad64", "base", ["--decoder-head-pad", "64"])]
    if not s.smoke:  # the smoke runs one of each kind of run
        plan += [("c_base_pad32", "base", ["--decoder-head-pad", "32"]), ("c_large", "large", ["--compile"]),
                 ("c_large_pad64", "large", ["--decoder-head-pad", "64"]), ("c_huge", "huge", []),
                 ("c_huge_pad64", "huge", ["--decoder-head-pad", "64"])]
    results = {}
    deadline = time.monotonic() + ctx["timeout"] - 10
    for name, size, extra in plan:
        left = deadline - time.monotonic()
        if left < 20:
            s.line(f"- `{name}`: not run, the section's time was spent")
            continue
        results[name] = run_bench(s, name, size, extra, left)
        if results[name]:
            bench_table(s, name, results[name])
    pad = _winning_pad(s, results)
    # CUDA graphs on image steps, the shortest (most launch-bound) ones
    later = [("c_base_pad_compiled", ["--decoder-head-pad", str(pad)] if pad else None),
             ("c_base_cudagraphs", ["--modality", "image", "--compile-mode", "reduce-overhead"])]
    for name, extra in later:
        left = deadline - time.monotonic()
        why = ("no padding beat the unpadded eager step" if extra is None else
               "the section's time was spent" if left < 20 else
               "the smoke's CPU timings pick no padding" if s.smoke and name == "c_base_pad_compiled" else None)
        if why:
            s.line(f"- `{name}`: not run, {why}")
            continue
        results[name] = run_bench(s, name, "base", ["--compile", "--no-eager", *extra], left)
        if results[name]:
            bench_table(s, name, results[name])
    partial = s.work / "c_results.json.partial"  # renamed when complete: section d may be waiting for it
    partial.write_text(json.dumps({k: v for k, v in results.items() if v}, default=str))
    partial.rename(s.work / "c_results.json")
    _c_goals(s, results)


def _winning_pad(s: Section, results: dict) -> int | None:
    """The padding whose eager ViT-B runs were fastest summed over the modalities, if it beat no padding by 2 %."""
    def total(result):
        rows = [best(result, m, compiled=False) for m in ("image", "video")]
        return sum(1.0 / r["samples_per_s"] for r in rows) if all(rows) else None  # seconds per image + video
    plain = total(results.get("c_base"))
    times = {pad: total(results.get(f"c_base_pad{pad}")) for pad in (32, 64)}
    times = {p: t for p, t in times.items() if t is not None}
    if plain is None or not times:
        return None
    pad = min(times, key=times.get)
    s.line("Eager ViT-B, seconds per (image + video) sample relative to no padding: "
           + ", ".join(f"pad {p}: {t / plain:.3f}" for p, t in times.items()))
    return pad if times[pad] < 0.98 * plain else None


def _c_goals(s: Section, results: dict) -> None:
    for size, runs in (("base", ("c_base", "c_base_pad_compiled", "c_base_cudagraphs")), ("large", ("c_large",)),
                       ("huge", ("c_huge", "c_huge_pad64"))):
        for m in ("image", "video"):
            rows = [r for r in (best(results.get(n), m) for n in runs) if r]
            if not rows:
                continue
            top = max(rows, key=lambda r: r["mfu"] or 0)
            mfu = top["mfu"]
            s.goal(f"MFU ViT-{size[0].upper()} {m} >= {MFU_GOAL[size]:.0%}",
                   "n/a (no peak known for this device)" if mfu is None else
                   f"{mfu:.1%} ({top['compiled'] or 'eager'})",
                   None if mfu is None else mfu >= MFU_GOAL[size], speed=True)
    large = results.get("c_large")
    eager, compiled = best(large, "video", False), best(large, "video", True)
    if eager and compiled:
        ratio = compiled["samples_per_s"] / eager["samples_per_s"]
        s.goal(f"ViT-L video compiled >= {COMPILE_GOAL}x eager", f"{ratio:.2f}x", ratio >= COMPILE_GOAL, speed=True)
    judge(s)


def e2e_fraction(result: dict) -> tuple[dict, float] | None:
    """(the end-to-end row, its samples/s over the model-only rate at the same samples per modality)."""
    rows = [r for r in result["rows"] if r["impl"] == "ours-e2e"]
    if not rows:
        return None
    e2e = rows[0]
    model_only = 0.0
    for m, n in e2e["samples"].items():
        ref = best(result, m, compiled=bool(e2e["compiled"]))
        if n and ref is None:
            return None
        model_only += n / ref["samples_per_s"] if n else 0.0
    return e2e, model_only * e2e["samples_per_s"] / sum(e2e["samples"].values())


def _section_ended(work: Path, key: str) -> bool:
    try:
        return "wall_s" in json.loads((work / f"section_{key}.json").read_text())
    except (OSError, ValueError):  # not started yet, or being written
        return False


def section_d(s: Section) -> None:
    end = time.monotonic() + s.ctx["timeout"] - 10
    e2e = ["--end-to-end", "--data-root", s.ctx["demo_root"], "--workers", str(s.ctx["workers"])]
    device = ["--compile", "--no-eager", *e2e, "--augment-on", "device"]
    variants = [  # (label, run, bench arguments)
        ("worker", "c_base", None),
        ("device", "d_base_device", device),
        ("device, image_decode device", "d_base_jpeg", [*device, "--image-decode", "device"]),
    ]
    s.line(f"{s.ctx['workers']} loader workers per source, {s.ctx['cpus']} CPU cores.")
    reused = s.work / "c_results.json"
    # side by side (the smoke), section c may still be running: its ViT-B run is the worker-side row
    deadline = time.monotonic() + s.ctx["timeout"] / 2
    while (s.smoke and "c" in s.ctx["keys"] and not reused.exists() and not _section_ended(s.work, "c")
           and time.monotonic() < deadline):
        time.sleep(1)
    results = {}
    saved = json.loads(reused.read_text()).get("c_base") if reused.exists() else None
    if saved is not None:
        s.line("- worker-side augmentation: the end-to-end row of section c's `c_base` run")
        results["worker"] = saved
    else:
        variants[0] = ("worker", "d_base_worker", ["--compile", *e2e])
    to_run = [v for v in variants if v[0] not in results]
    for k, (augment, name, extra) in enumerate(to_run):  # they share what is left of the section's time
        results[augment] = run_bench(s, name, "base", extra, (end - time.monotonic()) / (len(to_run) - k))
    for augment, *_ in variants:
        result = results[augment]
        got = e2e_fraction(result) if result else None
        if got is None:
            s.goal(f"end to end ({augment}) >= {E2E_GOAL:.0%} of model-only", "not measured", False, speed=True)
            continue
        row, fraction = got
        host = ", ".join(f"{k} {v:.1f}" for k, v in row["host_ms_per_step"].items())
        s.line(f"- augment_on {augment}: {row['samples_per_s']:.1f} samples/s end to end ({row['samples']}), "
               f"{_pct(row['mfu'])} MFU; {fraction:.1%} of model-only at that mix; host ms per step: {host}")
        s.goal(f"end to end ({augment}) >= {E2E_GOAL:.0%} of model-only", f"{fraction:.1%}", fraction >= E2E_GOAL,
               speed=True)
    judge(s)


def judge(s: Section) -> None:
    """pass / fail by the judged goals; ran where none was judged."""
    judged = [g[2] for g in s.data["goals"] if g[2] is not None]
    s.data["status"] = ("pass" if all(judged) else "fail") if judged else "ran"
    s.save()


def section_f(s: Section) -> None:
    """Compiled ViT-H alone; on a failure, once more with the efficient SDPA backend and synchronous launches."""
    attempts = [("f_huge_compile", [], None),
                ("f_huge_compile_efficient", ["--sdpa", "efficient"], {"CUDA_LAUNCH_BLOCKING": "1"})]
    deadline = time.monotonic() + s.ctx["timeout"] - 10
    for name, extra, env in attempts:
        cmd, out = bench_command(s, name, "huge", ["--compile", "--no-eager", *extra])
        rc, text = s.run(name, cmd, max(deadline - time.monotonic(), 1), env)
        info = json.loads(out.read_text())["info"] if rc == 0 and out.exists() else {}
        error = info.get("compile_error") or (None if rc == 0 else
                                             "timed out" if rc == 124 else first_error_line(text))
        if error is None:
            result = json.loads(out.read_text())
            rates = ", ".join(f"{r['modality']} {r['samples_per_s']:.1f} samples/s, MFU "
                              f"{_pct(r['mfu'])}" for r in result["rows"])
            s.line(f"- `{name}`: compiled in {info.get('compile_total_s', 0):.0f} s; {rates}")
            s.goal("ViT-H compiles and runs", name, True)
            s.data["status"] = "pass"
            return s.save()
        s.line(f"- `{name}`: {error.splitlines()[0][:300]}")
        if deadline - time.monotonic() < 30:
            break
    s.goal("ViT-H compiles and runs", "crashed (first error lines above)", False)
    s.data["status"] = "fail"
    s.save()


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f}


# -- the parent: set-up, one subprocess per section, the report ------------------------------------------------


def environment(smoke: bool) -> dict:
    from importlib.metadata import version

    import torch

    cuda = torch.cuda.is_available() and not smoke
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "n/a"
    except (OSError, subprocess.TimeoutExpired):
        commit = "n/a"
    return {"device": torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device used)",
            "torch": torch.__version__, "timm": version("timm"), "lightning": version("lightning"),
            "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit}


def build_demo(ctx: dict, timeout: float) -> tuple[str, float, str | None]:
    """The demo corpus for every section, built once (sizes given here, not the demo config's)."""
    # GPU: enough images for a few batches of 256 per epoch (the bench's end-to-end batch)
    sizes = ["6", "1", "24", "32"] if ctx["smoke"] else ["160", "2", "160", "64"]
    cmd = [ctx["python"], "-m", "omnimae_pl", "demo-data", "--root", ctx["demo_root"], "--train-images-per-class",
           sizes[0], "--val-images-per-class", sizes[1], "--num-videos", sizes[2], "--video-width", sizes[3],
           "--video-height", sizes[3]]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        error = None if proc.returncode == 0 else first_error_line(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        error = "timed out"
    return shlex.join(cmd), time.monotonic() - t0, error


def run_sections(ctx: dict, keys: str, budget: float) -> dict[str, dict]:
    """Each section in its own process under its share of ``budget``, one after the other on a GPU (they time
    it); side by side in the smoke, which times nothing."""
    start, results, running = time.monotonic(), {}, []
    for key in [k for k in RUN_ORDER if k in keys]:
        left = budget - (time.monotonic() - start)
        if too_little_left(key, left, ctx["smoke"]):
            results[key] = {"status": "skipped", "reason": f"the {budget:.0f} s budget was spent; rerun with "
                            f"--only {key}", "commands": [], "lines": [], "goals": [], "wall_s": 0.0}
            continue
        timeout = min(CAPS[key][1 if ctx["smoke"] else 0], left)
        state = Path(ctx["workdir"], f"ctx_{key}.json")
        state.write_text(json.dumps({**ctx, "timeout": timeout}))
        print(f"gpu_check: section {key} ({TITLES[key]}), at most {timeout:.0f} s", flush=True)
        log = Path(ctx["workdir"], f"section_{key}.log").open("w")
        proc = subprocess.Popen([ctx["python"], str(Path(__file__).resolve()), "--section", key, "--state",
                                 str(state)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running.append((key, proc, time.monotonic(), timeout))
        if not ctx["smoke"]:
            results[key] = _finish(ctx, *running.pop())
    for item in running:
        results[item[0]] = _finish(ctx, *item)
    return results


def too_little_left(key: str, left: float, smoke: bool) -> bool:
    """Whether a section should be skipped (and named for a rerun) rather than started with ``left`` seconds: on
    a GPU under half its cap, where it would spend the rest of the budget on a timeout; 30 s in the smoke."""
    return left < (30 if smoke else CAPS[key][0] / 2)


def _finish(ctx: dict, key: str, proc: subprocess.Popen, t0: float, timeout: float) -> dict:
    rc = wait_or_kill(proc, t0 + timeout + 15 - time.monotonic())
    out = Path(ctx["workdir"], f"section_{key}.log").read_text(errors="replace")
    crash = None if rc == 0 else f"timed out after {timeout:.0f} s" if rc == 124 else first_error_line(out)
    path = Path(ctx["workdir"], f"section_{key}.json")
    data = json.loads(path.read_text()) if path.exists() else {"status": "ran", "reason": "", "commands": [],
                                                                "lines": [], "goals": []}
    if crash:
        data.update(status="failed", reason=crash)
    data["wall_s"] = data.get("wall_s") or time.monotonic() - t0  # the section's own figure unless it died
    return data


def report(env: dict, ctx: dict, setup: tuple[str, float, str | None], results: dict, wall: float,
           argv: list[str]) -> str:
    mode = "smoke (CPU, tiny sizes)" if ctx["smoke"] else "full"
    lines = ["# GPU check", "", f"`python scripts/gpu_check.py {shlex.join(argv)}`", "",
             "| | |", "| --- | --- |", f"| device | {env['device']} |", f"| mode | {mode} |",
             f"| torch / timm / lightning / python | {env['torch']} / {env['timm']} / {env['lightning']} / "
             f"{env['python']} |", f"| CPU cores | {env['cpus']} (loader workers per source: {ctx['workers']}) |",
             f"| commit | {env['commit']} |", f"| wall time | {wall:.0f} s (budget {ctx['budget']:.0f} s) |",
             f"| work folder (commands' logs) | {ctx['workdir']} |", "",
             f"Demo data: `{setup[0]}` ({setup[1]:.0f} s{', failed: ' + setup[2] if setup[2] else ''}).", ""]
    for key in "abcdef":
        data = results.get(key)
        if data is None:
            continue
        status = data["status"] + (f": {data['reason']}" if data.get("reason") else "")
        lines += [f"## {key}. {TITLES[key]}", "", f"**{status}** ({data['wall_s']:.0f} s)", ""]
        if data["commands"]:
            lines += ["```", *data["commands"], "```", ""]
        if data.get("configs"):
            lines += ["Configs laid over configs/demo.yaml (JSON is YAML):", "", "```", *data["configs"], "```", ""]
        lines += data["lines"]
        if data["goals"]:
            lines += ["", "| goal | measured | |", "| --- | --- | --- |"]
            lines += [f"| {g} | {v} | {'n/a' if ok is None else 'pass' if ok else 'FAIL'} |"
                      for g, v, ok in data["goals"]]
        lines.append("")
    return "\n".join(lines)


def untouched_probes_fit(argv: list[str]) -> None:
    """``omnimae-cli`` with the DDP probe touch switched off: the alternative that section e measures."""
    import torch

    from omnimae_pl import cli
    from omnimae_pl.tasks.pretrain import OmniMAEPretrain

    OmniMAEPretrain._touch_idle_probes = lambda self, latent, modality: torch.zeros((), device=latent.device)
    print("gpu_check: OmniMAEPretrain._touch_idle_probes switched off (returns 0, touches no probe)", flush=True)
    cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--untouched-probes":
        untouched_probes_fit(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.md", help="the markdown report")
    p.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with tiny sizes")
    p.add_argument("--only", default="abcdef", help="sections to run, e.g. cf")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 480, smoke 400)")
    p.add_argument("--workdir", default=None, help="where data, configs and logs go (default: a new temp folder)")
    p.add_argument("--workers", type=int, default=None, help="loader workers per source (default: cores / 2 - 1)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child process: one section
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        t0 = time.monotonic()
        section = Section(args.section, json.loads(Path(args.state).read_text()))
        section.save()
        SECTIONS[args.section](section)
        section.data["wall_s"] = time.monotonic() - t0
        section.save()
        return 0
    t0 = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="omnimae_gpu_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    ctx = {"smoke": args.smoke, "workdir": str(workdir), "keys": args.only, "demo_root": str(workdir / "demo"),
           "python": sys.executable, "cpus": cpus, "budget": args.budget or (400.0 if args.smoke else 480.0),
           "workers": args.workers if args.workers is not None else (0 if args.smoke else max(1, cpus // 2 - 1))}
    env = environment(args.smoke)
    print(f"gpu_check: {env['device']}, work folder {workdir}", flush=True)
    setup = build_demo(ctx, 120)
    results = run_sections(ctx, args.only, ctx["budget"] - (time.monotonic() - t0)) if not setup[2] else {
        k: {"status": "skipped", "reason": "the demo data could not be built", "commands": [], "lines": [],
            "goals": [], "wall_s": 0.0} for k in args.only}
    text = report(env, ctx, setup, results, time.monotonic() - t0, argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"gpu_check: report written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
