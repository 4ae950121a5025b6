"""Datasets: raw sources -> one dataset-dir format (COCO JSON + dataset.yaml), and the training data pipeline."""
