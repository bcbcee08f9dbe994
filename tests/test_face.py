"""The face runner (SCRFD + ArcFace on plain onnxruntime) against InsightFace's own pipeline.

Stand-in packs are tiny ONNX networks with the signatures InsightFace routes (a 9-output SCRFD, a 112x112
ArcFace): ``tinypack`` finds bright squares; ``texturepack`` fires on textured regions of real photos (dozens of
overlapping candidates per photo, so NMS, anchor decoding and the letterbox all matter) and its recogniser is
sensitive to the alignment. Set ``BOLID_INSIGHTFACE_PACK=/path/to/antelopev2`` (or buffalo_l) to run the
equivalence test on a real pack too. insightface is a test dependency only; BoLID itself never imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bolid.face import (
    ArcFaceRecognizer,
    FaceAnalyzer,
    FaceModelError,
    NoFaceError,
    SCRFDDetector,
    average_embeddings,
    check_face_model_dir,
    face_model_dir,
    nms,
    similarity_transform,
)
from bolid.identity import FaceEmbeds

STRIDES = (8, 16, 32)


class TinySCRFD(nn.Module):
    """SCRFD's signature (9 outputs: scores, boxes, 5 landmarks at strides 8/16/32, 2 anchors each).

    A cell scores high when it is bright (InsightFace feeds (pixel - 127.5) / 128): a white square on black is a
    "face", a black image has none. Boxes are 2 strides around the cell centre; landmarks a fixed face-like
    pattern, so the ArcFace alignment gets a proper similarity transform.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("box", torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
        self.register_buffer("pattern", torch.tensor([[-0.6, -0.5, 0.6, -0.5, 0.0, 0.1, -0.5, 0.7, 0.5, 0.7]]))

    def forward(self, x: torch.Tensor):
        grey = x.mean(dim=1, keepdim=True)
        scores, boxes, kps = [], [], []
        for s in STRIDES:
            cell = nn.functional.avg_pool2d(grey, kernel_size=s, stride=s)  # [1,1,h,w]
            logit = 20.0 * (cell - 0.9)
            pair = torch.cat([logit, logit - 0.5], dim=1)  # two anchors
            scores.append(torch.sigmoid(pair).permute(0, 2, 3, 1).reshape(-1, 1))
            # box half-size grows with the bright area around the cell, so a bigger square is a bigger face
            bright = nn.functional.avg_pool2d((cell + 1) / 2, 5, stride=1, padding=2, count_include_pad=True)
            size = (0.5 + 3.0 * bright).repeat(1, 2, 1, 1).permute(0, 2, 3, 1).reshape(-1, 1)
            boxes.append(size * self.box / 2)
            kps.append(size * self.pattern)
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    """112x112 -> 512, content dependent (pooled pixels through a fixed random projection)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 8 * 8, 512, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return pooled @ self.proj + 0.1


class TextureSCRFD(nn.Module):
    """SCRFD signature that fires on textured regions of real photos: many overlapping candidates of varied,
    asymmetric box sizes and landmark layouts (a seeded random convolution; scores normalised per image)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.feat = nn.Conv2d(3, 15, 3, padding=1)

    def forward(self, x: torch.Tensor):
        scores, boxes, kps = [], [], []
        for s in STRIDES:
            f = self.feat(nn.functional.avg_pool2d(x, kernel_size=s, stride=s))
            z = f[:, :1]
            z = (z - z.mean()) / (z.std() + 1e-6)
            pair = torch.cat([3.0 * z - 10.0, 3.0 * z - 10.5], dim=1)  # two anchors, the top ~0.5% of cells
            scores.append(torch.sigmoid(pair).permute(0, 2, 3, 1).reshape(-1, 1))
            box = 0.8 + 2.0 * torch.sigmoid(f[:, 1:5])
            boxes.append(box.repeat(1, 2, 1, 1).permute(0, 2, 3, 1).reshape(-1, 4))
            pts = 1.5 * torch.tanh(f[:, 5:15])
            kps.append(pts.repeat(1, 2, 1, 1).permute(0, 2, 3, 1).reshape(-1, 10))
        return (*scores, *boxes, *kps)


class SharpArcFace(nn.Module):
    """112x112 -> 512 from strided convolutions: a one-pixel shift of the crop changes the embedding."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(14), nn.Flatten(),
                                 nn.Linear(8 * 14 * 14, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _export(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str], dynamic: dict) -> None:
    torch.onnx.export(model, (example,), str(path), input_names=["input.1"], output_names=outputs,
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)


def build_tiny_pack(folder: Path, texture: bool = False) -> Path:
    """A model-pack folder with a tiny detector and recogniser (the file names of buffalo_l); ``texture``: the
    stand-ins that fire on real photos (TextureSCRFD, SharpArcFace)."""
    folder.mkdir(parents=True, exist_ok=True)
    outs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    _export(TextureSCRFD() if texture else TinySCRFD(), torch.zeros(1, 3, 640, 640), folder / "det_10g.onnx", outs,
            {"input.1": {2: "h", 3: "w"}, **{o: {0: "n"} for o in outs}})
    _export(SharpArcFace() if texture else TinyArcFace(), torch.zeros(1, 3, 112, 112), folder / "w600k_r50.onnx",
            ["embedding"], {"input.1": {0: "b"}, "embedding": {0: "b"}})
    return folder


def face_photo(size: tuple[int, int], square: tuple[int, int, int], seed: int) -> np.ndarray:
    """RGB photo: dark noise with one white square (x, y, side) carrying a faint texture of its own."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    x, y, side = square
    img[y:y + side, x:x + side] = rng.integers(235, 256, (side, side, 3), dtype=np.uint8)
    return img


@pytest.fixture(scope="session")
def pack_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    build_tiny_pack(root / "models" / "tinypack")
    return root


@pytest.fixture(scope="session")
def analyzer(pack_root) -> FaceAnalyzer:
    return FaceAnalyzer(face_model_dir(pack_root, "tinypack"), provider="CPU")


def test_routes_the_tiny_models(analyzer):
    assert isinstance(analyzer.detector, SCRFDDetector) and analyzer.detector.use_kps
    assert analyzer.detector.strides == (8, 16, 32) and analyzer.detector.num_anchors == 2
    assert isinstance(analyzer.recognizer, ArcFaceRecognizer) and analyzer.recognizer.input_size == 112
    assert (analyzer.recognizer.input_mean, analyzer.recognizer.input_std) == (127.5, 127.5)
    assert analyzer.provider == "CPUExecutionProvider"
    assert "det_10g.onnx + w600k_r50.onnx" in analyzer.describe()


def _insightface_app(folder: Path):
    insightface = pytest.importorskip("insightface.app")
    app = insightface.FaceAnalysis(name=str(folder.resolve()), allowed_modules=["detection", "recognition"],
                                   providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(640, 640))
    return app


def test_largest_face_and_embedding_match_insightface(analyzer, pack_root):
    img = face_photo((480, 640), (300, 100, 200), seed=1)
    img[20:80, 20:80] = 250  # a second, smaller face
    face = analyzer.largest_face(img)
    assert face is not None and face.det_size == 640
    x1, y1, x2, y2 = face.bbox
    assert x1 < 500 and x2 > 300 and y1 < 300 and y2 > 100, face.bbox  # on the big square, not the small one
    # InsightFace's own pipeline on the same (BGR) image finds that face and the same embedding
    theirs = _insightface_app(pack_root / "models" / "tinypack").get(np.ascontiguousarray(img[..., ::-1]))
    assert len(theirs) >= 2
    big = max(theirs, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    np.testing.assert_allclose(face.bbox, big.bbox, atol=1e-3)
    emb = analyzer.embed_one(img)
    assert emb.shape == (512,) and abs(np.linalg.norm(emb) - 1.0) < 1e-5
    np.testing.assert_allclose(emb, big.normed_embedding, atol=1e-5)


def test_embeddings_average_and_renormalise(analyzer):
    a = face_photo((400, 400), (100, 100, 160), seed=2)
    b = face_photo((500, 300), (40, 200, 180), seed=3)
    b[200:380, 40:220] //= 2
    b[200:380, 40:220] += 127  # grey-ish texture: a different embedding, still bright enough to be a face
    ea, eb = analyzer.embed_one(a), analyzer.embed_one(b)
    assert ea is not None and eb is not None and float(ea @ eb) < 0.9999
    result = analyzer.embed([a, b])
    assert isinstance(result, FaceEmbeds) and result.num_images == 2 and result.source == "insightface:tinypack"
    expected = (ea + eb) / np.linalg.norm(ea + eb)
    np.testing.assert_allclose(result.embedding.numpy(), expected, atol=1e-5)
    assert abs(float(result.embedding.norm()) - 1.0) < 1e-5
    as_float = analyzer.embed(a.astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_float.embedding.numpy(), ea, atol=1e-5)


def test_no_face_policy(analyzer):
    face = face_photo((300, 300), (50, 50, 150), seed=4)
    blank = np.zeros((300, 300, 3), np.uint8)
    with pytest.raises(NoFaceError, match="image 2 of 3"):
        analyzer.embed([face, blank, face])
    with pytest.raises(NoFaceError, match="holiday.jpg"):
        analyzer.embed([blank], names=["holiday.jpg"])
    skipped = analyzer.embed([face, blank], no_face="skip")
    assert skipped.num_images == 1
    np.testing.assert_allclose(skipped.embedding.numpy(), analyzer.embed_one(face), atol=1e-6)
    with pytest.raises(NoFaceError, match="any of the 2 images"):
        analyzer.embed([blank, blank], no_face="skip")
    with pytest.raises(ValueError):
        analyzer.embed([face], no_face="ignore")


def test_detection_size_retry(analyzer, monkeypatch):
    """A detector that finds nothing at large sizes: the runner goes down the sizes and uses the first hit."""
    real = analyzer.detector.detect
    tried = []

    def picky(img, size):
        tried.append(size)
        bboxes, kpss = real(img, size)
        if size > 384:
            return bboxes[:0], kpss[:0]
        return bboxes, kpss

    monkeypatch.setattr(analyzer.detector, "detect", picky)
    face = analyzer.largest_face(face_photo((400, 400), (100, 100, 160), seed=5))
    assert face is not None and face.det_size == 384
    assert tried == [640, 512, 384]
    tried.clear()
    assert analyzer.largest_face(np.zeros((200, 200, 3), np.uint8)) is None
    assert tried == [640, 512, 384, 256]


def test_missing_folder_is_immediate_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FaceModelError, match=r"not found: .*antelopev2.*glintr100\.onnx.*does not download"):
        FaceAnalyzer(face_model_dir(tmp_path, "antelopev2"))
    empty = tmp_path / "models" / "buffalo_l"
    empty.mkdir(parents=True)
    (empty / "buffalo_l").mkdir()  # the classic nested-zip mistake
    with pytest.raises(FaceModelError, match="no .onnx files"):
        check_face_model_dir(empty)
    assert not (tmp_path / "home").exists()


def test_folder_without_recogniser(tmp_path, pack_root):
    only_det = tmp_path / "models" / "detonly"
    only_det.mkdir(parents=True)
    (only_det / "det_10g.onnx").write_bytes((pack_root / "models" / "tinypack" / "det_10g.onnx").read_bytes())
    with pytest.raises(FaceModelError, match="no ArcFace recogniser"):
        FaceAnalyzer(only_det, provider="CPU")


def test_average_embeddings_units():
    a = np.array([3.0, 0.0, 0.0])
    b = np.array([0.0, 0.0, 0.5])
    np.testing.assert_allclose(average_embeddings([a, b]), np.array([1, 0, 1]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(average_embeddings([a]), [1, 0, 0])


# --- equivalence with InsightFace's own pipeline on real photos -----------------------------------------------


def _real_photos() -> dict[str, np.ndarray]:
    from test_pose import _photos

    return _photos()


def _equivalence_packs(root: Path) -> list[Path]:
    import os

    packs = [build_tiny_pack(root / "texturepack", texture=True), build_tiny_pack(root / "tinypack")]
    real = os.environ.get("BOLID_INSIGHTFACE_PACK")
    if real:
        packs.append(Path(real))
    return packs


def test_equals_insightface_on_real_photos(tmp_path):
    """Every detection (box, score, 5 landmarks) and every embedding equal InsightFace's SCRFD / ArcFaceONNX /
    FaceAnalysis on four real photos at two detection sizes: boxes and landmarks within 1 px, cosine >= 0.999."""
    model_zoo = pytest.importorskip("insightface.model_zoo")
    photos = _real_photos()
    compared = 0
    for folder in _equivalence_packs(tmp_path):
        ours = FaceAnalyzer(folder, provider="CPU")
        app = _insightface_app(folder)
        their_det, their_rec = app.models["detection"], app.models["recognition"]
        assert isinstance(their_det, model_zoo.SCRFD) and their_rec.input_size[0] == ours.recognizer.input_size
        for name, rgb in photos.items():
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            for size in ours.detector.sizes((640, 320)):
                dets, kpss = ours.detector.detect(rgb, size)
                ref_dets, ref_kpss = their_det.detect(bgr, input_size=(size, size), max_num=0)
                what = f"{folder.name}/{name}@{size}"
                assert len(dets) == len(ref_dets), what
                if len(dets):
                    assert np.abs(dets[:, :4] - ref_dets[:, :4]).max() <= 1.0, what
                    assert np.abs(dets[:, 4] - ref_dets[:, 4]).max() <= 1e-4, what
                    assert np.abs(kpss - ref_kpss).max() <= 1.0, what
                from insightface.app.common import Face

                for det, kps in list(zip(dets, kpss, strict=True))[:8]:
                    mine = ours.recognizer.embed(rgb, kps)
                    face = Face(bbox=det[:4], kps=kps, det_score=det[4])
                    theirs = their_rec.get(bgr, face)
                    cos = float(mine @ theirs / (np.linalg.norm(mine) * np.linalg.norm(theirs)))
                    assert cos >= 0.999, (what, cos)
                    compared += 1
            # the whole pipeline: our largest face and embedding = the largest of FaceAnalysis.get at 640
            app.det_model.input_size = (640, 640)
            faces = app.get(bgr)
            face = ours.largest_face(rgb)
            if faces and face is not None and face.det_size == ours.det_sizes[0]:
                big = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                assert np.abs(face.bbox - big.bbox).max() <= 1.0 and np.abs(face.kps - big.kps).max() <= 1.0
                assert float(face.normed_embedding @ big.normed_embedding) >= 0.999
    assert compared >= 20, f"only {compared} faces compared: the stand-ins should fire on real photos"


def test_texture_pack_exercises_nms_and_alignment(tmp_path):
    """The texture stand-in yields many overlapping candidates (NMS matters) and its recogniser tells a 1-px shift."""
    analyzer = FaceAnalyzer(build_tiny_pack(tmp_path / "texturepack", texture=True), provider="CPU")
    rgb = _real_photos()["astronaut"]
    detector = analyzer.detector
    before = detector.nms_thresh
    detector.nms_thresh = 1.0  # keep everything
    try:
        everything, _ = detector.detect(rgb, 640)
    finally:
        detector.nms_thresh = before
    kept, kps = detector.detect(rgb, 640)
    assert len(everything) > 2 * len(kept) > 4, (len(everything), len(kept))
    a = analyzer.recognizer.embed(rgb, kps[0])
    b = analyzer.recognizer.embed(rgb, kps[0] + 1.0)
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) < 0.999


def test_alignment_and_nms_units():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)
    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [20, 20, 30, 30, 0.7], [0, 0, 10, 10, 0.95]],
                    np.float32)
    assert nms(dets, 0.4) == [3, 2]
