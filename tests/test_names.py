"""Node names and tooltips: every display name says BoLID the same way, every widget explains itself."""

from __future__ import annotations

from test_workflows import build


def test_every_display_name_says_bolid_the_same_way(pack):
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    for class_id, name in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert class_id.startswith("BoLID"), class_id
        assert name.endswith(" (BoLID)") and name.count("BoLID") == 1, f"{class_id}: {name!r}"
    assert len(set(pack.NODE_DISPLAY_NAME_MAPPINGS.values())) == len(pack.NODE_DISPLAY_NAME_MAPPINGS)


def test_every_widget_has_a_tooltip(pack):
    missing = []
    for class_id, definition in build.bolid_definitions().items():
        spec = build.spec_from_definition(class_id, definition)
        for widget in spec.widgets:
            if not widget.is_extra and not str(widget.options.get("tooltip", "")).strip():
                missing.append(f"{class_id}.{widget.name}")
    assert not missing, f"widgets without a tooltip: {missing}"
