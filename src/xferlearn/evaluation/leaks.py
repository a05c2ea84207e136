"""The leak guard: are the images being evaluated ones the run trained or chose on?

RUN/split.json lists every training and validation image with its content hash and its
perceptual hash (data/phash.py). The images given to `evaluate` are matched against both:
an identical file by content hash, a re-encoded or resized copy by a perceptual hash within
`MAX_DISTANCE` bits. Figures on such images are not held-out figures; the report says how
many there were, and `--strict` refuses to report at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.folders import is_cross_fitted
from ..data.phash import MAX_DISTANCE, near_matches
from ..errors import XferlearnError


def load_split(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def calibration_sample(path: Path) -> list[dict]:
    """The site sample a calibrated run re-chose its operating point on (RUN/calibration.json's
    `sample`: content and perceptual hashes), as split entries; none for other runs."""
    record = load_split(path)
    return record.get("sample") or [] if isinstance(record, dict) else []


def find_overlap(split: dict | None, digests: list[str], phashes: list[str], sample: list[dict] | None = None) -> dict:
    """Per side of the run (train, val, and a calibrated run's site `sample`): how many of the
    given images are exact copies, and how many more are near copies (perceptual hash). An
    image found on several sides counts for the first."""
    n = len(digests)
    if split is None:
        return {"checked": False, "n": n, "why": "the run has no split.json"}
    result: dict = {"checked": True, "n": n, "near_distance_bits": MAX_DISTANCE,
                    "cross_fitted": is_cross_fitted(split)}
    seen = [False] * n
    for side, entries in (("train", split.get("train")), ("val", split.get("val")), ("sample", sample)):
        entries = entries or []
        exact_set = {e["digest"] for e in entries}
        exact = [not seen[i] and d in exact_set for i, d in enumerate(digests)]
        known = [e["phash"] for e in entries if e.get("phash")]
        near_any = near_matches(phashes, known) if known else [False] * n
        near = [not seen[i] and not exact[i] and bool(near_any[i]) for i in range(n)]
        seen = [s or e or m for s, e, m in zip(seen, exact, near)]
        result[side] = {"exact": sum(exact), "near": sum(near), "perceptual_checked": bool(known)}
    result["total"] = sum(seen)
    return result


def describe_overlap(overlap: dict, meaning: str = "These figures are not a held-out estimate.") -> str:
    """One line for people: none found, or how many, where, and what that means."""
    if not overlap.get("checked"):
        return f"overlap with the run's images not checked ({overlap.get('why')})"
    if not overlap["total"]:
        return f"no overlap: none of the {overlap['n']} images is among the run's training or validation images"
    parts = []
    train, val = overlap["train"], overlap["val"]
    if train["exact"] + train["near"]:
        what = ("trained on, and their out-of-fold predictions chose the epochs, temperature and any threshold"
                if overlap["cross_fitted"] else "trained on")
        parts.append(f"{train['exact'] + train['near']} were {what} ({train['exact']} identical, "
                     f"{train['near']} near copies)")
    if val["exact"] + val["near"]:
        parts.append(f"{val['exact'] + val['near']} are the run's validation images ({val['exact']} identical, "
                     f"{val['near']} near copies): the run chose its epoch, temperature and any threshold on "
                     "them")
    sample = overlap.get("sample", {"exact": 0, "near": 0})
    if sample["exact"] + sample["near"]:
        parts.append(f"{sample['exact'] + sample['near']} are the site sample `calibrate` re-chose the operating "
                     f"point on ({sample['exact']} identical, {sample['near']} near copies)")
    return (f"OVERLAP: {overlap['total']} of {overlap['n']} images are not held out: " + "; ".join(parts)
            + ". " + meaning)


def refuse_overlap(overlap: dict) -> None:
    """--strict: an evaluation on images the run has seen is an error, not a report."""
    if overlap.get("checked") and overlap["total"]:
        raise XferlearnError(describe_overlap(overlap).replace("OVERLAP: ", "--strict: ") +
                             " Evaluate on images the run never saw.")
