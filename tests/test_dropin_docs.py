"""The worked examples of docs/use-in-your-model.md run as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "use-in-your-model.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_its_three_examples():
    assert len(BLOCKS) == 3


# The Linen transformer compiles attention, two MoE layers and their
# gradients: ~24 s on 2 busy cores.
@pytest.mark.parametrize("index", [pytest.param(0, marks=pytest.mark.slow)]
                         + list(range(1, len(BLOCKS))))
def test_example_runs(index, capsys):
    # A fresh namespace per block: each example stands alone.
    exec(compile(BLOCKS[index], f"{DOC.name}[python block {index}]", "exec"), {})
    out = capsys.readouterr().out
    assert "loss" in out or "blocks/" in out
    print(out)
