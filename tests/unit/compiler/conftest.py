"""Fixtures for the compiler unit tests: tiny models built once per session, data files, a private cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# The model-building scripts live in tests/models; import them as ``tests.models`` from the repo root.
_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.models import tiny_models  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cache: no test can pass because another one warmed the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEFLEET_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp(models_dir: Path) -> dict[str, Path]:
    """Digits MLP (trained by scikit-learn) with calib.npz and eval.npz (with labels)."""
    path, data = tiny_models.digits_mlp(models_dir / "mlp.onnx")
    np.savez(models_dir / "mlp_calib.npz", x=data["x_train"][:160])
    np.savez(models_dir / "mlp_eval.npz", x=data["x_test"][:200], labels=data["y_test"][:200])
    return {"model": path, "calib": models_dir / "mlp_calib.npz", "eval": models_dir / "mlp_eval.npz"}


@pytest.fixture(scope="session")
def conv(models_dir: Path) -> dict[str, Path]:
    """Conv net at opset 11 with an exporter-named dynamic batch dim, plus image-like calibration data."""
    path = tiny_models.conv_net(models_dir / "conv11.onnx", opset=11)
    np.savez(models_dir / "conv_calib.npz", x=tiny_models.conv_inputs(48))
    return {"model": path, "calib": models_dir / "conv_calib.npz"}


@pytest.fixture(scope="session")
def outlier(models_dir: Path) -> dict[str, Path]:
    path = tiny_models.outlier_mlp(models_dir / "outlier.onnx")
    rng = np.random.default_rng(3)
    np.savez(models_dir / "outlier_calib.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    return {"model": path, "calib": models_dir / "outlier_calib.npz"}
