"""The phantom label table: ids, names, Slicer colours, and the colour-table writer."""

from __future__ import annotations

from pathlib import Path

#: Label id -> name. 0 is background (air outside the body). Fixed across cohorts, so a
#: model trained on one cohort reads the labels of another.
LABEL_NAMES: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "stomach",
    6: "pancreas",
    7: "aorta",  # with its celiac, SMA and common iliac branches
    8: "ivc",  # with the common iliac veins
    9: "vertebrae",  # bodies and posterior elements, including the sacrum
    10: "intervertebral_discs",
    11: "ribs",
    12: "bowel",
    13: "lungs",
    14: "subcutaneous_fat",
    15: "body_soft_tissue",  # muscle, skin, visceral fat, diaphragm: everything else inside the body
}

LABEL_IDS: dict[str, int] = {name: i for i, name in LABEL_NAMES.items()}

#: RGB colours close to Slicer's GenericAnatomyColors so the labels look familiar there.
LABEL_COLORS: dict[int, tuple[int, int, int]] = {
    1: (221, 130, 101),
    2: (157, 108, 162),
    3: (185, 102, 83),
    4: (205, 122, 103),
    5: (216, 132, 105),
    6: (249, 180, 111),
    7: (224, 97, 76),
    8: (0, 151, 206),
    9: (241, 214, 145),
    10: (200, 200, 235),
    11: (255, 250, 220),
    12: (188, 95, 76),
    13: (197, 165, 145),
    14: (230, 220, 70),
    15: (177, 122, 101),
}


def color_table_text(names: dict[int, str] | None = None) -> str:
    """Slicer colour table (``.ctbl``): one ``id name r g b a`` line per label, background included."""
    names = LABEL_NAMES if names is None else names
    lines = [
        "# Color table file for the AnatomicalEmbedding phantom labels",
        "# id name r g b a",
        "0 background 0 0 0 0",
    ]
    for i in sorted(names):
        r, g, b = LABEL_COLORS.get(i, (128, 128, 128))
        lines.append(f"{i} {names[i]} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def write_color_table(path: Path, overwrite: bool = False) -> Path:
    from anatomical_embedding.io import atomic_write

    text = color_table_text()
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
