"""BoLID poses -> OpenPose-style control image (the convention ControlNet OpenPose models were trained on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bolid.keypoints import DetectedPoses, PersonPose
from bolid.skeleton import OPENPOSE_COLORS, OPENPOSE_LIMB_DIM, coco_to_openpose, fit_into, openpose_image


def standing(x0: float = 0.0, y0: float = 0.0, s: float = 1.0, conf: float = 0.9) -> PersonPose:
    """A frontal person facing the camera: their right side is on the image's left."""
    pts = {0: (50, 10), 1: (54, 7), 2: (46, 7), 3: (58, 9), 4: (42, 9), 5: (65, 30), 6: (35, 30), 7: (70, 55),
           8: (30, 55), 9: (72, 80), 10: (28, 80), 11: (60, 90), 12: (40, 90), 13: (61, 130), 14: (39, 130),
           15: (62, 170), 16: (38, 170)}
    kp = np.array([(x0 + x * s, y0 + y * s, conf) for x, y in (pts[i] for i in range(17))], np.float32)
    return PersonPose(box=np.array([x0 + 25 * s, y0, x0 + 75 * s, y0 + 175 * s]), score=0.9, keypoints=kp)


def test_the_openpose_convention():
    assert len(set(OPENPOSE_COLORS)) == 18
    assert OPENPOSE_COLORS[0] == (255, 0, 0) and OPENPOSE_COLORS[1] == (255, 85, 0)
    assert OPENPOSE_COLORS[12] == (0, 0, 255) and OPENPOSE_COLORS[17] == (255, 0, 85)
    person = standing()
    op = coco_to_openpose(person.keypoints)
    kp = person.keypoints
    # 0 nose, 1 neck (shoulder midpoint), 2-4 right arm (COCO 6, 8, 10), 5-7 left arm, 8-10 right leg, 11-13 left leg,
    # 14/15 right/left eye, 16/17 right/left ear
    assert np.allclose(op[1, :2], (kp[5, :2] + kp[6, :2]) / 2)
    for o, c in ((0, 0), (2, 6), (4, 10), (5, 5), (7, 9), (8, 12), (10, 16), (11, 11), (13, 15), (14, 2), (15, 1),
                 (16, 4), (17, 3)):
        assert np.allclose(op[o, :2], kp[c, :2]), (o, c)
    low = kp.copy()
    low[6, 2] = 0.1
    hidden = coco_to_openpose(low, 0.3)
    assert hidden[2, 2] == 0 and hidden[1, 2] == 0 and hidden[5, 2] == 1  # no right shoulder, so no neck


def test_openpose_image_colours_and_positions():
    person = standing(10, 5, 2.0)
    img = openpose_image([person], 240, 380, stick_width=4)
    op = coco_to_openpose(person.keypoints)
    assert img.shape == (380, 240, 3) and img.dtype == np.uint8
    for k in range(18):  # every point is a disc of its own colour
        x, y = np.rint(op[k, :2]).astype(int)
        assert tuple(img[y, x]) == OPENPOSE_COLORS[k], k
    # a limb is drawn at 60 % of its colour between its points (limb 6: neck -> right hip, colour 6)
    mid = np.rint((op[1, :2] + op[8, :2]) / 2).astype(int)
    assert tuple(img[mid[1], mid[0]]) == tuple(int(c * OPENPOSE_LIMB_DIM) for c in OPENPOSE_COLORS[6])
    assert tuple(img[2, 2]) == (0, 0, 0) and tuple(img[-3, -3]) == (0, 0, 0)
    # a joint below min_confidence is not drawn
    kp = person.keypoints.copy()
    kp[10, 2] = 0.05
    faint = openpose_image([PersonPose(person.box, 0.9, kp)], 240, 380, stick_width=4)
    x, y = np.rint(op[4, :2]).astype(int)
    assert tuple(faint[y, x]) != OPENPOSE_COLORS[4]
    assert not openpose_image([None], 32, 32).any()


def test_fit_into_keeps_the_aspect_and_cuts_nothing():
    scale, (ox, oy) = fit_into((100, 200), (300, 300))
    assert scale == 1.5 and (ox, oy) == (75.0, 0.0)
    scale, (ox, oy) = fit_into((400, 100), (200, 200))
    assert scale == 0.5 and (ox, oy) == (0.0, 75.0)


def test_poses_to_openpose_node(pack):
    node = pack.nodes.perception_nodes.PosesToOpenPose()
    main, other = standing(), standing(120, 0, 0.9)
    poses = DetectedPoses([main, None], [[main, other], []], [(200, 180), (90, 60)])
    (image,) = node.render(poses, 0.3, "main person", 0, 0)
    assert image.shape == (2, 180, 200, 3) and image.dtype == torch.float32
    assert image[1].max() == 0  # nobody in the second photo
    (everyone,) = node.render(poses, 0.3, "everyone detected", 0, 0)
    assert everyone[0].sum() > image[0].sum()
    (sized,) = node.render(poses, 0.3, "main person", 400, 360)  # the same pose, fitted in at twice the size
    expected = openpose_image([main], 400, 360, 0.3, 2.0, (0.0, 0.0))
    assert torch.equal(sized[0], torch.from_numpy(expected.astype(np.float32) / 255.0))
    with pytest.raises(pack.nodes.perception_nodes.PoseControlError, match="set width and height"):
        node.render([main], 0.3, "main person", 0, 0)
    (plain,) = node.render([main], 0.3, "main person", 200, 180)
    assert torch.equal(plain[0], image[0])
