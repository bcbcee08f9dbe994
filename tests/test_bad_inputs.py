"""Bad inputs, grouped by input class: every node input and every file reader gets BoLID's own, specific error.

The node groups discover their targets from NODE_CLASS_MAPPINGS and INPUT_TYPES, so a new node with an IMAGE,
MASK, FLOAT, BOLID_BODY_ID or BOLID_FACE_EMBEDS input is covered without editing this file. The file groups
load damaged and crafted files with each loader, including a bounded, fixed-seed fuzz of the safetensors
header. Every assertion expects a BoLID error type: none relies on a torch/numpy/OpenCV/onnxruntime/insightface
exception leaking out of a BoLID call.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import shutil
import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bolid.keypoints import PersonPose  # a plain record, read by duck typing

TESTS = Path(__file__).resolve().parent
TINY_ENCODER = {"latent_dim": 8, "crop_size": 16, "decoder_size": 8, "width": 4, "hidden": 16}
FUZZ_SEED = 1414
FUZZ_CASES = 120  # per file kind; the whole fuzz runs in a few seconds


def _helpers(name: str):
    """Builders of other test modules (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bolid_bad_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folders(tmp_path, install_folder_paths):
    """The stand-in folder_paths (so INPUT_TYPES, which lists model files, can run)."""
    install_folder_paths(tmp_path / "models")
    return tmp_path / "models"


def node_inputs(pack, kind: str) -> list[tuple[str, str]]:
    """(node id, input name) for every registered node input of socket type ``kind``."""
    out = []
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                if entry[0] == kind:
                    out.append((node_id, name))
    return out


def call_node(pack, node_id: str, **inputs):
    """Call a node's function with ``inputs`` and None for every other argument (the checks run first)."""
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    names = list(spec.get("required", {})) + list(spec.get("optional", {}))
    return getattr(cls(), cls.FUNCTION)(**{name: inputs.get(name) for name in names})


def title(pack, node_id: str) -> str:
    return pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def images(n: int = 3, h: int = 24, w: int = 20) -> torch.Tensor:
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# IMAGE inputs


def test_every_image_input_is_covered(pack, folders):
    covered = {node_id for node_id, _ in node_inputs(pack, "IMAGE")}
    assert {"BoLIDDetectBodyPose", "BoLIDEncodeFace", "BoLIDEncodeBodyFromImages"} <= covered


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_name_the_input_and_the_image(pack, folders, bad):
    errors = pack.bolid.validation
    for node_id, name in node_inputs(pack, "IMAGE"):
        batch = images()
        batch[1, 3:9, 2:7, 0] = bad  # part of image 2 only
        with pytest.raises(errors.InputValueError) as info:
            call_node(pack, node_id, **{name: batch})
        message = str(info.value)
        assert f"{title(pack, node_id)}: input '{name}'" in message
        assert "image 2 of 3 has 30 NaN or Inf values" in message


def test_several_images_with_nan_are_counted(pack, folders):
    batch = images(4)
    batch[0, 0, 0, 0] = batch[2, 0, 0, 1] = float("nan")
    with pytest.raises(pack.bolid.validation.InputValueError, match=r"image 1 of 4 .*\(2 of 4 items"):
        call_node(pack, "BoLIDEncodeFace", image=batch)


@pytest.mark.parametrize("shape, match", [
    ((1, 0, 20, 3), r"is empty \(0x20 pixels\)"),
    ((2, 20, 0, 3), r"is empty \(20x0 pixels\)"),
    ((1, 2, 700, 3), r"2x700 pixels \(aspect ratio 350:1\)"),
    ((1, 300, 1, 3), r"aspect ratio 300:1"),
])
def test_degenerate_shapes_are_refused_before_the_models(pack, folders, shape, match):
    for node_id, name in node_inputs(pack, "IMAGE"):
        with pytest.raises(pack.bolid.validation.InputValueError, match=match):
            call_node(pack, node_id, **{name: torch.zeros(shape)})


def test_photo_like_shapes_pass(pack):
    check = pack.nodes.validate.check_image_input
    for shape in ((1, 1, 1, 3), (2, 16, 256, 3), (1, 512, 32, 4), (1, 64, 48, 1)):
        check(torch.rand(shape), "x")


def test_pose_runner_refuses_an_empty_image_itself(tmp_path):
    """The bolid-level runner checks too (letterbox divided by zero before)."""
    from bolid.pose import PoseRunner
    from bolid.validation import InputValueError

    runner = PoseRunner(tiny_pose_onnx(tmp_path / "pose.onnx"), "CPU")
    assert runner.detect(np.zeros((40, 30, 3), np.uint8), conf=0.5) == [[]]
    with pytest.raises(InputValueError, match=r"image 2 of 2 is empty \(0x30 pixels\)"):
        runner.detect([np.zeros((40, 30, 3), np.uint8), np.zeros((0, 30, 3), np.uint8)])


# ----------------------------------------------------------------------------------------------------------------
# MASK inputs


def test_mask_with_nan_areas_is_refused(pack, folders):
    targets = node_inputs(pack, "MASK")
    assert ("BoLIDApplyAdapter", "attn_mask") in targets
    for node_id, name in targets:
        mask = torch.ones(2, 16, 16)
        mask[1, :4] = float("nan")
        with pytest.raises(pack.bolid.validation.InputValueError,
                           match=rf"input '{name}': mask 2 of 2 has 64 NaN or Inf values"):
            call_node(pack, node_id, **{name: mask})


# ----------------------------------------------------------------------------------------------------------------
# number widgets


def test_every_float_widget_refuses_nan_and_inf(pack, folders):
    targets = node_inputs(pack, "FLOAT")
    assert ("BoLIDApplyAdapter", "weight_body") in targets and ("BoLIDApplyAdapter", "weight_face") in targets
    for node_id, name in targets:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(pack.bolid.validation.InputValueError,
                               match=re.escape(f"{title(pack, node_id)}: input '{name}' is {bad}; it must be a finite")):
                call_node(pack, node_id, **{name: bad})


class _NewNode:
    """A node added later, whose INPUT_TYPES cannot run here (it lists files without ComfyUI)."""

    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI API name
        raise RuntimeError("BoLID nodes need ComfyUI's folder_paths module")

    def run(self, image, strength, **optional):
        return ("ran",)


def test_a_new_node_inherits_the_checks_even_without_its_input_types(pack):
    """install_input_checks (applied to every registered node) infers the socket types from the values."""
    validate = pack.nodes.validate
    validate.install_input_checks(_NewNode, "New Node")
    validate.install_input_checks(_NewNode, "New Node")  # idempotent
    assert _NewNode().run(images(2), 0.5) == ("ran",)
    batch = images(2)
    batch[1, 0, 0] = float("nan")
    with pytest.raises(pack.bolid.validation.InputValueError, match="New Node: input 'image': image 2 of 2"):
        _NewNode().run(batch, 0.5)
    with pytest.raises(pack.bolid.validation.InputValueError, match="New Node: input 'strength' is nan"):
        _NewNode().run(images(2), float("nan"))
    with pytest.raises(pack.bolid.errors.EmbeddingError, match="New Node: input 'body_id'"):
        _NewNode().run(images(2), 0.5, body_id=pack.bolid.identity.BodyID(torch.full((4,), 1e6)))


# ----------------------------------------------------------------------------------------------------------------
# identity inputs (BOLID_BODY_ID, BOLID_FACE_EMBEDS)


def _forged_body_id(pack, value: torch.Tensor):
    """A Body ID whose vector bypassed the constructor's check (another pack version, a custom node...)."""
    body = pack.bolid.identity.BodyID(torch.zeros(value.numel()))
    object.__setattr__(body, "c_body", value)
    return body


def test_body_identity_inputs_refuse_nan_and_absurd_magnitudes(pack, folders):
    targets = node_inputs(pack, "BOLID_BODY_ID")
    assert {"BoLIDApplyAdapter", "BoLIDSaveBodyID", "BoLIDBlendBodyIDs"} <= {t[0] for t in targets}
    embedding_error = pack.bolid.errors.EmbeddingError
    for node_id, name in targets:
        with pytest.raises(embedding_error, match=rf"input '{name}': body identity c_body has an RMS value of 1e"):
            call_node(pack, node_id, **{name: pack.bolid.identity.BodyID(torch.full((16,), 1e30))})
        with pytest.raises(embedding_error, match=r"c_body contains NaN or Inf"):
            call_node(pack, node_id, **{name: _forged_body_id(pack, torch.tensor([0.0, float("nan")]))})


def test_face_embedding_inputs_refuse_nan_and_unnormalised_vectors(pack, folders):
    targets = node_inputs(pack, "BOLID_FACE_EMBEDS")
    assert ("BoLIDApplyAdapter", "face_embeds") in targets
    face_embeds = pack.bolid.identity.FaceEmbeds
    for node_id, name in targets:
        raw = torch.randn(512, generator=torch.Generator().manual_seed(1))
        raw = raw / raw.norm() * 23.0  # a raw ArcFace output, not normalised
        with pytest.raises(pack.bolid.errors.EmbeddingError, match=r"face embedding has norm 23; .*normalise it"):
            call_node(pack, node_id, **{name: face_embeds(raw)})
        forged = face_embeds(torch.ones(512) / 512 ** 0.5)
        object.__setattr__(forged, "embedding", torch.full((512,), float("inf")))
        with pytest.raises(pack.bolid.errors.EmbeddingError, match="contains NaN or Inf"):
            call_node(pack, node_id, **{name: forged})


def test_typical_identities_pass():
    from bolid.body_id_io import sample_body_id
    from bolid.validation import check_body_vector, check_face_vector

    check_body_vector(sample_body_id(128, seed=3, temperature=3.0).c_body)  # Sample Body ID's maximum
    check_face_vector(torch.nn.functional.normalize(torch.randn(512), dim=0))


class _StandInPatcher:
    """The part of ComfyUI's ModelPatcher that Apply BoLID Adapter uses."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet, self.model_options = unet, {"transformer_options": {}}

    def clone(self):
        return self

    def get_model_object(self, name: str):
        sampling = types.SimpleNamespace(percent_to_sigma=lambda p: 0.0 if p >= 1.0 else 14.6 * (1.0 - p) ** 2)
        return {"diffusion_model": self.unet, "model_sampling": sampling}[name]

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        replace = self.model_options["transformer_options"].setdefault("patches_replace", {})
        replace.setdefault("attn2", {})[(block_name, number, transformer_index)] = patch


def _one_layer_unet(hidden: int = 8, ctx: int = 16) -> nn.Module:
    block = nn.Module()
    block.attn2 = nn.Module()
    block.attn2.to_k = nn.Linear(ctx, hidden, bias=False)
    spatial = nn.Module()
    spatial.transformer_blocks = nn.ModuleList([block])
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList([nn.Sequential(spatial)])
    unet.middle_block = nn.Sequential()
    unet.output_blocks = nn.ModuleList()
    return unet


def test_body_id_without_encoder_hash_on_a_hashed_adapter_warns_naming_both(pack, folders, caplog):
    config = pack.bolid.config.AdapterConfig(context_dim=16, hidden_sizes=(8,), body_dim=12, face_tokens=2,
                                             body_tokens=2)
    adapter = pack.bolid.adapter.BoLIDAdapter(config)
    nodes = pack.nodes.adapter_nodes
    loaded = nodes.LoadedAdapter(adapter, "bolid_sd.safetensors", None, body_encoder_hash="0123abcd0123abcd")
    apply = nodes.ApplyBoLIDAdapter()
    unhashed = pack.bolid.identity.BodyID(torch.randn(12))
    with caplog.at_level(logging.WARNING, logger="bolid"):
        apply.apply(_StandInPatcher(_one_layer_unet()), loaded, 0.8, 0.8, 0.0, 1.0, body_id=unhashed)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "records no Body-ID encoder hash" in warning[0]
    assert "bolid_sd.safetensors" in warning[0] and "0123abcd0123abcd" in warning[0]
    caplog.clear()
    hashed = pack.bolid.identity.BodyID(torch.randn(12), encoder_hash="0123abcd0123abcd")
    with caplog.at_level(logging.WARNING, logger="bolid"):
        apply.apply(_StandInPatcher(_one_layer_unet()), loaded, 0.8, 0.8, 0.0, 1.0, body_id=hashed)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------------------------------------------
# messages that say the actual reason


def _person(x0: float) -> PersonPose:
    kp = np.zeros((17, 3), dtype=np.float32)
    for i in range(17):
        kp[i] = (x0 + (i % 3) * 4, 5 + i * 5, 0.9)
    return PersonPose(box=np.array([x0 - 4, 0, x0 + 14, 95], np.float32), score=0.9, keypoints=kp)


class _TwoPeopleEverywhere:
    def detect(self, frames):
        return [[_person(10), _person(50)] for _ in frames]


def test_several_people_skips_say_so_not_no_person(pack):
    be = pack.bolid.body_encoder
    torch.manual_seed(0)
    encoder = be.BodyEncoder(be.BodyEncoderConfig(**TINY_ENCODER)).eval()
    digest = pack.bolid.body_encoder_io.encoder_hash(encoder)
    loaded = pack.nodes.body_nodes.LoadedBodyEncoder(model=encoder, hash=digest, name="e")
    node = pack.nodes.body_nodes.EncodeBodyFromImages()
    with pytest.raises(pack.bolid.body_encode.BodyEncodeError) as info:
        node.encode(loaded, _TwoPeopleEverywhere(), images(2, 100, 80), 0.3, "skip the image")
    message = str(info.value)
    assert "image 1 of 2: several people (2 detected" in str(info.value)
    assert "several_people is 'skip the image'" in message
    assert "no person detected" not in message and "lower the minimum confidence" not in message
    assert "crop the photos to one person" in message
    (body_id, _) = node.encode(loaded, _TwoPeopleEverywhere(), images(2, 100, 80), 0.3, "use the largest")
    assert len(body_id.views) == 2


@pytest.mark.parametrize("name", ["my_body\n", "my_body ", " my_body", "my\tbody", "my\x00body", "my_body\r",
                                  "my_body.safetensors\n", "my\u200bbody\x7f"])
def test_body_id_names_with_whitespace_or_control_characters_are_refused(tmp_path, name):
    from bolid.body_id_io import BodyIDFileError, body_id_path

    with pytest.raises(BodyIDFileError, match="is not allowed|whitespace or holds a control character"):
        body_id_path(tmp_path, name)
    assert body_id_path(tmp_path, "my body").name == "my body.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# ONNX model files (pose, InsightFace)


def tiny_pose_onnx(path: Path, metadata: dict[str, str] | None = None, length: int = -1) -> Path:
    """A static 64x64 'YOLO pose' graph (zero scores: nobody found) with ultralytics-style metadata.

    ``length`` is the anchor count the output is reshaped to (-1: all 4096; another value fails at run time).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((56, 3, 1, 1), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 56, length], np.int64), "s")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"]), helper.make_node("Reshape", ["c", "s"], ["output0"])],
        "pose", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 56, 4096])], [weight, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"task": "pose", "kpt_shape": "[17, 3]", "names": "{0: 'person'}", "stride": "32", "imgsz": "[64, 64]"}
    for key, value in {**meta, **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("metadata, match", [
    ({"kpt_shape": "5"}, r"cannot be read as a YOLO pose ONNX export \(TypeError"),
    ({"stride": "'abc'"}, r"cannot be read as a YOLO pose ONNX export \(ValueError"),
    ({"stride": "0"}, "are not those of a YOLO pose export"),
    ({"task": "detect"}, "is a YOLO 'detect' model, not a pose model"),
    ({"kpt_shape": "[5, 2]"}, "BoLID needs COCO-17"),
])
def test_pose_model_with_crafted_metadata(tmp_path, metadata, match):
    from bolid.pose import PoseModelError, PoseRunner

    with pytest.raises(PoseModelError, match=match):
        PoseRunner(tiny_pose_onnx(tmp_path / "crafted.onnx", metadata), "CPU")


@pytest.mark.parametrize("content", [b"", b"garbage" * 50, b"\x08\x07\x12\x00" + bytes(range(256))])
def test_damaged_pose_model(tmp_path, content):
    from bolid.pose import PoseModelError, PoseRunner

    path = tmp_path / "damaged.onnx"
    path.write_bytes(content)
    with pytest.raises(PoseModelError, match="damaged.onnx"):
        PoseRunner(path, "CPU")


def test_pose_model_that_loads_but_does_not_run(tmp_path):
    from bolid.pose import PoseModelError, PoseRunner

    runner = PoseRunner(tiny_pose_onnx(tmp_path / "broken.onnx", length=5000), "CPU")
    with pytest.raises(PoseModelError, match=r"pose model .*broken.onnx failed to run"):
        runner.detect(np.zeros((40, 30, 3), np.uint8))


def test_missing_model_file_is_a_bolid_error(pack, folders):
    with pytest.raises(pack.bolid.errors.BoLIDError, match=r"'gone.onnx' not found in the 'bolid_pose' folders"):
        pack.nodes.perception_nodes.LoadPoseModel().load("gone.onnx", "CPU")


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory) -> Path:
    return _helpers("test_face").build_tiny_pack(tmp_path_factory.mktemp("insightface") / "tinypack")


@pytest.mark.parametrize("victim, content", [
    ("w600k_r50.onnx", b"garbage" * 50),
    ("det_10g.onnx", b""),
    ("w600k_r50.onnx", "truncate"),
])
def test_damaged_insightface_model_names_the_file(tmp_path, face_pack, victim, content):
    from bolid.face import FaceAnalyzer, FaceModelError

    folder = tmp_path / "pack"
    shutil.copytree(face_pack, folder)
    target = folder / victim
    target.write_bytes(target.read_bytes()[:300] if content == "truncate" else content)
    with pytest.raises(FaceModelError) as info:
        FaceAnalyzer(folder, "CPU")
    message = str(info.value)
    assert f"InsightFace model file {target} is damaged or not an ONNX model" in message
    other = ({"w600k_r50.onnx", "det_10g.onnx"} - {victim}).pop()
    assert other not in message.split("(")[0]


def test_extreme_face_image_is_refused_not_an_opencv_assertion(pack, folders, face_pack):
    analyzer = pack.bolid.face.FaceAnalyzer(face_pack, "CPU")
    with pytest.raises(pack.bolid.validation.InputValueError, match="aspect ratio 300:1"):
        pack.nodes.perception_nodes.EncodeFace().encode(analyzer, torch.zeros(1, 1, 300, 3), "skip")


# ----------------------------------------------------------------------------------------------------------------
# safetensors files (adapter, Body-ID encoder, Body ID): crafted headers and a bounded fuzz


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, tuple]:
    """kind -> (bytes of a valid file, loader, the loader's error type)."""
    from bolid.adapter import BoLIDAdapter
    from bolid.adapter_io import load_adapter, save_adapter
    from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
    from bolid.body_encoder_io import BodyEncoderFileError, load_body_encoder, save_body_encoder
    from bolid.body_id_io import BodyIDFileError, load_body_id, save_body_id
    from bolid.config import AdapterConfig
    from bolid.errors import AdapterFileError
    from bolid.identity import BodyID

    folder = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    save_adapter(BoLIDAdapter(AdapterConfig(context_dim=8, hidden_sizes=(8, 16), body_dim=6, face_embed_dim=4,
                                            face_tokens=1, body_tokens=1, proj_mult=1)), folder / "a.safetensors")
    save_body_encoder(BodyEncoder(BodyEncoderConfig(**TINY_ENCODER)), folder / "e.safetensors")
    save_body_id(BodyID(torch.randn(8), logvar=torch.zeros(8), views=("image 1 of 2", "image 2 of 2"),
                        view_weights=(0.5, 0.75), encoder_hash="abc"), folder / "b.safetensors")
    return {
        "adapter": ((folder / "a.safetensors").read_bytes(), load_adapter, AdapterFileError),
        "encoder": ((folder / "e.safetensors").read_bytes(), load_body_encoder, BodyEncoderFileError),
        "body_id": ((folder / "b.safetensors").read_bytes(), load_body_id, BodyIDFileError),
    }


def _load_expecting_own_error(kind, valid_files, path: Path, data: bytes) -> str | None:
    """Write ``data`` and load it; only success or the loader's own error naming the file is acceptable."""
    _, loader, error = valid_files[kind]
    path.write_bytes(data)
    try:
        loader(path)
    except error as exc:
        assert path.name in str(exc), f"{kind}: the error does not name the file: {exc}"
        return str(exc)
    return None


SAME_SIZE_INT = {"F16": "I16", "BF16": "I16", "F32": "I32", "F64": "I64"}


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _structured_cases(header: dict, body: bytes) -> dict[str, bytes]:
    key = _first_tensor(header)
    entry = header[key]

    def with_entry(**changes):
        return _join({**header, key: {**entry, **changes}}, body)

    def without(field):
        return _join({**header, key: {k: v for k, v in entry.items() if k != field}}, body)

    meta = header.get("__metadata__", {})
    second = next(k for k in header if k not in ("__metadata__", key))
    return {
        "header is a list": _join([header], body),
        "header is a string": _join("x", body),
        "header is null": _join(None, body),
        "entry is a list": _join({**header, key: [1, 2]}, body),
        "entry without data_offsets": without("data_offsets"),
        "entry without dtype": without("dtype"),
        "entry without shape": without("shape"),
        "offsets of one value": with_entry(data_offsets=[0]),
        "negative offsets": with_entry(data_offsets=[-4, 0]),
        "offsets are strings": with_entry(data_offsets=["0", "4"]),
        "offsets are booleans": with_entry(data_offsets=[False, True]),
        "offsets reversed": with_entry(data_offsets=entry["data_offsets"][::-1]),
        "offsets beyond the file": with_entry(data_offsets=[10 ** 12, 10 ** 12 + 4]),
        "offsets overlap": _join({**header, second: {**header[second], "data_offsets": entry["data_offsets"]}},
                                 body),
        "unknown dtype": with_entry(dtype="F128"),
        "dtype not a string": with_entry(dtype=4),
        "dtype of another size": with_entry(dtype="F16" if entry["dtype"] != "F16" else "F32"),
        "integer dtype of the same size": with_entry(dtype=SAME_SIZE_INT[entry["dtype"]]),
        "shape negative": with_entry(shape=[-1]),
        "shape huge": with_entry(shape=[2 ** 40, 2 ** 40]),
        "shape a number": with_entry(shape=7),
        "metadata a list": _join({**header, "__metadata__": ["a"]}, body),
        "metadata value a number": _join({**header, "__metadata__": {**meta, "bolid_kind": 3}}, body),
        "header length huge": struct.pack("<Q", 2 ** 63) + _join(header, body)[8:],
        "header length zero": struct.pack("<Q", 0) + _join(header, body)[8:],
        "header not UTF-8": _join(b'{"\xff\xfe": 1}', body),
        "deeply nested JSON": _join(b"[" * 100_000 + b"]" * 100_000, body),
        "trailing bytes": _join(header, body + b"\0" * 16),
        "truncated data": _join(header, body[:-3]),
        "only 5 bytes": b"\x01\x02\x03\x04\x05",
        "empty file": b"",
    }


def _metadata_cases(kind: str, header: dict, body: bytes) -> dict[str, bytes]:
    meta = dict(header["__metadata__"])

    def with_meta(**changes):
        return _join({**header, "__metadata__": {**meta, **changes}}, body)

    nested = "[" * 50_000 + "]" * 50_000
    cases = {"version not a number": with_meta(bolid_format_version="one"),
             "JSON metadata deeply nested": with_meta(bolid_config=nested, bolid_views=nested)}
    if kind in ("adapter", "encoder"):
        config = json.loads(meta["bolid_config"])
        dims = "hidden_sizes" if kind == "adapter" else "latent_dim"
        huge = [10 ** 12, 10 ** 12] if kind == "adapter" else 10 ** 12
        cases.update({
            "config a list": with_meta(bolid_config="[1, 2]"),
            "config infinite size": with_meta(bolid_config=json.dumps({**config, dims: [1e400]})),
            "config negative size": with_meta(bolid_config=json.dumps({**config, dims: [-8, -8]})),
            "config huge size": with_meta(bolid_config=json.dumps({**config, dims: huge})),
        })
    else:
        cases.update({
            "dim not a number": with_meta(bolid_body_dim="eight"),
            "dim wrong": with_meta(bolid_body_dim="9"),
            "views an object": with_meta(bolid_views='{"a": 1}'),
            "views of numbers": with_meta(bolid_views="[1, 2]"),
            "extra a list": with_meta(bolid_extra="[]"),
        })
    return cases


@pytest.mark.parametrize("kind", ["adapter", "encoder", "body_id"])
def test_crafted_safetensors_headers_give_the_loaders_own_error(tmp_path, valid_files, kind):
    data = valid_files[kind][0]
    header, body = _split(data)
    assert _load_expecting_own_error(kind, valid_files, tmp_path / f"{kind}.safetensors", data) is None
    cases = {**_structured_cases(header, body), **_metadata_cases(kind, header, body)}
    for name, crafted in cases.items():
        message = _load_expecting_own_error(kind, valid_files, tmp_path / f"{kind}.safetensors", crafted)
        assert message is not None, f"{kind}: crafted file '{name}' was accepted"


def test_specific_messages_for_header_structure(tmp_path, valid_files):
    header, body = _split(valid_files["adapter"][0])
    key = _first_tensor(header)
    expect = {
        "header is a list": "the header is a JSON list, not an object",
        "entry without data_offsets": f"tensor '{key}' has data_offsets None",
        "offsets overlap": "overlapping or gapped tensors",
        "unknown dtype": "has dtype 'F128'",
        "integer dtype of the same size": "BoLID weights are floating point",
        "header length huge": "not a safetensors file, or truncated",
        "deeply nested JSON": "corrupt safetensors header (RecursionError",
        "trailing bytes": "16 unexpected bytes after the tensor data",
        "truncated data": "truncated",
    }
    cases = _structured_cases(header, body)
    for name, fragment in expect.items():
        message = _load_expecting_own_error("adapter", valid_files, tmp_path / "a.safetensors", cases[name])
        assert fragment in message, (name, message)


_FUZZ_VALUES = [None, True, -1, 0, 1, 3, 2 ** 31, 2 ** 64, 1e308, -0.5, "", "x", "F32", "I64", [], [0], [0, 0],
                [1, 2, 3], [-1, 4], {}, {"a": "b"}, [[0]]]


def _mutate_json(value, rng: random.Random):
    """Replace one randomly chosen node of the parsed header with a value from _FUZZ_VALUES, or drop a key."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        choice = rng.random()
        if choice < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if choice < 0.3 and isinstance(value[key], str) and value[key][:1] in "[{":
            try:  # metadata values that hold JSON (configs, views) get mutated inside too
                return {**value, key: json.dumps(_mutate_json(json.loads(value[key]), rng))}
            except ValueError:
                pass
        return {**value, key: _mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_json(value[i], rng)] + value[i + 1:]
    return rng.choice(_FUZZ_VALUES)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8])
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(0, 8 + n + 1)  # mostly the length and the header
        if op < 0.6 and pos < len(out):
            out[pos] = rng.randrange(256)
        elif op < 0.8:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del out[pos:pos + rng.randint(1, 16)]
    return bytes(out)


@pytest.mark.parametrize("kind", ["adapter", "encoder", "body_id"])
def test_fuzz_safetensors_header_reader(tmp_path, valid_files, kind):
    """Fixed-seed random and structured mutations: each load succeeds or raises the loader's own error."""
    rng = random.Random(f"{FUZZ_SEED}-{kind}")
    data = valid_files[kind][0]
    header, body = _split(data)
    refused = 0
    for case in range(FUZZ_CASES):
        if case % 2:
            mutated = _mutate_bytes(data, rng)
        else:
            mutated = _join(_mutate_json(header, rng), body)
        refused += _load_expecting_own_error(kind, valid_files, tmp_path / f"fuzz_{kind}.safetensors",
                                             mutated) is not None
    assert refused > FUZZ_CASES // 2  # the mutations do reach the checks


def test_atomic_writes_leave_readable_files_and_no_temp_files(tmp_path):
    """mkstemp makes 0600 files; a saved Body ID or adapter must get the mode a plain open() gives (umask), so a
    ComfyUI running as another user can read it, and no temp file may stay behind."""
    import os
    import stat

    import torch

    from bolid.safetensors_io import atomic_save_safetensors, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors", {"kind": "test"})
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.json"]
