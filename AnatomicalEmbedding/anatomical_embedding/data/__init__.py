"""Data: cases and their preprocessing cache (``datasets``), one image's preprocessing free of MONAI
(``preprocess``), patch-pair sampling (``patches``), and each
method's augmentations, one module per method (``augment_hdssl``, ``augment_adam``)."""
