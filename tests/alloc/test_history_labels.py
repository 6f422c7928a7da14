import pytest

from flexlora.alloc.history import _short


@pytest.mark.parametrize(
    "name, label",
    [
        ("bert.encoder.layer.3.attention.self.query", "3.attention.self.query"),
        ("bert.encoder.layer.3.intermediate.dense", "3.intermediate.dense"),
        ("model.layers.12.mlp.down_proj", "12.mlp.down_proj"),
        ("pooler.dense", "pooler.dense"),
        ("a.b.c.d.e", "c.d.e"),
    ],
)
def test_heatmap_labels_keep_the_layer_index(name, label):
    # Repeated module names (query of every layer) must stay distinguishable on the heat map.
    assert _short(name) == label
