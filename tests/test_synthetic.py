"""The synthetic-people world: determinism, exact keypoints, identity-free captions, identity-fixed proportions."""

from __future__ import annotations

import numpy as np
import pytest

from bolid.keypoints import SKELETON
from bolid.proportions import body_proportions_np
from bolid.synthetic import (
    BACKGROUNDS,
    COLOURS,
    HAIR_COLOURS,
    SKIN_TONES,
    VIEW_YAW,
    background_image,
    caption_vocabulary,
    make_identity,
    render_identity_photos,
    render_photo,
    tokenize,
)

BODY_BONES = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16), (5, 11), (6, 12)]


@pytest.fixture(scope="module")
def photos():
    return [p for i in range(6) for p in render_identity_photos(7, i, 10, size=64)]


def test_rendering_is_deterministic_and_seeds_separate_photos():
    a = render_identity_photos(3, 2, 3)
    b = render_identity_photos(3, 2, 3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.keypoints, y.keypoints)
        assert x.caption == y.caption
    assert not np.array_equal(a[0].image, a[1].image)
    assert make_identity(3, 2) == make_identity(3, 2) and make_identity(3, 2) != make_identity(3, 3)


def test_keypoints_lie_on_the_figure_not_the_background(photos):
    for p in photos:
        size = p.image.shape[0]
        bg = background_image(p.attributes["background"], size)
        kp = p.keypoints
        assert (kp[:, 2] == 1).all(), "the whole figure stays inside the frame"
        # every body keypoint's pixel is mostly covered by the figure
        for j in range(5, 17):
            x, y = int(kp[j, 0]), int(kp[j, 1])
            assert p.mask[y, x] > 0.5, (p.caption, j, p.mask[y, x])
        # along every bone (midpoints and quarter points) the pixel differs from the bare background
        for a, b in BODY_BONES:
            for t in (0.25, 0.5, 0.75):
                x, y = (kp[a, :2] * (1 - t) + kp[b, :2] * t).astype(int)
                assert p.mask[y, x] > 0.5
                assert np.abs(p.image[y, x].astype(int) - bg[y, x].astype(int)).sum() > 0 or \
                    p.mask[y, x] > 0.99  # a figure colour equal to the background colour is still the figure


def test_figure_pixels_are_figure_coloured_where_clothes_differ_from_background():
    ident = make_identity(0, 0)
    p = render_photo(ident, 1, size=64, attributes={"pose": "arms out", "view": "front view", "shirt": "long-sleeved "
                                                    "shirt", "shirt_colour": "red", "trousers": "trousers",
                                                    "trousers_colour": "blue", "background": "a grey wall"})
    kp = p.keypoints
    red, blue = np.array(COLOURS["red"]), np.array(COLOURS["blue"])
    for a, b, colour in ((5, 7, red), (6, 8, red), (11, 13, blue), (12, 14, blue), (13, 15, blue)):
        x, y = (0.5 * (kp[a, :2] + kp[b, :2])).astype(int)
        assert np.abs(p.image[y, x].astype(int) - colour).max() < 60, (a, b, p.image[y, x])
    # far away from every bone there is only the grey wall
    assert (p.image[0, 0] == 128).all() and p.mask[0, 0] == 0


def test_proportions_of_the_drawn_keypoints_are_the_identity_in_front_view():
    for i in range(5):
        ident = make_identity(11, i)
        for seed in range(4):
            p = render_photo(ident, seed, attributes={"view": "front view"})
            props, conf = body_proportions_np(p.keypoints)
            assert np.allclose(props, ident.proportion_vector(), rtol=1e-3, atol=1e-3)
            assert np.allclose(conf, 1.0)


def test_turned_views_only_narrow_the_widths():
    ident = make_identity(11, 0)
    p = render_photo(ident, 5, attributes={"view": "turned left"})
    props, _ = body_proportions_np(p.keypoints)
    truth = ident.proportion_vector()
    assert np.allclose(props[:4], truth[:4], rtol=1e-3)
    assert np.allclose(props[4:], truth[4:] * np.cos(VIEW_YAW["turned left"]), rtol=1e-3)


def test_captions_describe_the_photo_and_never_the_identity(photos):
    identity_words = {"skin", "hair", "tall", "short", "thin", "fat", "slim", "broad", "body", "legs", "blond"}
    vocab = set(caption_vocabulary())
    for p in photos:
        words = tokenize(p.caption)
        assert not identity_words & set(words)
        assert set(words) <= vocab
        a = p.attributes
        assert a["pose"].split()[0] in p.caption and a["view"] in p.caption and a["background"] in p.caption
        assert f"{a['shirt_colour']} {a['shirt']}" in p.caption
    # identities are not encoded in the caption distribution: two identities share the caption vocabulary
    assert len({p.caption for p in photos}) > len(photos) // 2


def test_identity_fixes_body_and_photo_fixes_the_rest(photos):
    by_id: dict[int, list] = {}
    for p in photos:
        by_id.setdefault(p.identity, []).append(p)
    for ps in by_id.values():
        fronts = [body_proportions_np(p.keypoints)[0][:4] for p in ps]
        assert np.ptp(np.stack(fronts), 0).max() < 1e-3  # bone ratios identical across photos
        assert len({p.attributes["shirt_colour"] + p.attributes["background"] for p in ps}) > 3
    idents = [make_identity(7, i) for i in range(6)]
    assert all(i.skin in SKIN_TONES and i.hair in HAIR_COLOURS for i in idents)
    assert len({tuple(i.proportion_vector()) for i in idents}) == 6
    assert set(BACKGROUNDS) >= {p.attributes["background"] for p in photos}


def test_bad_attribute_is_rejected():
    with pytest.raises(ValueError, match="unknown photo attributes"):
        render_photo(make_identity(0, 0), 0, attributes={"hat": "red"})


def test_skeleton_edges_are_drawn_for_limbs():
    # every SKELETON limb edge between body joints is covered at its midpoint
    p = render_photo(make_identity(1, 1), 3, size=64)
    for a, b in SKELETON:
        if a >= 5 and b >= 5:
            x, y = (0.5 * (p.keypoints[a, :2] + p.keypoints[b, :2])).astype(int)
            assert p.mask[y, x] > 0.5
