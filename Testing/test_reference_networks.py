"""vox2vec and HDSSL networks against the published reference outputs, checkpoint loading, embedders, layouts.

Reference vectors (``Testing/data/{vox2vec,hdssl}/``, see the README there) were produced by running the
unmodified upstream code; our re-implementation must reproduce them to 1e-4 (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from anatomical_embedding import io
from anatomical_embedding.nets.blocks import (
    FPN3d,
    concat_upsampled,
    l2_normalize,
    layout_for_direction,
    normalized_concat,
    select_from_pyramid,
    to_network_layout,
)
from anatomical_embedding.nets.hdssl import HDSSLFPN, HDSSLConfig, HDSSLEmbedder, HDSSLNet
from anatomical_embedding.nets.hdssl import PUBLISHED_MODEL_INFO as HDSSL_INFO
from anatomical_embedding.nets.vox2vec import PUBLISHED_MODEL_INFO as VOX2VEC_INFO
from anatomical_embedding.nets.vox2vec import Vox2VecEmbedder, Vox2VecFPN
from anatomical_embedding.inference.pretrained import (
    load_published_checkpoint,
    load_published_embedder,
    published_model_info,
)

DATA = Path(__file__).parent / "data"
TOL = 1e-4
# name -> (tiny constructor, published constructor, full-synthetic weight seed, input seed, input shape)
SPECS = {
    "vox2vec": ((1, 1, 6), (1, 16, 6), 20231009, 20231010, (1, 1, 32, 32, 16)),
    "hdssl": ((1, 2, 5), (1, 32, 5), 20240101, 20240102, (1, 1, 24, 24, 16)),
}


def _tiny_state(name: str) -> dict[str, torch.Tensor]:
    with np.load(DATA / name / "tiny_state.npz") as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def _tiny_net(name: str) -> FPN3d:
    net = FPN3d(*SPECS[name][0])
    net.load_state_dict(_tiny_state(name))
    return net.eval()


def _published_fpn(name: str) -> FPN3d:
    return (Vox2VecFPN if name == "vox2vec" else HDSSLFPN)()


def _synthetic_state(keys: list, seed: int) -> dict[str, torch.Tensor]:
    """The NOTES.md recipe: legacy RandomState, keys_full order, num_batches_tracked = 0 without a draw."""
    rs = np.random.RandomState(seed)
    state = {}
    for name, shape, _dtype in keys:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.int64)
            continue
        z = rs.standard_normal(size=shape)
        if name.endswith("running_var"):
            value = np.exp(0.2 * z)
        elif name.endswith(("running_mean", "bias")):
            value = 0.1 * z
        elif len(shape) >= 2:
            value = z / np.sqrt(np.prod(shape[1:]))
        else:
            value = 0.5 + 0.25 * z
        state[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float((a - torch.from_numpy(b)).abs().max())


# ---- parity with the reference outputs -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vox2vec", "hdssl"])
def test_tiny_parity_with_reference(name):
    net = _tiny_net(name)
    assert list(net.state_dict()) == list(_tiny_state(name))  # same key order as the reference module
    with np.load(DATA / name / "tiny_io.npz") as io_ref, torch.no_grad():
        pyramid = net(torch.from_numpy(io_ref["input"]))
        assert len(pyramid) == SPECS[name][0][2]
        for level, fmap in enumerate(pyramid):
            assert _max_abs(fmap, io_ref[f"pyramid_{level}"]) <= TOL, level
        voxels = torch.from_numpy(io_ref["voxel_indices"])
        assert _max_abs(select_from_pyramid(pyramid, voxels), io_ref["voxel_embeddings"]) <= TOL


@pytest.mark.parametrize("name", ["vox2vec", "hdssl"])
def test_published_keys_and_full_size_synthetic_parity(name):
    _, published, weight_seed, input_seed, input_shape = SPECS[name]
    keys = json.loads((DATA / name / "keys_full.json").read_text(encoding="utf-8"))
    with torch.device("meta"):  # skip the default init of ~47M parameters; weights come from the recipe
        net = _published_fpn(name)
    assert (net.base_channels, net.num_scales) == published[1:]
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in net.state_dict().items()]
    assert ours == keys  # names, order, shapes and dtypes of the published state_dict
    net.load_state_dict(_synthetic_state(keys, weight_seed), assign=True)
    net.eval()
    x = np.random.RandomState(input_seed).uniform(0, 1, size=input_shape).astype(np.float32)
    with np.load(DATA / name / "full_synthetic_io_small.npz") as ref, torch.no_grad():
        np.testing.assert_array_equal(x, ref["input"])
        pyramid = net(torch.from_numpy(x))
        assert _max_abs(pyramid[0][:, :, ::2, ::2, ::2], ref["pyramid_0_sub2"]) <= TOL
        for level in range(1, len(pyramid)):
            assert _max_abs(pyramid[level], ref[f"pyramid_{level}"]) <= TOL, level


def _tiny_hdssl_net() -> HDSSLNet:
    net = HDSSLNet(HDSSLConfig(base_channels=2))
    state = {f"backbone.{k}": v for k, v in _tiny_state("hdssl").items()}
    with np.load(DATA / "hdssl" / "tiny_heads_state.npz") as z:
        state.update({k: torch.from_numpy(z[k].copy()) for k in z.files})
    net.load_state_dict(state)  # strict: the registered heads have exactly the reference's names
    return net.eval()


def test_hdssl_heads_parity_with_reference():
    net = _tiny_hdssl_net()
    with np.load(DATA / "hdssl" / "tiny_io.npz") as ref, torch.no_grad():
        pyramid = net(torch.from_numpy(ref["input"]))
        projected = net.project_pyramid(pyramid)
        for level in range(1, 5):
            assert _max_abs(projected[level], ref[f"scale_proj_{level}"]) <= TOL, level
        vectors = net.voxel_vectors(pyramid, torch.from_numpy(ref["voxel_indices"]))
        assert _max_abs(vectors, ref["proj_head_input"]) <= TOL
        assert _max_abs(net.project(vectors), ref["proj_head_embeddings"]) <= TOL
        assert _max_abs(net.reconstruct(pyramid), ref["rest_head_out"]) <= TOL


def test_hdssl_projections_are_registered_and_trained():
    net = _tiny_hdssl_net().train()
    keys = net.state_dict().keys()
    for level in range(5):
        assert f"scale_proj.{level}.weight" in keys
    assert ("scale_proj.0.bias" in keys) and ("scale_proj.1.bias" not in keys)  # the reference's bias pattern
    param_ids = {id(p) for p in net.parameters()}
    assert all(id(p) in param_ids for p in net.scale_proj.parameters())
    x = torch.rand(2, 1, 16, 16, 16)
    pyramid = net(x)
    voxels = torch.tensor([[0, 0, 0], [5, 9, 15], [15, 3, 8]])
    loss = net.project(net.voxel_vectors(pyramid, voxels)).sum() + net.reconstruct(pyramid).pow(2).mean()
    loss.backward()
    for module in (net.scale_proj, net.proj_head, net.rest_head, net.backbone.first_conv):
        for p in module.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


# ---- checkpoints -----------------------------------------------------------------------------------------
def _published_form(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # num_batches_tracked is int64 in real checkpoints (float32 in the npz)
    return {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in state.items()}


def test_vox2vec_simulated_checkpoint_loads_identically(tmp_path):
    path = tmp_path / "vox2vec_contrastive.pt"
    torch.save(_published_form(_tiny_state("vox2vec")), path)  # bare state_dict, no prefix
    loaded = load_published_checkpoint(path, "vox2vec", config={"base_channels": 1})
    assert isinstance(loaded, Vox2VecFPN) and not loaded.training
    x = torch.rand(1, 1, 17, 12, 9)
    with torch.no_grad():
        for a, b in zip(loaded(x), _tiny_net("vox2vec")(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("container", ["published", "lightning"])
def test_hdssl_simulated_checkpoint_loads_identically(tmp_path, container):
    state = _published_form(_tiny_state("hdssl"))
    if container == "lightning":  # raw LightningModule checkpoint: backbone.* plus the heads
        with np.load(DATA / "hdssl" / "tiny_heads_state.npz") as z:
            heads = {k: torch.from_numpy(z[k].copy()) for k in z.files if not k.startswith("scale_proj.")}
        state = {**{f"backbone.{k}": v for k, v in state.items()}, **_published_form(heads)}
    path = tmp_path / "hdssl_ct.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, path)
    loaded = load_published_checkpoint(path, "hdssl", config={"base_channels": 2})
    assert isinstance(loaded, HDSSLFPN)
    x = torch.rand(1, 1, 16, 11, 8)
    with torch.no_grad():
        for a, b in zip(loaded(x), _tiny_net("hdssl")(x)):
            assert torch.equal(a, b)
    embedder = load_published_embedder(path, "hdssl", config={"base_channels": 2})
    assert isinstance(embedder, HDSSLEmbedder) and embedder.fine_channels == 62


def test_aefm_simulated_checkpoint_loads_through_the_aefm_network(tmp_path):
    """``ckpt['net']`` with ``sam.`` keys plus a segmentation head that must be ignored (AEFM NOTES.md)."""
    tiny = DATA / "aefm" / "tiny_state.npz"  # the AEFM network's own test data
    if not tiny.exists():
        pytest.skip("Testing/data/aefm/tiny_state.npz not present")
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    with np.load(tiny) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    net = {f"sam.{k}": v for k, v in state.items()}
    net["fullconn_head.conv.weight"] = torch.zeros(14, 68, 1, 1, 1)
    path = tmp_path / "abdomen_foundation.pth"
    torch.save({"net": net, "epoch": 100, "optimizer": {"state": {}}}, path)
    config = {"widths": (4, 8, 16, 32), "feature_dim": 4}
    loaded = load_published_checkpoint(path, "aefm", config=config)
    direct = AEFMUNet(**config)
    direct.load_state_dict(state)
    x = torch.rand(1, 1, 16, 16, 32)
    with torch.no_grad():
        for a, b in zip(loaded(x), direct.eval()(x)):
            assert torch.equal(a, b)


def test_published_checkpoint_to_model_package(tmp_path):
    """The issue's path: downloaded checkpoint -> embedder -> .aemodel carrying the published model info."""
    from anatomical_embedding.inference.export import export_embedder, verify_parity

    ckpt = tmp_path / "vox2vec_contrastive.pt"
    torch.save(_published_form(_tiny_state("vox2vec")), ckpt)
    embedder = load_published_embedder(ckpt, "vox2vec", config={"base_channels": 1})
    package = export_embedder(embedder, published_model_info("vox2vec"), tmp_path / "vox2vec.aemodel")
    assert verify_parity(package, embedder, size_kji=(32, 64, 32)) <= TOL
    with zipfile.ZipFile(package) as z:
        card = json.loads(z.read("card.json"))
    assert card["method"] == "vox2vec" and card["spacing"] == [1.0, 1.0, 2.0]
    assert (card["intensity_preset"]["lower"], card["intensity_preset"]["upper"]) == (-1350.0, 1000.0)
    assert (card["fine_channels"], card["coarse_channels"], card["size_multiple"]) == (63, 56, 32)


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    vox = _published_form(_tiny_state("vox2vec"))
    aefm_like = tmp_path / "abdomen_foundation.pth"
    torch.save(
        {"net": {"sam.down_layer_1.conv.unit0.conv.weight": torch.zeros(2, 1, 3, 3, 3)}, "epoch": 1},
        aefm_like,
    )
    with pytest.raises(ValueError, match="AEFM checkpoint.*kind='aefm'"):
        load_published_checkpoint(aefm_like, "vox2vec")

    vox_path = tmp_path / "vox2vec.pt"
    torch.save(vox, vox_path)
    with pytest.raises(ValueError, match="not an AEFM checkpoint"):
        load_published_checkpoint(vox_path, "aefm")
    # A vox2vec FPN (6 scales) given as HDSSL (5 scales): the surplus level is listed as unexpected.
    with pytest.raises(ValueError, match=r"unexpected keys: .*left_blocks\.4\..*num_scales=6") as info:
        load_published_checkpoint(vox_path, "hdssl", config={"base_channels": 1})
    assert "missing keys" not in str(info.value)
    # Right kind, wrong size: every mismatching shape is reported.
    with pytest.raises(ValueError, match=r"shape mismatches: first_conv\.weight: file \(1, 1, 3, 3, 3\)"):
        load_published_checkpoint(vox_path, "vox2vec", config={"base_channels": 2})

    lightning = tmp_path / "hdssl.ckpt"
    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in _published_form(_tiny_state("hdssl")).items()}},
        lightning,
    )
    with pytest.raises(ValueError, match="not a vox2vec checkpoint.*base_channels=2, num_scales=5"):
        load_published_checkpoint(lightning, "vox2vec")

    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=1.0), **vox}, pickled)
    with pytest.raises(ValueError, match="weights-only"):
        load_published_checkpoint(pickled, "vox2vec", config={"base_channels": 1})
    with pytest.raises(FileNotFoundError):
        load_published_checkpoint(tmp_path / "missing.pt", "vox2vec")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_published_checkpoint(vox_path, "vox3vec")


# ---- embedders and layout -------------------------------------------------------------------------------
def test_embedder_shapes_norms_and_voxel_semantics():
    embedder = Vox2VecEmbedder(_tiny_net("vox2vec")).eval()
    assert (embedder.coarse_channels, embedder.fine_channels) == (8 + 16 + 32, 63)
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 64, 32)  # (N, 1, k, j, i) of an identity-direction LPS volume
    with torch.no_grad():
        coarse, fine = embedder(image)
        assert coarse.shape == (2, 56, 4, 8, 4) and fine.shape == (2, 63, 32, 64, 32)
        for out in (coarse, fine):
            torch.testing.assert_close(out.norm(dim=1), torch.ones_like(out[:, 0]), atol=1e-5, rtol=0)
        # fine at (k, j, i) is the normalised vox2vec vector of RAS voxel (x, y, z) = (I-1-i, J-1-j, k).
        kji = torch.tensor([[0, 0, 0], [31, 63, 31], [5, 40, 17], [20, 7, 30]])
        net_input = torch.flip(image.permute(0, 1, 4, 3, 2), dims=(2, 3))
        pyramid = embedder.backbone(net_input)
        xyz = torch.stack([31 - kji[:, 2], 63 - kji[:, 1], kji[:, 0]], dim=1)
        expected = torch.nn.functional.normalize(select_from_pyramid(pyramid, xyz), dim=2)
        got = fine[:, :, kji[:, 0], kji[:, 1], kji[:, 2]].transpose(1, 2)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        # coarse is the level>=3 part of the same vector, constant over each 8^3 block.
        coarse_expected = torch.nn.functional.normalize(select_from_pyramid(pyramid[3:], xyz // 8), dim=2)
        got = coarse[:, :, kji[:, 0] // 8, kji[:, 1] // 8, kji[:, 2] // 8].transpose(1, 2)
        torch.testing.assert_close(got, coarse_expected, atol=1e-6, rtol=1e-5)
        # the coarse-only path (decoder stopped at level 3) gives the same coarse map
        torch.testing.assert_close(embedder.forward_coarse(image), coarse, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        embedder(torch.rand(1, 1, 32, 32, 40))


@pytest.mark.parametrize(
    "size", [(16, 32, 8), (24, 20, 13)]
)  # tiling exactly (fast path) / ceil-sized levels
def test_normalized_concat_equals_normalising_the_concatenation(size):
    torch.manual_seed(0)
    pyramid = {
        level: torch.randn(2, 3 * (level + 1), *(-(-n // 2**level) for n in size)) for level in range(4)
    }
    for levels, base in (([0, 1, 2, 3], 0), ([2, 3], 2), ([1, 3], 0)):
        base_size = tuple(-(-n // 2**base) for n in size)
        plain = l2_normalize(concat_upsampled(pyramid, levels, base, base_size))
        torch.testing.assert_close(
            normalized_concat(pyramid, levels, base, base_size), plain, atol=1e-6, rtol=1e-5
        )
    # and the upsampling is the select_from_pyramid lookup v // 2**L
    voxels = torch.tensor([[0, 0, 0], [size[0] - 1, size[1] - 1, size[2] - 1], [5, 3, 7]])
    full = concat_upsampled(pyramid, [0, 1, 2, 3], 0, size)
    torch.testing.assert_close(
        full[:, :, voxels[:, 0], voxels[:, 1], voxels[:, 2]].transpose(1, 2),
        select_from_pyramid([pyramid[v] for v in range(4)], voxels),
        atol=0,
        rtol=0,
    )


def test_embedder_onnx_export_matches_torch_at_another_size():
    onnxruntime = pytest.importorskip("onnxruntime")
    import io as _io

    embedder = HDSSLEmbedder(_tiny_net("hdssl")).eval()
    buf = _io.BytesIO()
    axes = {2: "k", 3: "j", 4: "i"}
    with torch.no_grad():
        torch.onnx.export(
            embedder,
            (torch.rand(1, 1, 32, 32, 32),),
            buf,
            input_names=["image"],
            output_names=["coarse", "fine"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"image": axes, "coarse": axes, "fine": axes},
        )
    session = onnxruntime.InferenceSession(buf.getvalue())
    x = torch.rand(1, 1, 16, 48, 32)
    coarse, fine = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = embedder(x)
    np.testing.assert_allclose(coarse, expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(fine, expected[1].numpy(), atol=1e-5)


def test_embedder_class_attributes_describe_the_published_configuration():
    with torch.device("meta"):
        for cls in (Vox2VecEmbedder, HDSSLEmbedder):
            e = cls()
            assert (e.coarse_stride, e.size_multiple, e.coarse_channels, e.fine_channels) == (
                cls.coarse_stride,
                cls.size_multiple,
                cls.coarse_channels,
                cls.fine_channels,
            )
        assert Vox2VecEmbedder.fine_channels == VOX2VEC_INFO["embedding_dim"]
        assert HDSSLEmbedder.fine_channels == HDSSL_INFO["ct"]["embedding_dim"]


def test_hdssl_embedder_scale_proj_features():
    net = _tiny_hdssl_net()
    embedder = HDSSLEmbedder(net, features="scale_proj").eval()
    with torch.no_grad():
        coarse, fine = embedder(torch.rand(1, 1, 16, 32, 16))
    assert coarse.shape == (1, 64, 2, 4, 2) and fine.shape == (1, 160, 16, 32, 16)
    torch.testing.assert_close(fine.norm(dim=1), torch.ones_like(fine[:, 0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="features='backbone'"):
        HDSSLEmbedder(net.backbone, features="scale_proj")


def _oriented_volume(direction: np.ndarray, shape_kji=(6, 5, 4), spacing=(0.8, 1.3, 2.5)) -> io.Volume:
    rng = np.random.default_rng(1)
    return io.Volume(rng.normal(size=shape_kji).astype(np.float32), spacing, (10.0, -20.0, 30.0), direction)


# i -> +S, j -> -L (i.e. toward R), k -> -P (toward A): a permuted and flipped LPS direction.
ODD_DIRECTION = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("direction", [np.eye(3), ODD_DIRECTION, np.diag([-1.0, 1.0, -1.0])])
def test_layout_round_trip_matches_dicom_orient(direction):
    vol = _oriented_volume(direction)
    array, back = to_network_layout(vol, "RAS")
    # Same array as the recipe in NOTES.md: transpose(GetArrayFromImage(DICOMOrient(img, 'RAS')), (2, 1, 0)).
    reference = np.transpose(sitk.GetArrayFromImage(sitk.DICOMOrient(vol.to_sitk(), "RAS")), (2, 1, 0))
    np.testing.assert_array_equal(array, reference)
    np.testing.assert_array_equal(back(array), vol.array)
    torch.testing.assert_close(back(torch.from_numpy(array)), torch.from_numpy(vol.array), atol=0, rtol=0)
    # Network axis n increases toward R, A, S: step along it and look at the RAS world coordinates.
    layout = layout_for_direction(vol.direction, "RAS")
    index_grid = np.stack(
        np.meshgrid(*[np.arange(s) for s in vol.array.shape], indexing="ij")
    )  # (3, k, j, i)
    net_index = layout.to_network(index_grid)  # (3, x, y, z) holding the original (k, j, i) of each cell
    spacing_ijk = layout.network_spacing_to_ijk(VOX2VEC_INFO["spacing"])
    for n in range(3):
        a = [0, 0, 0]
        b = [0, 0, 0]
        b[n] = 1
        kji_a, kji_b = net_index[(slice(None), *a)], net_index[(slice(None), *b)]
        step = vol.index_to_world(kji_b[::-1].astype(float), "RAS") - vol.index_to_world(
            kji_a[::-1].astype(float), "RAS"
        )
        assert step[n] > 0 and np.allclose(np.delete(step, n), 0)
        # the array axis playing network axis n gets the network's spacing for that axis
        assert spacing_ijk[2 - layout.perm[n]] == VOX2VEC_INFO["spacing"][n]


def test_embedder_outputs_follow_the_volume_direction():
    """The same physical image stored with two different axis orders gives the same embedding per voxel."""
    embedder = Vox2VecEmbedder(_tiny_net("vox2vec")).eval()
    rng = np.random.default_rng(3)
    data = rng.random((32, 64, 32)).astype(np.float32)
    plain = io.Volume(data)  # identity direction
    # Re-store it: new array [k', j', i'] with i' = -k (flipped, so direction column i' = -S), j' = i, k' = j.
    stored = np.flip(np.transpose(data, (1, 2, 0)), axis=2).copy()  # [j, i, k reversed]
    odd = io.Volume(stored, direction=np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(to_network_layout(plain)[0], to_network_layout(odd)[0])
    with torch.no_grad():
        embedder.set_volume_layout(plain.direction)
        coarse_a, fine_a = embedder(torch.from_numpy(plain.array)[None, None])
        embedder.set_volume_layout(odd.direction)
        coarse_b, fine_b = embedder(torch.from_numpy(odd.array)[None, None])

    def relayout(t):
        return torch.flip(t.permute(0, 1, 3, 4, 2), dims=(4,))  # plain [k, j, i] -> odd [j, i, -k]

    torch.testing.assert_close(fine_b, relayout(fine_a), atol=1e-6, rtol=0)
    torch.testing.assert_close(coarse_b, relayout(coarse_a), atol=1e-6, rtol=0)


def test_oblique_direction_is_refused():
    angle = np.radians(35.0)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    with pytest.raises(ValueError, match="resample"):
        to_network_layout(_oriented_volume(rot))
    slight = np.radians(5.0)
    rot5 = np.array(
        [[np.cos(slight), -np.sin(slight), 0.0], [np.sin(slight), np.cos(slight), 0.0], [0, 0, 1.0]]
    )
    assert layout_for_direction(rot5).perm == (2, 1, 0)


def test_published_model_info_resolves_intensity_presets():
    vox = published_model_info("vox2vec")
    preset = io.get_preset(vox["intensity_preset"])
    assert (preset.lower, preset.upper, preset.out_min, preset.out_max) == (-1350.0, 1000.0, 0.0, 1.0)
    for modality in ("ct", "mri"):
        info = published_model_info("hdssl", modality)
        io.get_preset(info["intensity_preset"])
        io.get_preset(info["intensity_preset_repo"])
    assert io.get_preset(published_model_info("hdssl", "ct")["intensity_preset_repo"]).upper == 250.0
    with pytest.raises(ValueError):
        published_model_info("hdssl", "xray")
