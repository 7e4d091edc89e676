"""Evaluation: landmark and segmentation metrics, registration baselines, reports and the demo."""
