"""Inference runtimes on the device and the execution providers / delegates that really work.

`onnxruntime.get_available_providers()` lists what the build was compiled with, not what runs: a CUDA
build without cuDNN, or an OpenVINO build without the NPU plugin, still advertises its provider and then
falls back to the CPU with a warning. So each advertised provider has to create a session for a tiny
model, and keep the provider when it does, before it counts as loadable. LiteRT gets the same treatment:
each known delegate library is loaded and must run a one-op model. Only the live machine is asked.
"""

from __future__ import annotations

import ctypes
import warnings
from importlib import metadata
from pathlib import Path

from edgefleet.protos.v1 import profile_pb2

from .tree import ProfiledTree

MODELS = Path(__file__).resolve().parent / "models"
PROBE_ONNX = MODELS / "matmul_fp32.onnx"
PROBE_TFLITE = MODELS / "probe_add.tflite"

# LiteRT external delegates worth trying: name -> shared library the vendor installs.
LITERT_DELEGATES: dict[str, str] = {
    "EdgeTPU": "libedgetpu.so.1",
    "GPU": "libtensorflowlite_gpu_delegate.so",
    "QNN": "libQnnTFLiteDelegate.so",
    "VX": "libvx_delegate.so",
}


def provider_creates_session(provider: str) -> tuple[bool, str]:
    """True when `provider` creates a session for the probe model, keeps it, and runs it."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(str(PROBE_ONNX), options, providers=[provider])
        if provider not in session.get_providers():
            return False, f"session fell back to {session.get_providers()}"
        ones = np.ones((2, 2), dtype=np.float32)
        session.run(None, {"A": ones, "B": ones})
    except Exception as exc:  # every EP fails in its own way (RuntimeError, Fail, ...)
        return False, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return True, ""


def _onnxruntime(tree: ProfiledTree) -> profile_pb2.RuntimeInfo | None:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        tree.gap("onnxruntime", f"not importable ({exc}); install edgefleet[agent]")
        return None
    info = profile_pb2.RuntimeInfo(name="onnxruntime", version=ort.__version__)
    info.available_providers.extend(ort.get_available_providers())
    for provider in info.available_providers:
        ok, why = provider_creates_session(provider)
        if ok:
            info.loadable_providers.append(provider)
        else:
            tree.gap(
                f"onnxruntime {provider}",
                f"advertised by the build but creating a session failed ({why}); "
                "install the vendor libraries this provider needs",
            )
    return info


def _litert_interpreter() -> tuple[str, object, object] | None:
    """(distribution, Interpreter, load_delegate) for ai-edge-litert, else tflite-runtime, else None."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return "ai-edge-litert", Interpreter, load_delegate
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return "tflite-runtime", Interpreter, load_delegate
    except ImportError:
        return None


def _runs(interpreter_class: object, delegates: list[object]) -> bool:
    import numpy as np

    interpreter = interpreter_class(model_path=str(PROBE_TFLITE), experimental_delegates=delegates)  # type: ignore[operator]
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, np.arange(4, dtype=np.float32).reshape(1, 4))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return bool(np.allclose(out, [[0.0, 2.0, 4.0, 6.0]]))


def _litert(tree: ProfiledTree) -> profile_pb2.RuntimeInfo | None:
    found = _litert_interpreter()
    if found is None:
        return None  # LiteRT is optional on the device; its absence is not a gap
    name, interpreter_class, load_delegate = found
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = ""
    info = profile_pb2.RuntimeInfo(name=name, version=version, available_providers=["XNNPACK"])
    try:
        if _runs(interpreter_class, []):
            info.loadable_providers.append("XNNPACK")
    except Exception as exc:
        tree.gap(f"{name} interpreter", f"could not run a one-op model ({exc})")
    for delegate_name, library in LITERT_DELEGATES.items():
        try:
            # dlopen first: load_delegate on a missing library leaves a half-built Delegate whose
            # __del__ prints a traceback.
            ctypes.CDLL(library)
        except OSError:
            continue  # library not installed: normal, not a gap
        try:
            delegate = load_delegate(library)  # type: ignore[operator]
        except (ValueError, OSError, RuntimeError) as exc:
            tree.gap(f"{name} {delegate_name} delegate", f"{library} is installed but does not load ({exc})")
            continue
        info.available_providers.append(delegate_name)
        try:
            if _runs(interpreter_class, [delegate]):
                info.loadable_providers.append(delegate_name)
        except Exception as exc:
            tree.gap(f"{name} {delegate_name} delegate", f"{library} loads but the interpreter failed ({exc})")
    return info


def openvino_device_runs(core: object, device: str) -> tuple[bool, str]:
    """True when ``device`` compiles the probe model and gives the right answer, as for ORT providers:
    a listed device whose plugin or driver is broken must not count."""
    import numpy as np

    try:
        compiled = core.compile_model(core.read_model(str(PROBE_ONNX)), device)  # type: ignore[attr-defined]
        ones = np.ones((2, 2), dtype=np.float32)
        out = np.asarray(compiled({"A": ones, "B": ones})[compiled.outputs[0]])
        if not np.allclose(out, 2.0):
            return False, f"the probe model gave {out.ravel().tolist()} instead of 2.0"
    except Exception as exc:  # each plugin fails in its own way
        return False, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return True, ""


def _openvino(tree: ProfiledTree) -> profile_pb2.RuntimeInfo | None:
    try:
        import openvino as ov
    except ImportError:
        return None  # OpenVINO is an optional extra on the device (edgefleet[agent,openvino])
    try:
        core = ov.Core()
        devices = list(core.available_devices)
    except Exception as exc:
        tree.gap("openvino", f"the runtime is installed but does not start ({exc})")
        return None
    info = profile_pb2.RuntimeInfo(name="openvino", version=ov.get_version().split("-")[0])
    info.available_providers.extend(devices)
    for device in devices:
        entry = info.devices.add(name=device)
        try:
            entry.full_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
            entry.capabilities.extend(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        except Exception as exc:
            entry.error = f"properties not readable: {str(exc).splitlines()[0][:160]}"
        ok, why = openvino_device_runs(core, device)
        entry.loadable = ok
        if ok:
            info.loadable_providers.append(device)
        else:
            entry.error = entry.error or why
            tree.gap(f"openvino {device}", f"listed by OpenVINO but compiling a probe model failed ({why})")
    return info


def collect_runtimes(tree: ProfiledTree) -> list[profile_pb2.RuntimeInfo]:
    if not tree.is_live:
        return []
    return [info for info in (_onnxruntime(tree), _litert(tree), _openvino(tree)) if info is not None]
