"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def fp32_precision():
    """Give torch's float32 precision settings back as they were, for tests that set them through the precision
    API or ``torch.set_float32_matmul_precision``. All three are restored: with the last one left at "high",
    reading the legacy allow_tf32 raises in every later test (torch sees the legacy and new APIs mixed)."""
    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision(), matmul.fp32_precision, torch.backends.fp32_precision
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.fp32_precision = before[2]
    matmul.fp32_precision = before[1]
