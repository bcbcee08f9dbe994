"""COCO-17 keypoint conventions and the per-person pose record every BoLID part exchanges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BoLIDError

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(COCO_KEYPOINTS)
BODY_JOINTS: tuple[int, ...] = tuple(range(5, 17))  # the 12 body joints whose mean confidence weights a view
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


def flip_index() -> np.ndarray:
    """Permutation that maps keypoints of a horizontally flipped image back to their semantic slots."""
    perm = np.arange(NUM_KEYPOINTS)
    for a, b in FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return perm


@dataclass(frozen=True)
class PersonPose:
    """One detected person in original image pixel coordinates.

    box: [4] x1, y1, x2, y2; score: detection confidence; keypoints: [17, 3] x, y, confidence.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray

    def __post_init__(self) -> None:
        kp = np.asarray(self.keypoints, dtype=np.float32)
        if kp.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(f"keypoints must have shape (17, 3), got {kp.shape}")
        object.__setattr__(self, "keypoints", kp)
        object.__setattr__(self, "box", np.asarray(self.box, dtype=np.float32).reshape(4))

    @property
    def body_confidence(self) -> float:
        """Mean confidence of the 12 body joints (COCO 5..16): the view's aggregation weight."""
        return float(self.keypoints[list(BODY_JOINTS), 2].mean())

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))


def detect_people(runner: Any, images: Sequence[np.ndarray]) -> list[list[PersonPose]]:
    """Run any pose runner on RGB uint8 HxWx3 images; every image gets a (possibly empty) list of people.

    Any object with one of these methods works (checked in this order): ``detect_all(images)`` or
    ``detect_batch(images)`` returning a list of lists of PersonPose; ``detect(images)`` or ``__call__(images)``
    returning per image a PersonPose, None, or a list of PersonPose.
    """
    images = list(images)
    if not images:
        return []
    for name in ("detect_all", "detect_batch", "detect", "__call__"):
        fn = getattr(runner, name, None)
        if callable(fn):
            break
    else:
        raise TypeError(f"{type(runner).__name__} is not a pose runner (needs detect_all/detect/__call__)")
    results = fn(images)
    if len(results) != len(images):
        raise BoLIDError(f"the pose runner returned {len(results)} results for {len(images)} images")
    out: list[list[PersonPose]] = []
    for r in results:
        if r is None:
            out.append([])
        elif hasattr(r, "keypoints") and hasattr(r, "box"):  # one PersonPose (duck-typed: the pack may be
            out.append([r])                                 # imported under two names in one process)
        else:
            out.append([p for p in r if p is not None])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the one person-selection rule (dataset prepare step, Detect Body Pose, Encode Body From Images)

PERSON_CHOICES: tuple[str, ...] = ("largest", "most_confident")
SEVERAL_PEOPLE_POLICIES: tuple[str, ...] = ("use_main", "skip")
# A second person counts as "several people" when their box is at least this fraction of the main person's box
# area; smaller people (in the background) are ignored.
SEVERAL_PEOPLE_RATIO = 0.3
NO_PERSON = "no person detected"


def select_person(people: Sequence[PersonPose], choice: str = "largest") -> PersonPose | None:
    """The main person of an image: the largest box (ties: higher body confidence) or the most confident
    detection (ties: larger box); None when nobody was detected."""
    if choice not in PERSON_CHOICES:
        raise ValueError(f"person choice must be one of {PERSON_CHOICES}, got {choice!r}")
    if not people:
        return None
    if choice == "largest":
        return max(people, key=lambda p: (p.area, p.body_confidence))
    return max(people, key=lambda p: (p.score, p.area))


def significant_others(people: Sequence[PersonPose], main: PersonPose,
                       ratio: float = SEVERAL_PEOPLE_RATIO) -> list[PersonPose]:
    """The other people whose box is at least ``ratio`` of the main person's box area (not background people)."""
    floor = ratio * max(main.area, 1e-9)
    return [p for p in people if p is not main and p.area >= floor]


@dataclass(frozen=True)
class PersonChoice:
    """What :func:`choose_person` decided for one image: the person (or None) and, when None, why."""

    pose: PersonPose | None
    reason: str = ""
    people: int = 0


def choose_person(people: Sequence[PersonPose], choice: str = "largest", several_people: str = "use_main",
                  ratio: float = SEVERAL_PEOPLE_RATIO, main: PersonPose | None = None) -> PersonChoice:
    """The one rule for "the person of this photo", shared by the dataset's prepare step and the nodes.

    The main person is :func:`select_person`'s (or ``main``, when a detector already chose it among
    ``people``); with ``several_people="skip"`` the image gives nobody when other people of at least ``ratio`` of
    the main person's box area are present (the identity would be ambiguous).
    """
    if several_people not in SEVERAL_PEOPLE_POLICIES:
        raise ValueError(f"several_people must be one of {SEVERAL_PEOPLE_POLICIES}, got {several_people!r}")
    people = [p for p in people if p is not None]
    if main is None:
        main = select_person(people, choice)
    elif not any(p is main for p in people):
        people.append(main)
    if main is None:
        return PersonChoice(None, NO_PERSON, 0)
    others = significant_others(people, main, ratio)
    if others and several_people == "skip":
        return PersonChoice(None, f"several people ({len(others) + 1} detected at >= {ratio:g}x the main person's "
                                  "box area)", len(others) + 1)
    return PersonChoice(main, "", len(others) + 1)


class DetectedPoses(list):
    """BOLID_POSES: the main person per image (``PersonPose | None``, as a plain list), plus everything the
    detector found (``people``) and the image sizes (``sizes``, (width, height)), so a consumer can apply its
    own several-people policy and check that the poses belong to its images."""

    def __init__(self, main: Sequence[PersonPose | None], people: Sequence[Sequence[PersonPose]],
                 sizes: Sequence[tuple[int, int]]) -> None:
        super().__init__(main)
        if not (len(main) == len(people) == len(sizes)):
            raise ValueError(f"{len(main)} main poses, {len(people)} people lists and {len(sizes)} sizes")
        self.people = [list(p) for p in people]
        self.sizes = [(int(w), int(h)) for w, h in sizes]
