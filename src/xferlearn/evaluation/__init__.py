"""Stage 3, evaluation: metrics and decision rules (metrics, thresholds), the report, Grad-CAM
and `evaluate`. Imports data/ and models/. Training imports it to choose by these metrics.
"""
