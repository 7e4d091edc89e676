"""Few-shot segmentation: a light head trained on frozen embeddings, and its application (``head``)."""
