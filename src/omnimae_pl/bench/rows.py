"""What a measurement reports: one row per (implementation, modality, batch, precision, variant), printed as it
is measured, and the speed-ups between rows."""

from __future__ import annotations

FIELDS = (
    "impl", "modality", "batch", "precision", "compiled", "grad_ckpt", "samples_per_s", "steps_per_s", "step_ms",
    "gflops_per_sample", "tflops_per_s", "mfu", "peak_mem_gib", "loss", "recompiles",
)


def log(msg: str) -> None:
    print(msg, flush=True)  # flushed: a run on a device machine may be cut off at its time limit


def row(impl, modality, batch, precision, compiled, ckpt, sec, flops, peak, mem, loss, recompiles,
        samples_per_step=None) -> dict:
    """A measured row. ``sec``: seconds per step; ``flops``: training FLOPs per sample; ``samples_per_step``:
    ``batch`` unless the batch size varies from step to step (end to end)."""
    sps = (batch if samples_per_step is None else samples_per_step) / sec
    tflops = sps * flops / 1e12
    return {
        "impl": impl, "modality": modality, "batch": batch, "precision": precision, "compiled": compiled,
        "grad_ckpt": ckpt, "samples_per_s": sps, "steps_per_s": 1.0 / sec, "step_ms": sec * 1e3,
        "gflops_per_sample": flops / 1e9, "tflops_per_s": tflops,
        "mfu": (tflops / peak) if peak else None, "peak_mem_gib": mem, "loss": loss, "recompiles": recompiles,
    }


def oom_row(impl, modality, batch, precision, compiled, ckpt) -> dict:
    return {"impl": impl, "modality": modality, "batch": batch, "precision": precision, "compiled": compiled,
            "grad_ckpt": ckpt, "error": "OOM"}


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:<9} {r['modality']:<6} b={r['batch']} {r.get('precision')} {r['error']}"
    mfu = f"{r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else "   n/a"
    mem = f"{r['peak_mem_gib']:6.1f}" if r.get("peak_mem_gib") is not None else "   n/a"
    comp = r["compiled"] if r["compiled"] else "eager"
    b = r["batch"] if isinstance(r["batch"], int) else "/".join(str(v) for v in r["batch"].values())
    ckpt = int(bool(r["grad_ckpt"]))
    recompiles = f" recompiles {r['recompiles']}" if r.get("recompiles") is not None else ""
    return (f"{r['impl']:<9} {r['modality']:<11} b={b:<7} {r['precision']:<4} {comp!s:<6} ckpt={ckpt} "
            f"{r['samples_per_s']:9.1f} samples/s {r['steps_per_s']:7.2f} steps/s {r['step_ms']:8.1f} ms "
            f"{r['gflops_per_sample']:8.2f} GFLOP/sample {r['tflops_per_s']:7.1f} TFLOP/s MFU {mfu} "
            f"mem {mem} GiB loss {r['loss']:.4f}{recompiles}")


def speedups(rows: list[dict]) -> dict[str, float]:
    """Ours over the official model at each official precision, and compiled over eager, per modality."""
    ok = [r for r in rows if "error" not in r and not isinstance(r["batch"], dict)]  # no end-to-end rows
    out = {}
    for m in ("image", "video"):
        out.update(_over_official(ok, m))
    for m in ("image", "video"):
        out.update(_compiled_over_eager(ok, m))
    return out


def _over_official(rows: list[dict], modality: str) -> dict[str, float]:
    """Ours (best of eager / compiled, at the official batch when ours ran it) over each official precision."""
    ours = [r for r in rows if r["impl"] == "ours" and r["modality"] == modality]
    official = [r for r in rows if r["impl"] == "official" and r["modality"] == modality]
    if not ours or not official:
        return {}
    batch = official[0]["batch"]
    ours = [r for r in ours if r["batch"] == batch] or ours
    best = max(r["samples_per_s"] for r in ours)
    eager = max((r["samples_per_s"] for r in ours if not r["compiled"]), default=None)
    out = {}
    for precision in sorted({r["precision"] for r in official}):
        theirs = max(r["samples_per_s"] for r in official if r["precision"] == precision)
        out[f"{modality}: ours best / official {precision}"] = best / theirs
        if eager:
            out[f"{modality}: ours eager / official {precision}"] = eager / theirs
    return out


def _compiled_over_eager(rows: list[dict], modality: str) -> dict[str, float]:
    plain = [r for r in rows if r["impl"] == "ours" and r["modality"] == modality and not r["grad_ckpt"]]
    eager = {r["batch"]: r["samples_per_s"] for r in plain if not r["compiled"]}
    compiled = {r["batch"]: r["samples_per_s"] for r in plain if r["compiled"]}
    return {f"{modality} b={b}: compiled / eager": compiled[b] / eager[b] for b in sorted(set(eager) & set(compiled))}
