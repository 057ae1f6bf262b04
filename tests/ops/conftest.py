"""Set-up for every test of the ops: buffers that a kernel must fill start as NaN."""
import pytest

from sharnn_fast.ops import _kernels


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every buffer a kernel must fill completely (sharnn_fast.ops._kernels.new_output) starts as
    NaN, so an element that no kernel writes fails the comparison with the reference."""
    monkeypatch.setattr(_kernels, "FILL_OUTPUTS_WITH_NAN", True)
