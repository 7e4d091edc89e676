"""Synthetic abdomen phantoms: a deterministic, varied cohort with organ labels and named landmarks.

``generate_subject(seed, config)`` builds one subject in memory; ``generate_cohort`` writes a cohort
(images, labels, landmarks, ``manifest.json``); ``load_cohort`` reads it back. See ``anatomy`` for the
canonical anatomy, ``transform`` for the subject mapping and ``render`` for voxelisation and HU.
"""

from anatomical_embedding.phantoms.generate import (
    COHORT_FORMAT,
    Cohort,
    CohortSubject,
    PhantomConfig,
    PhantomSubject,
    generate_cohort,
    generate_subject,
    load_cohort,
    subject_seeds,
)
from anatomical_embedding.phantoms.labels import LABEL_COLORS, LABEL_IDS, LABEL_NAMES

__all__ = [
    "COHORT_FORMAT",
    "LABEL_COLORS",
    "LABEL_IDS",
    "LABEL_NAMES",
    "Cohort",
    "CohortSubject",
    "PhantomConfig",
    "PhantomSubject",
    "generate_cohort",
    "generate_subject",
    "load_cohort",
    "subject_seeds",
]
