"""Evaluation: FID / precision / recall with an offline FID-Inception, class consistency, ADM .npz files.

Heavy dependencies (torchmetrics) are imported inside the functions that need them.
"""

from bitdance.evaluation.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    load_classifier,
    real_test_accuracy,
    train_classifier,
)
from bitdance.evaluation.fid import (
    InceptionFeatures,
    ReferenceStats,
    cached_reference_stats,
    compute_reference_stats,
    evaluate_samples,
    fid_from_images,
    find_default_inception,
    inception_score,
    precision_recall,
)
from bitdance.evaluation.npz import balanced_labels, generate_samples, load_npz, save_npz

__all__ = [
    "Classifier", "ClassifierConfig", "accuracy", "load_classifier", "real_test_accuracy", "train_classifier",
    "InceptionFeatures", "ReferenceStats", "cached_reference_stats", "compute_reference_stats",
    "evaluate_samples", "fid_from_images", "find_default_inception", "inception_score", "precision_recall",
    "balanced_labels", "generate_samples", "load_npz", "save_npz",
]
