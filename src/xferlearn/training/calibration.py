"""The operating point, chosen on the validation split alone.

A temperature is fitted on the validation logits (calibrated probabilities), then the
decision threshold is chosen by the run's rule (Youden's J, or a target sensitivity), on
test-time-augmented probabilities where the run predicts with them. Both go into the
checkpoint as a typed `OperatingPoint`; nothing here ever sees a test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._io import write_csv_rows
from ..config import TrainConfig
from ..data.folders import ImageDataset, Manifest
from ..data.images import DecodeCache
from ..evaluation.metrics import compute_metrics
from ..evaluation.thresholds import apply_temperature, choose_operating_point, fit_temperature
from ..models.checkpoint import Checkpoint
from ..models.features import image_loader
from ..models.onnx_forward import feature_engine
from ..models.predictor import Predictor
from .distributed import device, gather_rows, loader_workers, shard


def operating_point(val_logits: np.ndarray, val_y: np.ndarray, classes: list[str], positive: int | None,
                    config: TrainConfig, view_logits: np.ndarray | None = None, data: str = "validation split"):
    """Temperature, operating point and validation metrics, all from the validation split alone.

    The temperature is fitted on the clean images' logits; with `view_logits` (V, N, C), the
    test-time-augmented logits, the threshold is chosen on the mean of their calibrated
    probabilities, the way prediction will compute them."""
    temperature = fit_temperature(val_logits, val_y)
    if view_logits is None:
        probs = apply_temperature(val_logits, temperature)
    else:
        probs = np.mean([apply_temperature(v, temperature) for v in view_logits], axis=0)
    point = choose_operating_point(val_y, probs, positive, config.threshold, config.target_sensitivity,
                                   data=data, n=len(val_y), when="training",
                                   tta_views=0 if view_logits is None else len(view_logits))
    metrics = compute_metrics(val_y, probs, classes, point.value, point.describe(), positive)
    return temperature, point, metrics, probs


def validation_view_logits(checkpoint: Checkpoint, manifest: Manifest, val_idx, cache: DecodeCache,
                           config: TrainConfig) -> np.ndarray:
    """(V, N, C) logits of the validation images through the whole trained network, over the
    test-time-augmentation views where the checkpoint says `tta` (V=1 otherwise). On a CPU they
    go through ONNX Runtime, as the features do (`feature_engine`): the fine-tune's 5 views of
    1038 validation images took about 3 minutes through PyTorch on 2 AVX2 cores."""
    here = device(config)
    engine = feature_engine(config.feature_engine, here, config.precision)
    predictor = Predictor(checkpoint, device=here, precision=config.precision, engine=engine,
                          batch_size=config.batch_size_features)
    mine = shard(list(val_idx))  # each process scores its share; every one gets them all back
    dataset = ImageDataset(*manifest.take(mine)[:2], None, cache)
    loader = image_loader(dataset, config.batch_size_features, loader_workers(config))
    local = np.concatenate([predictor.view_logits(images).cpu().numpy() for images, _ in loader], axis=1)
    return gather_rows(local, len(val_idx), axis=1)


def calibrate(checkpoint: Checkpoint, manifest: Manifest, val_idx, cache: DecodeCache, config: TrainConfig,
              val_logits: np.ndarray | None = None, data: str = "validation split") -> np.ndarray:
    """Set the checkpoint's temperature, operating point and validation metrics from the
    validation split; return the validation probabilities they were chosen on. The clean
    logits are computed through the trained network unless given (the linear recipe's head
    scored the cached features already); with `tta`, so are the TTA views'."""
    val_y = manifest.labels[val_idx]
    view_logits = None
    if val_logits is None or config.tta:
        view_logits = validation_view_logits(checkpoint, manifest, val_idx, cache, config)
        val_logits = view_logits[0]
    positive = checkpoint.positive_index
    temperature, point, metrics, val_probs = operating_point(
        val_logits, val_y, manifest.classes, positive, config, view_logits if config.tta else None, data)
    if config.tta:  # what TTA bought, each side at its own validation threshold
        *_, without, _ = operating_point(val_logits, val_y, manifest.classes, positive, config)
        metrics["without_tta"] = {key: without[key] for key in ("auc", "accuracy", "sensitivity", "specificity",
                                                                "threshold")}
    checkpoint.temperature, checkpoint.operating_point, checkpoint.metrics = temperature, point, metrics
    return val_probs


def write_validation_predictions(path: Path, manifest: Manifest, val_idx, probs: np.ndarray) -> None:
    """Per validation image: file, true class and calibrated probabilities, for error analysis
    and the benchmarks' bootstrap intervals."""
    columns = ["file", "label", *[f"p_{name}" for name in manifest.classes]]
    paths, _, labels = manifest.take(val_idx)
    rows = [dict(zip(columns, [path, manifest.classes[label], *[f"{p:.6f}" for p in row]]))
            for path, label, row in zip(paths, labels, probs)]
    write_csv_rows(path, rows, columns)
