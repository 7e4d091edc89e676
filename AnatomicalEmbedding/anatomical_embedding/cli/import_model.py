"""``anatomical-embedding import``: a downloaded published checkpoint -> ``.aemodel`` package (see import_pretrained)."""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from anatomical_embedding.inference.published import FORMATS, PUBLISHED_SOURCES

    epilog = "Where the checkpoints are published (nothing is downloaded by this command):\n" + "\n".join(
        f"  {fmt}: {text}" for fmt, text in PUBLISHED_SOURCES.items())
    p = subparsers.add_parser(
        "import", help="import a published pretrained checkpoint (AEFM, vox2vec, HDSSL) as a model package",
        description="Convert a downloaded AEFM / vox2vec / HDSSL checkpoint into an ONNX model package whose "
                    "card carries the published preprocessing (spacing, intensity window, orientation).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="which project's checkpoint this is")
    p.add_argument("--checkpoint", required=True, help="the downloaded file (.pth / .pt / .ckpt)")
    p.add_argument("--out", required=True, help="package to write (MODEL.aemodel); never overwritten unless --overwrite")
    p.add_argument("--name", help="display name in the model list (default: the package file name)")
    p.add_argument("--modality", default="ct", choices=("ct", "mri"), help="HDSSL: which published model (default ct)")
    p.add_argument("--register", action="store_true", help="add the package to the installed-model registry")
    p.add_argument("--registry", help="registry JSON file (default: the user's; see model_registry)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--network-config", type=json.loads, default=None, metavar="JSON",
                   help="advanced: constructor overrides for a non-published network size, e.g. "
                        "'{\"base_channels\": 8}' (the card records it)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from anatomical_embedding.inference.import_pretrained import import_published

    result = import_published(args.format, args.checkpoint, args.out, name=args.name, modality=args.modality,
                              network_config=args.network_config, overwrite=args.overwrite,
                              register=args.register, registry=args.registry)
    card = result.card
    print(f"wrote {result.package} ({card['method']}, {card['modality']}, spacing {card['spacing']} mm, "
          f"{card['fine_channels']}-d fine / {card['coarse_channels']}-d coarse, "
          f"checkpoint sha256 {card['source']['checkpoint_sha256'][:16]}...)")
    for caveat in card.get("caveats", []):
        print(f"note: {caveat}")
    if result.registry_entry:
        print(f"registered as {result.registry_entry['name']!r}")
    return 0
