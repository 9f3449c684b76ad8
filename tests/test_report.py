"""The end-of-run plots: tick labels read through matplotlib's own objects, not pixels."""

from __future__ import annotations

import re

import pytest
from conftest import IRREGULAR, tiny_config

from effllm.training.report import (
    architecture_figure,
    count_label,
    loss_figure,
    params_by_type_figure,
    plot_architecture,
)

pytest.importorskip("matplotlib")


def _visible_ticks(ax, which: str) -> list[tuple[float, str]]:
    """(position, label) of the ticks inside the axis's view limits, after a draw."""
    ax.figure.canvas.draw()
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    return [(tick.get_loc(), tick.label1.get_text()) for tick in axis.get_major_ticks() if low <= tick.get_loc() <= high]


def _records(last_tokens: int, n: int = 25) -> list[dict]:
    rows = []
    for i in range(n):
        tokens = last_tokens * i // (n - 1)
        params = 3_670_000 - 2_240_000 * i // (n - 1)
        rows.append({"tokens": tokens, "params": params, "attention_params": params // 4, "ffn_params": params // 2,
                     "embedding_params": params // 4, "heads": 24 - i // 2, "ffn_width": 2048 - 50 * i,
                     "hidden_size": 128, "loss": 7.0 - i * 0.1, "heldout_loss": 7.2 - i * 0.1})  # fmt: skip
    return rows


def test_architecture_ticks_are_whole_layers(tmp_path):
    import matplotlib.pyplot as plt

    config = tiny_config(**IRREGULAR)
    fig = architecture_figure(config)
    for ax in fig.axes:
        ticks = _visible_ticks(ax, "x")
        assert [loc for loc, _ in ticks] == [0, 1, 2, 3], ticks  # not -0.5, 0.5, 1.5...
        assert [label for _, label in ticks] == ["0", "1", "2", "3"]
        assert all(float(loc).is_integer() for loc, _ in _visible_ticks(ax, "y"))  # heads and widths too
    plt.close(fig)
    plot_architecture(config, tmp_path / "architecture.png")
    assert (tmp_path / "architecture.png").stat().st_size > 0


COUNT = re.compile(r"^(0|[1-9]\d{0,2}(\.\d{1,2})?[KMB])$")  # 0, 200K, 1.2M: never 1000000 or 2e5


@pytest.mark.parametrize("last_tokens", [800_000, 1_200_000])
def test_token_axes_are_readable(last_tokens):
    import matplotlib.pyplot as plt

    metrics = _records(last_tokens)
    fig = params_by_type_figure(metrics, metrics[::6])
    params_ax, ratio_ax = fig.axes
    for ax in (params_ax, ratio_ax):
        labels = [label for _, label in _visible_ticks(ax, "x")]
        assert labels and all(COUNT.match(label) for label in labels), labels
        assert "200K" in labels and ax.xaxis.get_offset_text().get_text() == ""
    assert ("1.2M" in labels) == (last_tokens == 1_200_000)
    param_labels = [label for _, label in _visible_ticks(params_ax, "y")]
    assert all(COUNT.match(label) for label in param_labels), param_labels
    plt.close(fig)
    fig = loss_figure(metrics, metrics[::6])
    labels = [label for _, label in _visible_ticks(fig.axes[0], "x")]
    assert "200K" in labels and all(COUNT.match(label) for label in labels), labels
    plt.close(fig)


def test_count_label():
    assert [count_label(v) for v in (0, 950, 200_000, 1_200_000, 1_234_567, 3e9)] == [
        "0", "950", "200K", "1.2M", "1.23M", "3B"
    ]  # fmt: skip
