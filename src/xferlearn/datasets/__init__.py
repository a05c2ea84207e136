"""Sample data that ships inside the package, so the whole job runs with no data of one's own
(as scikit-learn's `load_digits` or scikit-image's `skimage.data`).

    import xferlearn.datasets
    root = xferlearn.datasets.chest_xray_sample()    # a folder: train/ and test/, each NORMAL/ and PNEUMONIA/
    xferlearn.train(root / "train", out="runs/sample")

The images are data, not code: this subpackage sits at the data stage and imports only
the foundation. The sample is built by tools/make_sample.py; its LICENSE.txt credits the
source (Kermany et al., CC BY 4.0) and SOURCES.csv lists where each image came from.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import XferlearnError

_HERE = Path(__file__).resolve().parent


def chest_xray_sample() -> Path:
    """The folder of the packaged chest X-ray sample: 200 images of 150 patients from the Kaggle
    train split, 224 px grayscale, split by patient into train/ (140) and test/ (60), each with
    NORMAL/ and PNEUMONIA/ in equal numbers. Read-only: copy it before changing anything."""
    root = _HERE / "chest_xray_sample"
    if not all((root / part / name).is_dir() for part in ("train", "test") for name in ("NORMAL", "PNEUMONIA")):
        raise XferlearnError(f"The chest X-ray sample is missing from this install ({root}); reinstall xferlearn.")
    return root
