"""The end-to-end demo on a synthetic phantom cohort (stages and presets: ``cli/demo.py``, shown by ``demo --help``)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    n_subjects: int
    n_held_out: int
    cohort_spacing: float
    cohort_size: int | None
    train_steps: int
    model_spacing: float
    patch: int
    shots: tuple[int, ...] = (1, 3, 5)
    registration: tuple[str, ...] = ("affine", "affine+bspline")
    device: str = "cpu"
    fewshot_voxels: int = 1000       # few-shot head: voxels per class and case (FewShotConfig default: 3000)
    fewshot_epochs: int = 60
    scratch_steps: int = 300         # U-Net from scratch, per shot count; 0 = leave the baseline out
    aefm_spacing: float | None = 8.0  # AEFM's own model spacing on CPU (None: model_spacing), see method_overrides

    @property
    def aefm_model_spacing(self) -> float:
        """The spacing AEFM is trained at: its own on CPU, else the shared ``model_spacing``."""
        return self.aefm_spacing if self.device == "cpu" and self.aefm_spacing else self.model_spacing

    @classmethod
    def for_mode(cls, quick: bool, full: bool) -> "DemoSettings":
        if quick:
            # Measured 7.5 min with 3 held-out subjects and 80 steps; landmark transfer was the largest stage.
            return cls(n_subjects=8, n_held_out=2, cohort_spacing=5.0, cohort_size=64, train_steps=50,
                       model_spacing=6.0, patch=32, shots=(1, 5), registration=("affine",),
                       fewshot_voxels=500, fewshot_epochs=40, scratch_steps=60)
        if full:
            return cls(n_subjects=40, n_held_out=8, cohort_spacing=2.0, cohort_size=None, train_steps=4000,
                       model_spacing=2.0, patch=96, device="auto", fewshot_voxels=3000, fewshot_epochs=100,
                       scratch_steps=4000, aefm_spacing=None)
        # 15.9 minutes on 2 idle CPU cores with four methods (measured: see the README's Demo section).
        return cls(n_subjects=12, n_held_out=3, cohort_spacing=4.0, cohort_size=None, train_steps=300,
                   model_spacing=5.0, patch=32)


def method_overrides(method: str, s: DemoSettings) -> list[str]:
    """Training settings per method for the demo budget (small networks on CPU; paper defaults otherwise)."""
    common = [f"train.max_steps={s.train_steps}", "train.num_workers=0", "train.progress_bar=true",
              "train.tensorboard=false", "train.seed=0", f"train.device={s.device}",
              f"train.log_every={max(10, s.train_steps // 20)}", f"train.ckpt_every={max(50, s.train_steps // 4)}"]
    small = s.device == "cpu"
    spacing = f"[{s.model_spacing},{s.model_spacing},{s.model_spacing}]"
    patch = f"[{s.patch},{s.patch},{s.patch}]"
    if method == "aefm":
        # On CPU: 8 mm, so that a 32^3 patch sees the whole torso in-plane, widths 16-128 and in-image negatives
        # (our addition). Measured on the default cohort, all pairs of the 3 held-out subjects, robust-prior
        # median / mean error: 23.8 / 30.1 mm with widths 8-64 at 5 mm, 10.7 / 14.9 mm so; identical coordinates
        # 21.2 / 22.9 mm. Width is what 300 steps need (see Testing/fixtures_data.py).
        a = s.aefm_model_spacing
        return common + [
            "method.widths=[16,32,64,128]" if small else "method.widths=[32,64,128,256]",
            "method.feature_dim=16" if small else "method.feature_dim=64",
            f"method.spacing=[{a},{a},{a}]", f"method.patch_size={patch}", "method.n_pos=200", "method.n_neg=4096",
            "method.temperature=0.1", "method.momentum=0.99", "method.epochs_region=0",
            "method.in_image_negatives=true" if small else "method.in_image_negatives=false",
            "train.batch_size=2", "train.lr=2e-3", "train.warmup_steps=10",
        ]
    if method == "hdssl":
        return common + [
            "method.base_channels=8" if small else "method.base_channels=32",
            f"method.spacing={spacing}", f"method.patch_size={patch}", "method.n_pos=200",
            "train.batch_size=2", "train.warmup_steps=10",
        ]
    if method == "adam":
        # Our 3D generalisation with a tiny ResNet-10 (paper: 2D ResNet-50) and the three stages n = 0, 2, 4
        # compressed into the demo's steps (stages are counted in epochs); a faster key encoder and a higher SGD
        # learning rate than the paper's 0.999 / 0.03, which are tuned for 600 epochs. Batch 2 on CPU keeps a step
        # at about 0.6 s (measured 1.2 s/step at batch 4, 32^3 views, one thread).
        batch = 2 if small else 32
        steps_per_epoch = max(1, -(-(s.n_subjects - s.n_held_out) // batch))
        per_level = max(1, -(-s.train_steps // (3 * steps_per_epoch)))
        return common + [
            "method.dims=3", "method.depth=10" if small else "method.depth=18",
            "method.widths=[8,16,32,64]" if small else "method.widths=[32,64,128,256]",
            "method.conv1_stride=1", f"method.input_size={patch}", f"method.spacing={spacing}",
            "method.bank_size=4096", "method.momentum=0.99", "method.levels=[0,2,4]",
            f"method.epochs_per_level={per_level}", "method.coarse_stride=4", "method.coarse_dim=32",
            "method.fine_dim=32", f"train.batch_size={batch}", "train.optimizer=sgd", "train.lr=0.1",
            "train.weight_decay=1e-4", "train.warmup_steps=5",
        ]
    if method == "anatomask":
        # Tiny STU-Net and a faster EMA for a CPU budget of minutes (paper: B widths, 0.999 -> 0.9999).
        return common + [
            "method.widths=[8,16,32,64,64,64]" if small else "method.widths=[32,64,128,256,512,512]",
            f"method.spacing={spacing}", f"method.patch_size={patch}",
            "method.ema_start=0.9", "method.ema_end=0.99",
            "train.batch_size=2", "train.lr=2e-3", "train.warmup_steps=10",
        ]
    return common


@dataclass
class DemoState:
    out: Path
    settings: DemoSettings
    summary: dict = field(default_factory=dict)

    def stage(self, n: int, total: int, text: str) -> None:
        print(f"[{n}/{total}] {text}", flush=True)

    def save(self) -> None:
        (self.out / "demo_summary.json").write_text(json.dumps(self.summary, indent=2, default=float), encoding="utf-8")


# ---- stages -----------------------------------------------------------------------------------------
def _cohort(state: DemoState, seed: int, overwrite: bool):
    from anatomical_embedding.phantoms import generate_cohort, load_cohort
    from anatomical_embedding.phantoms.preview import write_preview

    s = state.settings
    t0 = time.perf_counter()
    manifest = generate_cohort(state.out / "cohort", s.n_subjects, seed, spacing=s.cohort_spacing,
                               size=s.cohort_size, overwrite=overwrite)
    cohort = load_cohort(manifest)
    preview = write_preview(cohort, state.out / "figures" / "cohort_preview.png")
    state.summary["cohort"] = {"manifest": str(manifest), "preview": str(preview), "subjects": len(cohort.subjects),
                               "landmarks": len(cohort.subjects[0].landmarks), "labels": len(cohort.label_names),
                               "seconds": round(time.perf_counter() - t0, 1)}
    return cohort


def _train_and_export(state: DemoState, cohort, train_ids: list[str], method: str) -> Path:
    from anatomical_embedding.inference.export import export_run
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer

    cases = [{"id": s.id, "image": str(s.image_path)} for s in cohort.subjects if s.id in train_ids]
    manifest = state.out / "runs" / f"{method}_data.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"cases": cases}, indent=1), encoding="utf-8")
    cfg = load_run_config(method, None, method_overrides(method, state.settings))
    run_dir = state.out / "runs" / method
    t0 = time.perf_counter()
    rc = Trainer(cfg, manifest, run_dir, echo_progress=False).run()
    if rc != 0:
        raise RuntimeError(f"training {method} stopped with exit code {rc}")
    train_s = time.perf_counter() - t0
    package = export_run(run_dir, state.out / "models" / f"{method}.aemodel", overwrite=True)
    state.summary.setdefault("methods", {})[method] = {
        "run_dir": str(run_dir), "package": str(package), "train_seconds": round(train_s, 1),
        "steps": state.settings.train_steps}
    return package


def _landmarks(state: DemoState, cohort, source_id: str, target_ids: list[str], packages: dict[str, Path]):
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import embed_volume
    from anatomical_embedding.io import read_image
    from anatomical_embedding.evaluation.landmarks import evaluate_transfer, identical_coordinate, registration_transfer
    from anatomical_embedding.inference.matching import Matcher

    subjects = {s.id: s for s in cohort.subjects}
    src = subjects[source_id]
    src_img = read_image(src.image_path)
    targets = [(t, read_image(subjects[t].image_path), subjects[t].landmarks) for t in target_ids]
    records = evaluate_transfer("identical coordinate", identical_coordinate, src_img, src.landmarks, targets, source_id)
    for kind in state.settings.registration:
        print(f"      registration baseline: {kind}", flush=True)
        # Registered at the model spacing (not finer than the cohort) with a bounded B-spline budget, so the
        # baselines take about as long per scan as embedding does; RegistrationConfig has the full settings.
        reg = {"spacing": max(state.settings.model_spacing, state.settings.cohort_spacing), "bspline_iterations": 20,
               "bspline_mesh_mm": 80.0, "shrink_factors": (2, 1), "smoothing_sigmas": (1.0, 0.0)}
        records += evaluate_transfer(f"registration {kind}", registration_transfer(kind, **reg), src_img,
                                     src.landmarks, targets, source_id)
    matchers = {}
    target_name = {id(t[1]): t[0] for t in targets}
    for method, package in packages.items():
        model = open_model(package, backend="onnxruntime")
        source_emb = embed_volume(model, src_img)
        embedded: dict[int, float] = {}  # id(target image) -> seconds its embedding took
        for variant in ("raw", "robust prior"):
            reused: dict[str, float] = {}

            def transfer(source, target, points, _model=model, _src=source_emb, _variant=variant, _m=method,
                         _embedded=embedded, _reused=reused):
                # Each target's coarse map is computed once per method; the variant that reuses it is charged its
                # time below and recomputes the fine tiles it needs, so both are timed as for a new scan.
                key = id(target)
                if key not in _embedded:
                    t0 = time.perf_counter()
                    matchers[(_m, key)] = Matcher(_src, embed_volume(_model, target))
                    _embedded[key] = time.perf_counter() - t0
                else:
                    matchers[(_m, key)].target.clear_fine_tiles()
                    _reused[target_name[key]] = _embedded[key]
                matches = matchers[(_m, key)].match(points, use_prior=_variant != "raw", with_raw=False)
                return np.array([m.final.point_lps for m in matches])
            print(f"      {method}: {variant} matching", flush=True)
            new = evaluate_transfer(f"{method} {variant}", transfer, src_img, src.landmarks, targets, source_id)
            for record in new:  # time per scan always includes embedding the target
                record.seconds += reused.get(record.target, 0.0)
            records += new
    return records, matchers, src_img, targets


def _fewshot(state: DemoState, cohort, labelled_ids: list[str], target_ids: list[str], packages: dict[str, Path]):
    """Few-shot heads on 1, 3, 5 labelled cases per method; returns Dice rows, timing and a few segmentations.

    Each labelled case is embedded once and its voxel sample reused by every head that includes it (the shot
    sets are nested), and each held-out case is embedded once for all heads of a method.
    """
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.evaluation.segmentation import segmentation_metrics
    from anatomical_embedding.fewshot.head import FewShotConfig, apply_heads, case_samples, train_head_on_samples
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import read_labelmap

    subjects = {s.id: s for s in cohort.subjects}
    names = {int(k): v for k, v in cohort.label_names.items()}
    cases = [(read_image(subjects[i].image_path), read_labelmap(subjects[i].label_path)[0]) for i in labelled_ids]
    tests = [(t, read_image(subjects[t].image_path), read_labelmap(subjects[t].label_path)[0]) for t in target_ids]
    config = FewShotConfig(voxels_per_class=state.settings.fewshot_voxels, epochs=state.settings.fewshot_epochs)
    rows, timing, examples = [], {}, {}
    for method, package in packages.items():
        model = open_model(package, backend="onnxruntime")
        samples, sample_s = [], []
        for n, (image, label) in enumerate(cases):
            t0 = time.perf_counter()
            samples.append(case_samples(model, image, label, names, config, n))
            sample_s.append(time.perf_counter() - t0)
        heads = []
        for shots in state.settings.shots:
            t0 = time.perf_counter()
            heads.append(train_head_on_samples(samples[:shots], names, model.model_hash, config))
            # What a user labelling `shots` cases waits for: embedding them plus training the head.
            timing[f"{method} {shots}-shot"] = {"train_s": round(sum(sample_s[:shots]) + time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        for n, (tid, img, ref) in enumerate(tests):
            for shots, seg in zip(state.settings.shots, apply_heads(model, heads, img)):
                rows += [{**r, "method": method, "shots": shots} for r in segmentation_metrics(seg, ref, names, case=tid)]
                if n == 0 and shots == max(state.settings.shots):
                    examples[method] = seg
        apply_s = (time.perf_counter() - t0) / len(tests)
        for shots in state.settings.shots:
            timing[f"{method} {shots}-shot"]["apply_s_per_case"] = round(apply_s, 2)
            mean = np.mean([r["dice"] for r in rows if r["method"] == method and r["shots"] == shots])
            print(f"      {method} {shots}-shot: mean Dice {mean:.3f} "
                  f"({timing[f'{method} {shots}-shot']['train_s']:.0f} s to embed the cases and train)", flush=True)
    return rows, timing, examples


SCRATCH = "U-Net from scratch"


def _scratch_unet(state: DemoState, cohort, labelled_ids: list[str], target_ids: list[str]):
    """The baseline without pretraining: a U-Net trained from scratch on the same labelled cases, per shot count."""
    from anatomical_embedding.evaluation.segmentation import segmentation_metrics
    from anatomical_embedding.training.finetune_config import resolve_finetune_config
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import read_labelmap
    from anatomical_embedding.methods.finetune import load_finetuned, segment_volume
    from anatomical_embedding.training.engine import Trainer

    s = state.settings
    subjects = {x.id: x for x in cohort.subjects}
    names = {int(k): v for k, v in cohort.label_names.items()}
    tests = [(t, read_image(subjects[t].image_path), read_labelmap(subjects[t].label_path)[0]) for t in target_ids]
    rows, timing, example = [], {}, None
    for shots in s.shots:
        run_dir = state.out / "runs" / f"scratch_{shots}shot"
        manifest = state.out / "runs" / f"scratch_{shots}shot_data.json"
        manifest.write_text(json.dumps({"cases": [
            {"id": i, "image": str(subjects[i].image_path), "label": str(subjects[i].label_path)}
            for i in labelled_ids[:shots]]}, indent=1), encoding="utf-8")
        # The same spacing, patch and step budget as pretraining. Adam at 2e-3 instead of the downstream recipe's
        # 1e-4: at a few hundred steps 1e-4 leaves the U-Net near chance, which would flatter the embeddings.
        overrides = [f"method.spacing=[{s.model_spacing},{s.model_spacing},{s.model_spacing}]",
                     f"method.patch_size=[{s.patch},{s.patch},{s.patch}]", "method.unet_res_units=1",
                     "method.unet_channels=[8,16,32,64]" if s.device == "cpu" else "method.unet_channels=[32,64,128,256]",
                     "method.val_every=0", "method.val_fraction=0", f"train.max_steps={s.scratch_steps}",
                     "train.lr=2e-3", "train.num_workers=0", "train.tensorboard=false", "train.progress_bar=true",
                     "train.batch_size=2", f"train.device={s.device}", f"train.ckpt_every={s.scratch_steps}"]
        cfg = resolve_finetune_config(run_dir, None, overrides, "scratch", None, False, str(manifest), None)
        t0 = time.perf_counter()
        if Trainer(cfg, manifest, run_dir, echo_progress=False).run() != 0:
            raise RuntimeError(f"training the scratch U-Net on {shots} case(s) failed; see {run_dir}")
        train_s = time.perf_counter() - t0
        net = load_finetuned(run_dir, "last")
        t0 = time.perf_counter()
        for n, (tid, img, ref) in enumerate(tests):
            seg = segment_volume(net, img, postprocess=True)
            rows += [{**r, "method": SCRATCH, "shots": shots} for r in segmentation_metrics(seg, ref, names, case=tid)]
            if n == 0 and shots == max(s.shots):
                example = seg
        timing[f"{SCRATCH} {shots}-shot"] = {"train_s": round(train_s, 1),
                                             "apply_s_per_case": round((time.perf_counter() - t0) / len(tests), 2)}
        mean = np.mean([r["dice"] for r in rows if r["shots"] == shots])
        print(f"      {SCRATCH} {shots}-shot: mean Dice {mean:.3f} ({train_s:.0f} s training)", flush=True)
    return rows, timing, example


def _overlay_figure(state: DemoState, image, reference, segmentations: dict, colors: dict[int, tuple]) -> Path:
    """One coronal slice of a held-out case: the reference labels and each method's segmentation."""
    from anatomical_embedding.evaluation.figures import pyplot, save_figure

    plt = pyplot()
    from matplotlib.colors import ListedColormap

    panels = [("reference", reference)] + list(segmentations.items())
    top = max(int(np.max(v.array)) for _, v in panels) + 1
    table = np.zeros((top, 4))
    for value in range(1, top):
        table[value, :3] = colors.get(value, plt.get_cmap("tab20")(value % 20)[:3])
        table[value, 3] = 0.55
    cmap = ListedColormap(table)
    j = int(np.argmax((reference.array > 0).sum(axis=(0, 2))))  # the coronal slice with the most labelled voxels
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    aspect = image.spacing[2] / image.spacing[0]
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, seg) in zip(axes.ravel(), panels):
        ax.imshow(image.array[::-1, j, :], cmap="gray", vmin=-200, vmax=300, aspect=aspect)
        ax.imshow(seg.array[::-1, j, :], cmap=cmap, vmin=0, vmax=top - 1, aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    return save_figure(fig, state.out / "figures" / "fewshot_overlays.png")


def _heatmap_figure(state: DemoState, matcher, src_img, target, point_lps: np.ndarray, truth_lps: np.ndarray,
                    title: str, path: Path) -> Path:
    from anatomical_embedding.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    _, tgt_img, _ = target
    heat = matcher.heatmap(point_lps)
    match = matcher.match(point_lps, with_raw=False)[0].final
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), dpi=110)
    for ax, img, p, label in ((axes[0], src_img, point_lps, "source: query"),
                              (axes[1], tgt_img, match.point_lps, "target: match + heatmap")):
        ijk = img.world_to_index(p)
        k = int(np.clip(round(ijk[2]), 0, img.array.shape[0] - 1))
        ax.imshow(img.array[k], cmap="gray", vmin=-200, vmax=300)
        if img is tgt_img:
            ax.imshow(np.ma.masked_less(heat.array[k], 0.5), cmap="inferno", alpha=0.55, vmin=0.5, vmax=1)
            t = img.world_to_index(truth_lps)
            ax.plot(t[0], t[1], "c+", ms=14, mew=2, label="ground truth")
        ax.plot(ijk[0], ijk[1], "o", mfc="none", mec="lime", ms=12, mew=2, label=label)
        ax.set_title(label)
        ax.axis("off")
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(f"{title}: similarity {match.similarity:.2f}, confidence {match.confidence:.2f}")
    return save_figure(fig, path)


def _real_ct_pair(state: DemoState, seed: int) -> list | None:
    """Stage 4b: the real CT pair with the shipped default CT model (skipped, with the reason, without a real CT)."""
    from anatomical_embedding.evaluation.real_pair import find_real_ct, real_ct_transfer

    path = find_real_ct()
    if path is None:
        state.summary["real_ct"] = {"available": False, "reason": "no real CT found (../shared/data or Testing/data)"}
        print("      real CT pair: skipped (no real CT on this machine)", flush=True)
        return None
    print(f"      real CT pair: {path.name} under a known deformation, default CT model", flush=True)
    records, info = real_ct_transfer(path, seed)
    state.summary["real_ct"] = info
    return records


def _write_report(state: DemoState, records, seg_rows, seg_timing, figures: dict[str, Path],
                  real_records: list | None = None) -> tuple[Path, Path]:
    from anatomical_embedding.evaluation.segmentation import plot_dice
    from anatomical_embedding.evaluation.landmarks import plot_error_cdf, write_records_csv
    from anatomical_embedding.evaluation.report import Report
    from anatomical_embedding.evaluation.report_tables import (add_fewshot_results, add_landmark_results,
                                                                add_real_pair_results, write_fewshot_csv)

    out = state.out
    # The tables are computed from the CSV files written here, so they agree with them to the last digit.
    landmark_csv = write_records_csv(records, out / "landmark_errors.csv")
    cdf = plot_error_cdf(records, out / "figures" / "landmark_error_cdf.png")
    r = Report("AnatomicalEmbedding demo report")
    s = state.settings
    r.paragraph(f"Synthetic phantom cohort: {s.n_subjects} subjects ({s.n_held_out} held out), "
                f"{state.summary['cohort']['landmarks']} landmarks and {state.summary['cohort']['labels']} organ labels "
                f"each. Models are pretrained for {s.train_steps} steps at {s.model_spacing} mm"
                + (f" (AEFM at {s.aefm_model_spacing} mm)" if s.aefm_model_spacing != s.model_spacing else "")
                + " and run through "
                "ONNX Runtime. All numbers below were measured by this run.")
    r.image(figures["preview"], "Phantom cohort: orthogonal slices with labels and landmarks")
    lm = add_landmark_results(r, landmark_csv, cdf)
    if real_records:
        real = add_real_pair_results(r, write_records_csv(real_records, out / "real_ct_errors.csv"),
                                     state.summary["real_ct"])
        state.summary["real_ct"]["landmarks"] = {m: {k: v for k, v in d.items() if k != "per_landmark_mean_mm"}
                                                 for m, d in real.items()}
    for key, png in figures.items():
        if key.startswith("heatmap "):
            r.image(png, f"Click to correspond, {key.split(' ', 1)[1]}: query, match and coarse similarity heatmap")
    if seg_rows:
        keys = add_fewshot_results(r, write_fewshot_csv(seg_rows, out / "fewshot_metrics.csv"))
        r.table(["head", "training (s)", "apply (s per case)"],
                [[k, v["train_s"], v["apply_s_per_case"]] for k, v in seg_timing.items()])
        best = max(keys, key=lambda mk: (mk[1], mk[0]))
        dice_png = plot_dice([x for x in seg_rows if (x["method"], x["shots"]) == best],
                             out / "figures" / "fewshot_dice.png", title=f"Dice per organ, {best[0]} {best[1]}-shot")
        r.image(dice_png, f"Few-shot segmentation, {best[0]} with {best[1]} labelled cases")
        if "overlays" in figures:
            r.image(figures["overlays"], f"Segmentations of held-out subject {state.summary['split']['held_out'][0]} "
                                         f"with {max(s.shots)} labelled cases (coronal slice)")
        if any(x["method"] == SCRATCH for x in seg_rows):
            r.paragraph(f"{SCRATCH}: a MONAI U-Net trained with DiceCE on the same labelled cases for "
                        f"{s.scratch_steps} steps at the same spacing and patch size, without any pretraining "
                        "(`anatomical-embedding finetune --mode scratch`).")
    for method, info in state.summary.get("methods", {}).items():
        loss_png = _loss_plot(Path(info["run_dir"]), out / "figures" / f"loss_{method}.png", method)
        if loss_png:
            r.image(loss_png, f"Training loss, {method}")
    _provenance(r, state)
    state.summary["landmarks"] = {m: {k: v for k, v in d.items() if k != "per_landmark_mean_mm"} for m, d in lm.items()}
    return r.write(out)


def _provenance(r, state: DemoState) -> None:
    """Engine, library and machine versions plus each model's hash and settings, for reproducibility."""
    import os
    import platform

    import onnxruntime
    import torch

    from anatomical_embedding.inference.backends import _engine_version, read_package

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    r.heading("Provenance")
    r.table(["item", "value"], [
        ["engine", _engine_version()], ["torch", torch.__version__], ["onnxruntime", onnxruntime.__version__],
        ["python", platform.python_version()], ["machine", f"{platform.machine()}, {os.cpu_count()} CPU cores"],
        ["GPU", gpu], ["cohort seed", str(state.summary.get("seed", ""))]])
    rows = []
    for method, info in state.summary.get("methods", {}).items():
        card, _ = read_package(info["package"])
        rows.append([method, card["onnx_sha256"][:16], f"{Path(info['run_dir']) / 'config.toml'}",
                     info["train_seconds"]])
    if rows:
        r.table(["model", "ONNX sha256 (first 16)", "full settings", "training (s)"], rows)


def _loss_plot(run_dir: Path, path: Path, method: str) -> Path | None:
    import csv

    from anatomical_embedding.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return None
    rows = list(csv.DictReader(metrics.open(encoding="utf-8")))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{method} pretraining")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def run_demo(out: Path, quick: bool = False, full: bool = False, seed: int = 0, overwrite: bool = False,
             methods: list[str] | None = None, settings: DemoSettings | None = None) -> dict:
    """Run all stages; ``settings`` (tests, experiments) replaces the ``quick``/``full`` presets."""
    from anatomical_embedding.methods import available_methods

    settings = settings or DemoSettings.for_mode(quick, full)
    out = Path(out).resolve()  # manifests written below hold paths that must not depend on the cwd
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
    for sub in ("runs", "models"):  # a re-run retrains from scratch
        if (out / sub).exists():
            import shutil

            shutil.rmtree(out / sub)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    methods = methods or list(available_methods())
    state = DemoState(out, settings, {"settings": asdict(settings), "methods_requested": methods, "seed": seed})
    total = 6
    t_start = time.perf_counter()

    state.stage(1, total, f"generating {settings.n_subjects} phantom subjects at {settings.cohort_spacing} mm")
    cohort = _cohort(state, seed, overwrite)
    ids = [s.id for s in cohort.subjects]
    held_out, train_ids = ids[-settings.n_held_out:], ids[:-settings.n_held_out]
    state.summary["split"] = {"train": train_ids, "held_out": held_out}

    packages: dict[str, Path] = {}
    for n, method in enumerate(methods, 1):
        state.stage(2, total, f"pretraining {method} ({n}/{len(methods)}, {settings.train_steps} steps)")
        packages[method] = _train_and_export(state, cohort, train_ids, method)
    state.stage(3, total, f"exported {len(packages)} model package(s) to {out / 'models'}")

    state.stage(4, total, f"transferring landmarks from {train_ids[0]} to {len(held_out)} held-out subjects")
    records, matchers, src_img, targets = _landmarks(state, cohort, train_ids[0], held_out, packages)

    real = _real_ct_pair(state, seed)

    state.stage(5, total, f"few-shot segmentation with {', '.join(map(str, settings.shots))} labelled cases")
    labelled = train_ids[: max(settings.shots)]
    seg_rows, seg_timing, examples = _fewshot(state, cohort, labelled, held_out, packages)
    if settings.scratch_steps > 0:
        print(f"      baseline: {SCRATCH}, {settings.scratch_steps} steps per shot count", flush=True)
        rows, timing, example = _scratch_unet(state, cohort, labelled, held_out)
        seg_rows, seg_timing = seg_rows + rows, {**seg_timing, **timing}
        examples[SCRATCH] = example

    state.stage(6, total, "writing the report")
    figures = {"preview": Path(state.summary["cohort"]["preview"])}
    subjects = {s.id: s for s in cohort.subjects}
    name = "kidney_left_upper_pole"
    for method in packages:  # the same query and target for every method
        figures[f"heatmap {method}"] = _heatmap_figure(
            state, matchers[(method, id(targets[0][1]))], src_img, targets[0],
            subjects[train_ids[0]].landmarks[name], targets[0][2][name], f"{method}, {name}",
            state.out / "figures" / f"heatmap_{method}.png")
    if examples:
        from anatomical_embedding.io import read_image
        from anatomical_embedding.io.labelmaps import read_labelmap
        from anatomical_embedding.phantoms.labels import LABEL_COLORS

        first = {x.id: x for x in cohort.subjects}[held_out[0]]
        k = max(settings.shots)
        figures["overlays"] = _overlay_figure(
            state, read_image(first.image_path), read_labelmap(first.label_path)[0],
            {f"{m} {k}-shot": seg for m, seg in examples.items()},
            {v: tuple(c / 255 for c in rgb) for v, rgb in LABEL_COLORS.items()})
    md, html = _write_report(state, records, seg_rows, seg_timing, figures, real)
    state.summary.update({"report_html": str(html), "report_md": str(md),
                          "fewshot": seg_timing, "seconds": round(time.perf_counter() - t_start, 1)})
    state.summary["fewshot_mean_dice"] = {
        f"{m} {k}-shot": float(np.mean([r["dice"] for r in seg_rows if r["method"] == m and r["shots"] == k]))
        for m, k in sorted({(r["method"], r["shots"]) for r in seg_rows})}
    state.save()
    return state.summary
