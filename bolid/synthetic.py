"""A seeded synthetic-people world for experiments and tests: the identity fixes the body, the photo the rest.

* **Identity** (:class:`SyntheticIdentity`): bone lengths in torso units (the same six quantities as
  :mod:`bolid.proportions`), build (limb thickness, torso width), skin tone and hair colour. Drawn from
  ``(seed, index)`` only, so identity ``k`` of a world is the same in every run.
* **Photo** (:func:`render_photo`): pose (one of :data:`POSES`, jittered), view (front / turned left / turned
  right: the body's widths are foreshortened by the turn), clothing (shirt colour and sleeve length, trouser
  colour and length), background (one of :data:`BACKGROUNDS`), position and scale vary per photo.
* **Caption**: describes pose, view, clothing and background, never the identity (no body, skin or hair words).
* **Keypoints** are known exactly: COCO-17 in the output image's pixel frame (pixel ``j`` covers ``[j, j+1)``),
  ``(x, y, visibility)``; the person's left side is drawn on the image's right in the front view (COCO).

``ORACLE_DIM`` numbers describe an identity (:meth:`SyntheticIdentity.oracle_vector`). The traits were chosen to be
visible at 32 px: four skin tones, five hair colours, limb width and waist width, and bone lengths whose spread
between people is several pixels.

The world has heads but no faces: a head is a skin-coloured disc with identity-coloured hair, no facial
features an ArcFace-style recognizer could use, so the face branch of BoLID is not exercised by this world.

Rendering is supersampled (drawn at ``size * supersample`` with PIL, then box-filtered down), so thin limbs
are anti-aliased and keypoints are sub-pixel accurate. Pure NumPy + PIL; ~1 ms per 32x32 photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------- vocabulary

POSES: tuple[str, ...] = ("standing", "arms raised", "arms out", "waving", "walking")
VIEWS: tuple[str, ...] = ("front view", "turned left", "turned right")
# name -> RGB; shirts and trousers use the same palette
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 60), "yellow": (230, 200, 40),
    "white": (235, 235, 235), "black": (25, 25, 25),
}
SHIRTS: tuple[str, ...] = ("t-shirt", "long-sleeved shirt")
TROUSERS: tuple[str, ...] = ("trousers", "shorts")
# name -> (top colour, bottom colour, horizon as a fraction of the height); single-colour ones repeat the colour
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float]] = {
    "a grey wall": ((128, 128, 128), (128, 128, 128), 1.0),
    "a blue sky over grass": ((120, 180, 235), (70, 140, 60), 0.7),
    "a beach": ((150, 200, 240), (220, 200, 140), 0.65),
    "a night sky": ((20, 25, 60), (20, 25, 60), 1.0),
}
# identity traits: a few well-separated skin tones and hair colours, so that they stay distinct at 32 px
SKIN_TONES: tuple[tuple[int, int, int], ...] = ((250, 215, 185), (215, 160, 115), (160, 105, 70), (95, 60, 40))
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (20, 15, 10), (110, 65, 30), (230, 200, 100), (200, 60, 25), (205, 205, 205))

# identity ranges, torso units (torso = shoulder midpoint to hip midpoint)
BONE_RANGES: dict[str, tuple[float, float]] = {
    "upper_arm": (0.32, 0.64), "forearm": (0.28, 0.58), "thigh": (0.40, 0.88), "shin": (0.38, 0.84),
    "shoulder_width": (0.45, 0.95), "hip_width": (0.30, 0.66),
}
LIMB_WIDTH_RANGE = (0.10, 0.27)  # limb thickness, torso units
TORSO_WIDTH_RANGE = (0.8, 1.3)  # waist width relative to the mean of shoulder and hip width
HEAD_RADIUS = 0.30  # torso units
NECK = 0.16  # shoulder midpoint to the bottom of the head
ORACLE_DIM = len(BONE_RANGES) + 2 + len(SKIN_TONES) + len(HAIR_COLOURS)  # SyntheticIdentity.oracle_vector
VIEW_YAW: dict[str, float] = {"front view": 0.0, "turned left": 0.5, "turned right": -0.5}  # radians


@dataclass(frozen=True)
class SyntheticIdentity:
    """One person's body: what every photo of them shares."""

    index: int
    bones: dict[str, float]  # the six proportions (torso units, front view)
    limb_width: float  # limb thickness, torso units
    torso_width: float  # torso width at the waist relative to the mean of shoulder and hip width
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]

    def proportion_vector(self) -> np.ndarray:
        """The identity's true proportions in :data:`bolid.proportions.PROPORTION_NAMES` order (front view)."""
        from .proportions import PROPORTION_NAMES

        return np.array([self.bones[n] for n in PROPORTION_NAMES], dtype=np.float64)

    @property
    def skin_index(self) -> int:
        return SKIN_TONES.index(self.skin)

    @property
    def hair_index(self) -> int:
        return HAIR_COLOURS.index(self.hair)

    def oracle_vector(self) -> np.ndarray:
        """The identity as a standardised vector (the experiment's oracle in place of c_body): the six
        proportions and the two build numbers, each standardised by its spread over people (uniform ranges), then
        skin and hair one-hot. Dimension :data:`ORACLE_DIM`."""
        from .proportions import PROPORTION_NAMES

        def z(value: float, lo: float, hi: float) -> float:
            return (value - (lo + hi) / 2) / ((hi - lo) / math.sqrt(12.0))

        cont = [z(self.bones[n], *BONE_RANGES[n]) for n in PROPORTION_NAMES]
        cont += [z(self.limb_width, *LIMB_WIDTH_RANGE), z(self.torso_width, *TORSO_WIDTH_RANGE)]
        skin, hair = np.zeros(len(SKIN_TONES)), np.zeros(len(HAIR_COLOURS))
        skin[self.skin_index] = 1.0
        hair[self.hair_index] = 1.0
        return np.concatenate([np.asarray(cont), skin, hair]).astype(np.float32)


@dataclass
class SyntheticPhoto:
    """One rendered photo: image (uint8 HxWx3), exact keypoints [17, 3], caption, attributes, figure mask."""

    image: np.ndarray
    keypoints: np.ndarray
    caption: str
    attributes: dict[str, str]
    mask: np.ndarray  # float32 HxW in [0, 1]: fraction of the pixel covered by the figure
    identity: int
    meta: dict = field(default_factory=dict)


def make_identity(world_seed: int, index: int) -> SyntheticIdentity:
    """Identity ``index`` of the world ``world_seed`` (deterministic)."""
    rng = np.random.default_rng([int(world_seed), 1, int(index)])
    bones = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in BONE_RANGES.items()}
    return SyntheticIdentity(index=int(index), bones=bones, limb_width=float(rng.uniform(*LIMB_WIDTH_RANGE)),
                             torso_width=float(rng.uniform(*TORSO_WIDTH_RANGE)),
                             skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
                             hair=HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))])


# ----------------------------------------------------------------------------------------------- geometry

_ARM_ANGLES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    # (left upper, left fore, right upper, right fore): angle from straight down, positive = outwards
    "standing": ((0.15, 0.12), (0.1, 0.1), (0.15, 0.12), (0.1, 0.1)),
    "arms raised": ((2.65, 0.2), (2.85, 0.2), (2.65, 0.2), (2.85, 0.2)),
    "arms out": ((1.55, 0.15), (1.55, 0.2), (1.55, 0.15), (1.55, 0.2)),
    "waving": ((2.5, 0.2), (3.0, 0.15), (0.15, 0.12), (0.1, 0.1)),
    "walking": ((0.35, 0.15), (0.2, 0.15), (0.35, 0.15), (0.2, 0.15)),
}
_LEG_ANGLES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "standing": ((0.06, 0.04), (0.02, 0.03), (0.06, 0.04), (0.02, 0.03)),
    "arms raised": ((0.1, 0.05), (0.05, 0.05), (0.1, 0.05), (0.05, 0.05)),
    "arms out": ((0.12, 0.05), (0.05, 0.05), (0.12, 0.05), (0.05, 0.05)),
    "waving": ((0.06, 0.04), (0.02, 0.03), (0.06, 0.04), (0.02, 0.03)),
    "walking": ((0.42, 0.08), (0.25, 0.1), (0.3, 0.08), (0.1, 0.1)),
}


def _limb(start: np.ndarray, length: float, angle: float, side: float) -> np.ndarray:
    # side +1: the person's left = image +x in the front view; y grows downwards
    return start + length * np.array([side * math.sin(angle), math.cos(angle)])


def body_keypoints(identity: SyntheticIdentity, pose: str, view: str, rng: np.random.Generator) -> np.ndarray:
    """COCO-17 (x, y) in torso units, hip midpoint at the origin, before placement in the image."""
    b = identity.bones
    yaw = VIEW_YAW[view]
    squash = math.cos(yaw)
    kp = np.zeros((17, 2), dtype=np.float64)
    lean = float(rng.normal(0.0, 0.04))
    up = np.array([math.sin(lean), -math.cos(lean)])
    side = np.array([math.cos(lean), math.sin(lean)])
    hip_mid = np.zeros(2)
    sh_mid = hip_mid + up
    kp[5] = sh_mid + 0.5 * b["shoulder_width"] * squash * side
    kp[6] = sh_mid - 0.5 * b["shoulder_width"] * squash * side
    kp[11] = hip_mid + 0.5 * b["hip_width"] * squash * side
    kp[12] = hip_mid - 0.5 * b["hip_width"] * squash * side
    arms = _ARM_ANGLES[pose]
    legs = _LEG_ANGLES[pose]
    for s, (sh, el, wr), (upper, fore) in ((1.0, (5, 7, 9), arms[0:2]), (-1.0, (6, 8, 10), arms[2:4])):
        a_up = rng.normal(*upper)
        a_fore = rng.normal(*fore)
        kp[el] = _limb(kp[sh], b["upper_arm"], a_up, s)
        kp[wr] = _limb(kp[el], b["forearm"], a_fore, s)
    swap = pose == "walking" and rng.random() < 0.5  # which leg strides further
    for s, (hp, kn, an), (thigh, shin) in ((1.0, (11, 13, 15), legs[0:2]), (-1.0, (12, 14, 16), legs[2:4])):
        if swap:
            thigh, shin = (legs[2:4] if s > 0 else legs[0:2])
        kp[kn] = _limb(kp[hp], b["thigh"], rng.normal(*thigh), s)
        kp[an] = _limb(kp[kn], b["shin"], rng.normal(*shin), s)
    head = sh_mid + (NECK + HEAD_RADIUS) * up
    turn = math.sin(yaw)  # turned left: the face moves towards the image's right (the person's left)
    kp[0] = head + HEAD_RADIUS * 0.55 * turn * side
    for s, eye, ear in ((1.0, 1, 3), (-1.0, 2, 4)):
        kp[eye] = head - 0.25 * HEAD_RADIUS * up + (s * 0.35 * squash + 0.5 * turn) * HEAD_RADIUS * side
        kp[ear] = head + (s * 0.95 * squash + 0.2 * turn) * HEAD_RADIUS * side
    return kp


# ----------------------------------------------------------------------------------------------- rendering


def caption_for(attributes: dict[str, str]) -> str:
    """The caption of a photo: pose, view, clothing and background, never the identity."""
    pose = {"standing": "standing", "arms raised": "standing with arms raised", "arms out": "standing with arms out",
            "waving": "waving", "walking": "walking"}[attributes["pose"]]
    return (f"a person {pose}, {attributes['view']}, wearing a {attributes['shirt_colour']} {attributes['shirt']} "
            f"and {attributes['trousers_colour']} {attributes['trousers']}, in front of {attributes['background']}")


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Per-photo pose, view, clothing and background."""
    colours = list(COLOURS)
    shirt_colour = colours[int(rng.integers(len(colours)))]
    trousers_colour = colours[int(rng.integers(len(colours)))]
    return {"pose": POSES[int(rng.integers(len(POSES)))], "view": VIEWS[int(rng.integers(len(VIEWS)))],
            "shirt": SHIRTS[int(rng.integers(len(SHIRTS)))], "shirt_colour": shirt_colour,
            "trousers": TROUSERS[int(rng.integers(len(TROUSERS)))], "trousers_colour": trousers_colour,
            "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]}


def _figure_extent(kp: np.ndarray, identity: SyntheticIdentity) -> tuple[np.ndarray, np.ndarray]:
    pad = identity.limb_width
    head = kp[[0, 1, 2, 3, 4]].mean(0)
    lo = np.minimum(kp.min(0) - pad, head - HEAD_RADIUS - 0.05)
    hi = np.maximum(kp.max(0) + pad, head + HEAD_RADIUS)
    return lo, hi


def render_photo(identity: SyntheticIdentity, photo_seed: int, size: int = 32, supersample: int = 4,
                 attributes: dict[str, str] | None = None, fill: tuple[float, float] = (0.78, 0.92)
                 ) -> SyntheticPhoto:
    """Render one photo of ``identity``; everything but the identity comes from ``photo_seed`` (and
    ``attributes``, when given, overrides the sampled pose/view/clothing/background)."""
    rng = np.random.default_rng([int(photo_seed), 2, identity.index])
    attrs = sample_attributes(rng)
    if attributes:
        unknown = set(attributes) - set(attrs)
        if unknown:
            raise ValueError(f"unknown photo attributes {sorted(unknown)}; known: {sorted(attrs)}")
        attrs.update(attributes)
    kp = body_keypoints(identity, attrs["pose"], attrs["view"], rng)
    lo, hi = _figure_extent(kp, identity)
    ext = hi - lo
    # scale: the figure's height fills `fill` of the frame (less if it would not fit horizontally)
    scale = min(size * rng.uniform(*fill) / ext[1], size * 0.95 / ext[0])
    free = size - ext * scale
    offset = np.array([rng.uniform(0.15, 0.85) * free[0], rng.uniform(0.3, 0.7) * free[1]]) - lo * scale
    kp_px = kp * scale + offset  # continuous output-pixel coordinates

    s = supersample
    big = size * s
    top, bottom, horizon = BACKGROUNDS[attrs["background"]]
    bg = Image.new("RGB", (big, big), top)
    ImageDraw.Draw(bg).rectangle([0, int(round(horizon * big)), big, big], fill=bottom)
    fig = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    d, m = ImageDraw.Draw(fig), ImageDraw.Draw(mask)

    def pt(i: int | np.ndarray) -> tuple[float, float]:
        p = kp_px[i] if isinstance(i, int) else i
        return float(p[0] * s - 0.5), float(p[1] * s - 0.5)

    unit = scale * s  # torso unit in supersampled pixels
    limb_w = max(1, int(round(identity.limb_width * unit)))

    def seg(a: tuple[float, float], b: tuple[float, float], colour: tuple[int, int, int], width: int) -> None:
        for draw, col in ((d, colour), (m, 255)):
            draw.line([a, b], fill=col, width=width)
            r = width / 2
            for c in (a, b):
                draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=col)

    def poly(points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
        d.polygon(points, fill=colour)
        m.polygon(points, fill=255)

    skin = identity.skin
    shirt = COLOURS[attrs["shirt_colour"]]
    trousers = COLOURS[attrs["trousers_colour"]]
    # legs: trousers cover thigh and shin, shorts the thigh only
    for hp, kn, an in ((11, 13, 15), (12, 14, 16)):
        seg(pt(hp), pt(kn), trousers, int(limb_w * 1.15))
        seg(pt(kn), pt(an), trousers if attrs["trousers"] == "trousers" else skin, limb_w)
    # torso: a quadrilateral from the shoulders to the hips, waist width set by the build
    sh_l, sh_r, hp_l, hp_r = (kp_px[i] for i in (5, 6, 11, 12))
    out = 0.5 * identity.torso_width * identity.limb_width * scale  # output pixels beyond the joints

    def outward(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        v = a - b
        return out * v / max(1e-6, float(np.linalg.norm(v)))

    w_sh, w_hp = outward(sh_l, sh_r), outward(hp_l, hp_r)
    poly([pt(sh_l + w_sh), pt(sh_r - w_sh), pt(hp_r - w_hp), pt(hp_l + w_hp)], shirt)
    seg(pt(hp_l), pt(hp_r), trousers, limb_w)
    # arms: sleeves cover the upper arm (t-shirt) or the whole arm
    for sh, el, wr in ((5, 7, 9), (6, 8, 10)):
        seg(pt(sh), pt(el), shirt, limb_w)
        seg(pt(el), pt(wr), shirt if attrs["shirt"] == "long-sleeved shirt" else skin, max(1, int(limb_w * 0.9)))
    # head: neck, skin disc, hair on the upper half
    head = kp_px[[0, 1, 2, 3, 4]].mean(0)
    head_c = head
    sh_mid = (sh_l + sh_r) / 2
    seg(pt(sh_mid), pt(head_c), skin, max(1, int(limb_w * 0.8)))
    r = HEAD_RADIUS * unit
    hc = pt(head_c)
    for draw, col in ((d, skin), (m, 255)):
        draw.ellipse([hc[0] - r, hc[1] - r, hc[0] + r, hc[1] + r], fill=col)
    d.pieslice([hc[0] - r * 1.08, hc[1] - r * 1.12, hc[0] + r * 1.08, hc[1] + r * 1.04], 165, 375,
               fill=identity.hair)
    m.pieslice([hc[0] - r * 1.08, hc[1] - r * 1.12, hc[0] + r * 1.08, hc[1] + r * 1.04], 165, 375, fill=255)

    bg.paste(fig, (0, 0), mask)
    image = np.asarray(bg.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    mask_small = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    inside = (kp_px[:, 0] >= 0) & (kp_px[:, 0] < size) & (kp_px[:, 1] >= 0) & (kp_px[:, 1] < size)
    keypoints = np.concatenate([kp_px, inside[:, None].astype(np.float64)], 1).astype(np.float32)
    return SyntheticPhoto(image=image, keypoints=keypoints, caption=caption_for(attrs), attributes=attrs,
                          mask=mask_small, identity=identity.index,
                          meta={"scale": float(scale), "photo_seed": int(photo_seed)})


def background_image(background: str, size: int) -> np.ndarray:
    """The background alone (what a pixel shows where no figure is drawn)."""
    top, bottom, horizon = BACKGROUNDS[background]
    img = Image.new("RGB", (size * 4, size * 4), top)
    ImageDraw.Draw(img).rectangle([0, int(round(horizon * size * 4)), size * 4, size * 4], fill=bottom)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- datasets


def caption_vocabulary() -> list[str]:
    """Every word a caption of this world can contain (for a fixed-vocabulary caption encoder)."""
    words: set[str] = set()
    for pose in POSES:
        for view in VIEWS:
            attrs = {"pose": pose, "view": view, "shirt": SHIRTS[0], "shirt_colour": "red", "trousers": TROUSERS[0],
                     "trousers_colour": "red", "background": next(iter(BACKGROUNDS))}
            words.update(tokenize(caption_for(attrs)))
    for name in (*COLOURS, *SHIRTS, *TROUSERS, *BACKGROUNDS):
        words.update(tokenize(name))
    return sorted(words)


def tokenize(caption: str) -> list[str]:
    """Lower-case words; commas are dropped."""
    return caption.lower().replace(",", " ").split()


def render_identity_photos(world_seed: int, identity_index: int, count: int, size: int = 32,
                           first_photo: int = 0) -> list[SyntheticPhoto]:
    """``count`` photos of one identity, photo seeds ``first_photo ..`` (disjoint ranges never overlap)."""
    ident = make_identity(world_seed, identity_index)
    return [render_photo(ident, photo_seed=world_seed * 1_000_003 + first_photo + j, size=size)
            for j in range(count)]
