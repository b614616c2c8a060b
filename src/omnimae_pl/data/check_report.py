"""What ``omnimae-cli data-check`` gathers per source and split, as JSON and as a short terminal summary.

Everything in the JSON is independent of the order in which files were probed (failures and note lists sorted
by path, counts sorted by count then name), so any number of workers gives the same report (timing aside).
"""

from __future__ import annotations

import os
from array import array
from collections import Counter

import numpy as np

from omnimae_pl.data.probe import REASONS, format_mismatch

GREYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
SHOW = 5  # failures per split on the terminal; the JSON has all


class SplitCheck:
    """Counts and statistics of one source's split, fed one probe row per file (see ``probe``)."""

    def __init__(self, listing, modality: str) -> None:
        self.listing = listing
        self.modality = modality
        self.size = listing.size
        self.reasons: Counter = Counter()
        self.failures: list[dict] = []
        self.values = {key: array("d") for key in ("width", "height", "fps", "seconds", "frames")}
        self.kinds: dict[str, Counter] = {"formats": Counter(), "modes": Counter(), "fps": Counter(),
                                          "resolutions": Counter(), "mismatches": Counter()}
        self.notes: dict[str, list[str]] = {"cmyk": [], "greyscale": [], "other_mode": [], "format_mismatch": []}

    def add(self, index: int, row: tuple, path: str) -> None:
        reason, detail, placeholder, stats = row
        if reason:
            self.reasons[reason] += 1
            self.failures.append({"path": path, "class": self._class_name(int(self.listing.labels[index])),
                                  "reason": reason, "detail": detail,
                                  "training": "placeholder" if placeholder else "read"})
        if stats is None:
            return
        if self.modality == "image":
            image_format, mode, width, height = stats
            self.kinds["formats"][str(image_format)] += 1
            self.kinds["modes"][mode] += 1
            note = "cmyk" if mode == "CMYK" else "greyscale" if mode in GREYSCALE_MODES else None
            note = note or ("other_mode" if mode != "RGB" else None)
            if note:
                self.notes[note].append(path)
            if format_mismatch(path, image_format):
                self.notes["format_mismatch"].append(path)
                self.kinds["mismatches"][f"{image_format} named {os.path.splitext(path)[1]}"] += 1
        else:
            fps, seconds, frames, width, height = stats
            self.values["fps"].append(fps)
            self.values["seconds"].append(seconds)
            self.values["frames"].append(frames)
            self.kinds["fps"][f"{fps:.2f}"] += 1
            self.kinds["resolutions"][f"{width}x{height}"] += 1
        self.values["width"].append(width)
        self.values["height"].append(height)

    def _class_name(self, label: int) -> str:
        return self.listing.classes[label] if 0 <= label < len(self.listing.classes) else "<unlabelled>"

    def to_json(self, max_invalid_fraction: float) -> dict:
        cfg, listing = self.listing.source, self.listing
        bad = sum(self.reasons.values())
        name = f"{cfg.name}/{listing.split}"
        failed = f"{name}: {listing.error}" if listing.error else ""
        if not failed and bad > max_invalid_fraction * self.size:
            failed = (f"{name}: {bad} of {self.size} files ({bad / self.size:.1%}) unreadable, more than "
                      f"max_invalid_fraction={max_invalid_fraction:g}")
        out = {
            "source": cfg.name, "kind": cfg.kind, "root": cfg.root, "split": listing.split, "stages": listing.stages,
            "files": self.size, "unreadable": bad,
            "unreadable_fraction": round(bad / self.size, 6) if self.size else 0.0,
            "placeholders": sum(f["training"] == "placeholder" for f in self.failures),
            "reasons": _sorted_counts(self.reasons),
            "failures": sorted(self.failures, key=lambda f: f["path"]),
            "classes": self._classes(),
            f"{self.modality}s": self._media(),
            "error": listing.error, "skipped": listing.skipped, "failed": failed,
        }
        if cfg.kind == "ssv2":
            out["annotation_problems"] = list(listing.annotation_problems)
        return out

    def _classes(self) -> dict:
        labels = self.listing.labels
        if labels is None or not len(labels):
            return {"count": 0, "files_per_class": None, "empty": [], "per_class": {}}
        if (labels < 0).all():
            return {"count": 0, "files_per_class": None, "empty": [], "per_class": {"<unlabelled>": len(labels)}}
        counts = np.bincount(labels[labels >= 0], minlength=len(self.listing.classes))
        per_class = {name: int(n) for name, n in zip(self.listing.classes, counts) if n or not name.startswith("<")}
        named = [n for name, n in per_class.items() if not name.startswith("<")]
        return {"count": len(named), "files_per_class": _stats(named),
                "empty": [name for name, n in per_class.items() if n == 0], "per_class": per_class}

    def _media(self) -> dict:
        size = {key: _stats(self.values[key]) for key in ("width", "height")}
        if self.modality == "image":
            return {"formats": _sorted_counts(self.kinds["formats"]), "modes": _sorted_counts(self.kinds["modes"]),
                    **size, "notes": {key: sorted(paths) for key, paths in self.notes.items()},
                    "format_mismatches": _sorted_counts(self.kinds["mismatches"])}
        return {"fps": _sorted_counts(self.kinds["fps"]), "seconds": _stats(self.values["seconds"]),
                "frames": _stats(self.values["frames"]), **size,
                "resolutions": dict(list(_sorted_counts(self.kinds["resolutions"]).items())[:20])}


def _stats(values) -> dict | None:
    if not len(values):
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"min": _num(v.min()), "median": _num(np.median(v)), "max": _num(v.max())}


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 3)


def _sorted_counts(counter: Counter) -> dict:
    return {key: n for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))}


def _range(stats: dict | None, unit: str = "") -> str:
    if stats is None:
        return "-"
    if stats["min"] == stats["max"]:
        return f"{stats['min']}{unit}"
    return f"{stats['min']}-{stats['max']}{unit} (median {stats['median']})"


def _counts(counts: dict, top: int = 4) -> str:
    shown = ", ".join(f"{key} ({n})" for key, n in list(counts.items())[:top])
    return shown + (f", {len(counts) - top} more" if len(counts) > top else "")


def print_report(report: dict, out: str) -> None:
    configs = " ".join(report["configs"])
    print(f"data-check of {configs} ({report['datamodule'].rsplit('.', 1)[-1]}): max_invalid_fraction "
          f"{report['max_invalid_fraction']:g}, num_frames {report['num_frames']}, "
          f"{report['timing']['workers']} workers")
    for split in report["splits"]:
        _print_split(split)
    for name, orphans in report["ssv2_videos_in_no_json"].items():
        if orphans["count"]:
            print(f"{name}: {orphans['count']} .webm files in no SSv2 JSON, e.g. {', '.join(orphans['files'][:3])}")
    t = report["timing"]
    if report["ok"]:
        print(f"OK: every split within max_invalid_fraction {report['max_invalid_fraction']:g}")
    print(f"report: {out}; {t['files']} files probed in {t['probing_s']:.1f} s ({t['files_per_s']:g} files/s, "
          f"{t['files_per_s_per_worker']:g} per worker, {t['files_per_cpu_s']:g} per CPU second)")


def _print_split(s: dict) -> None:
    if s["skipped"]:
        print(f"{s['source']}/{s['split']} ({s['kind']}) {s['root']}: skipped, {s['skipped']}")
        return
    classes = s["classes"]
    if classes.get("files_per_class"):
        labels = f"{classes['count']} classes, {_range(classes['files_per_class'])} files per class"
    else:
        labels = "unlabelled" if classes.get("per_class") else "no classes"
    bad = f"unreadable {s['unreadable']} ({s['unreadable_fraction']:.1%}): {_counts(s['reasons'], 9)}" \
        if s["unreadable"] else "unreadable 0"
    print(f"{s['source']}/{s['split']} ({s['kind']}, {'+'.join(s['stages'])}) {s['root']}: "
          f"{s['files']} file{'s' * (s['files'] != 1)}, {labels}, {bad}")
    if s["error"]:
        print(f"  refused by the datamodule (training stops at the start): {s['error']}")
    if classes.get("empty"):
        print(f"  classes with no file: {', '.join(classes['empty'][:5])}{' ...' if len(classes['empty']) > 5 else ''}")
    if media := s.get("images"):
        if media["width"]:
            print(f"  images: {_counts(media['formats'])}; modes {_counts(media['modes'])}; width "
                  f"{_range(media['width'])}, height {_range(media['height'])}")
        notes = {"cmyk": "CMYK", "greyscale": "greyscale", "other_mode": "in another mode (palette, alpha)"}
        said = [f"{len(media['notes'][k])} {text}" for k, text in notes.items() if media["notes"][k]]
        said += [f"{n} {what}" for what, n in media["format_mismatches"].items()]
        if said:
            print(f"  note: {', '.join(said)} (the loaders convert them to RGB; paths in the report)")
    if (media := s.get("videos")) and media["width"]:
        print(f"  videos: fps {_counts(media['fps'], 3)}; {_range(media['seconds'], ' s')}; frames "
              f"{_range(media['frames'])}; {_counts(media['resolutions'], 3)}")
    for f in s["failures"][:SHOW]:
        read = "; training reads it" if f["training"] == "read" else ""
        path = os.path.relpath(f["path"], s["root"]) if f["path"].startswith(s["root"]) else f["path"]
        print(f"  {f['reason']:<15} {path}{': ' + f['detail'] if f['detail'] else ''}{read}")
    if len(s["failures"]) > SHOW:
        print(f"  ... and {len(s['failures']) - SHOW} more in the report")
    for p in s.get("annotation_problems", [])[:SHOW]:
        print(f"  annotation: entry {p['entry']}{' (id ' + p['id'] + ')' if 'id' in p else ''}: {p['problem']}")
    if s.get("annotation_problems") and len(s["annotation_problems"]) > SHOW:
        print(f"  ... and {len(s['annotation_problems']) - SHOW} more annotation problems in the report")


def reasons_help() -> str:
    """The reasons a file can be unreadable, for ``--help``."""
    return "\n".join(f"  {name:<17}{text}" for name, text in REASONS.items())
