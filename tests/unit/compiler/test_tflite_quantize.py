"""ai-edge-quantizer pass on TFLite models shaped like published ones (MediaPipe's): fp16 weights behind
DEQUANTIZE, no SignatureDef, operator codes only in the deprecated field."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.controller.compiler.data import Dataset
from edgefleet.controller.compiler.passes import PassContext, PassError
from edgefleet.controller.compiler.runner import ModelRunner
from edgefleet.controller.compiler.target import TargetSpec
from tests.models import tiny_models

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

needs_quantizer = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_quantizer") is None, reason="ai-edge-quantizer not installed"
)


def _read(path: Path) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))


def _write(model: Any, path: Path) -> Path:
    from ai_edge_litert.tools import flatbuffer_utils

    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return path


def _op_names(path: Path) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = _read(path)
    return [
        names[flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
        for sg in model.subgraphs
        for op in sg.operators
    ]


def mediapipe_style(src: Path, dst: Path) -> Path:
    """Rewrite a float TFLite model the way MediaPipe ships its models: every float32 constant becomes
    an fp16 constant read through a DEQUANTIZE op, the SignatureDef is dropped, and operator codes keep
    only the deprecated field (``builtinCode`` left at 0, as old converters wrote them)."""
    from ai_edge_litert import schema_py_generated as schema

    model = _read(src)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    code.version = 2
    model.operatorCodes.append(code)
    dequantize_code = len(model.operatorCodes) - 1
    for subgraph in model.subgraphs:
        dequantizes = []
        for index, tensor in enumerate(list(subgraph.tensors)):
            data = model.buffers[tensor.buffer].data if tensor.buffer else None
            if tensor.type != schema.TensorType.FLOAT32 or data is None or not len(data):
                continue
            half = np.frombuffer(bytes(data), "<f4").astype("<f2")
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(half.tobytes(), np.uint8)
            model.buffers.append(buffer)
            packed = schema.TensorT()
            packed.name, packed.shape = tensor.name + b"_fp16", list(tensor.shape)
            packed.type, packed.buffer = schema.TensorType.FLOAT16, len(model.buffers) - 1
            subgraph.tensors.append(packed)
            tensor.buffer = 0  # now the DEQUANTIZE output
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dequantize_code, [len(subgraph.tensors) - 1], [index]
            dequantizes.append(op)
        subgraph.operators = dequantizes + list(subgraph.operators)
    for code in model.operatorCodes:
        code.builtinCode = 0
    model.signatureDefs = []
    return _write(model, dst)


def sparse_first_weight(src: Path, dst: Path, keep: float = 0.3) -> Path:
    """Store the first fp16 matrix of a MediaPipe-style model sparse, read through a DENSIFY op, the way
    MediaPipe's pose and full-range face detectors ship: CSR rows of fp16 values (most set to zero)."""
    from ai_edge_litert import schema_py_generated as schema

    model = _read(src)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DENSIFY
    code.version = 1
    model.operatorCodes.append(code)
    subgraph = model.subgraphs[0]
    index = next(i for i, t in enumerate(subgraph.tensors) if t.type == schema.TensorType.FLOAT16 and len(t.shape) == 2)
    tensor = subgraph.tensors[index]
    rows, cols = tensor.shape
    dense = np.frombuffer(bytes(model.buffers[tensor.buffer].data), "<f2").reshape(rows, cols).copy()
    dense[np.random.default_rng(1).random(dense.shape) > keep] = 0
    segments, indices = [0], []
    for row in dense:
        indices.extend(int(c) for c in np.flatnonzero(row))
        segments.append(len(indices))

    def int32_vector(values: list[int]) -> Any:
        vector = schema.Int32VectorT()
        vector.values = values
        return vector

    outer, inner = schema.DimensionMetadataT(), schema.DimensionMetadataT()
    outer.format, outer.denseSize = schema.DimensionType.DENSE, rows
    inner.format = schema.DimensionType.SPARSE_CSR
    inner.arraySegmentsType = inner.arrayIndicesType = schema.SparseIndexVector.Int32Vector
    inner.arraySegments, inner.arrayIndices = int32_vector(segments), int32_vector(indices)
    sparsity = schema.SparsityParametersT()
    sparsity.traversalOrder, sparsity.dimMetadata = [0, 1], [outer, inner]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(dense[dense != 0].astype("<f2").tobytes(), np.uint8)
    model.buffers.append(buffer)
    packed = schema.TensorT()
    packed.name, packed.shape, packed.type = tensor.name + b"_sparse", [rows, cols], schema.TensorType.FLOAT16
    packed.buffer, packed.sparsity = len(model.buffers) - 1, sparsity
    subgraph.tensors.append(packed)
    tensor.buffer = 0  # now the DENSIFY output
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = len(model.operatorCodes) - 1, [len(subgraph.tensors) - 1], [index]
    subgraph.operators = [op, *subgraph.operators]
    return _write(model, dst)


@pytest.fixture
def fp16_mlp(tmp_path: Path) -> dict[str, Any]:
    float_model = tiny_models.tflite_mlp(tmp_path / "float.tflite", din=64, dhidden=128, dout=16)
    rng = np.random.default_rng(0)
    calib = Dataset({"x": rng.random((48, 64)).astype(np.float32)}, {}, "test")
    return {"float": float_model, "fp16": mediapipe_style(float_model, tmp_path / "fp16.tflite"), "calib": calib}


def _ctx(tmp_path: Path, calib: Dataset | None) -> PassContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return PassContext(target=TargetSpec.from_class("x86_64-avx512vnni"), workdir=workdir, calib=calib)


def _cosine(a: Path, b: Path, x: np.ndarray) -> float:
    ra, rb = ModelRunner(a, 1), ModelRunner(b, 1)
    sims = []
    for i in range(len(x)):
        ya = np.concatenate([v.ravel() for v in ra.run({"x": x[i : i + 1]}).values()]).astype(np.float64)
        yb = np.concatenate([v.ravel() for v in rb.run({"x": x[i : i + 1]}).values()]).astype(np.float64)
        sims.append(float(ya @ yb / (np.linalg.norm(ya) * np.linalg.norm(yb))))
    return float(np.mean(sims))


@needs_quantizer
def test_the_test_model_looks_like_a_mediapipe_model(fp16_mlp: dict[str, Any]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = _read(fp16_mlp["fp16"])
    assert _op_names(fp16_mlp["fp16"]).count("DEQUANTIZE") == 4
    assert not model.signatureDefs and all(c.builtinCode == 0 for c in model.operatorCodes)
    assert Interpreter(model_path=str(fp16_mlp["fp16"])).get_signature_list() == {}
    assert _cosine(fp16_mlp["float"], fp16_mlp["fp16"], fp16_mlp["calib"].inputs["x"][:4]) > 0.9999


@needs_quantizer
def test_prepare_float_source_unpacks_fp16_weights_and_adds_a_signature(
    tmp_path: Path, fp16_mlp: dict[str, Any]
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from edgefleet.controller.compiler.passes.tflite_quantize import prepare_float_source

    out, edits = prepare_float_source(fp16_mlp["fp16"], tmp_path / "fp32.tflite")
    assert (edits.fp16_weights_unpacked, edits.signature_added) == (4, True)
    assert edits.opcodes_upgraded == 2
    assert "DEQUANTIZE" not in _op_names(out)
    model = _read(out)
    assert all(t.type != 10 for t in model.subgraphs[0].tensors), "no fp16 tensor may be left dangling"
    assert Interpreter(model_path=str(out)).get_signature_list() == {
        "serving_default": {"inputs": ["x"], "outputs": ["logits"]}
    }
    x = fp16_mlp["calib"].inputs["x"][:4]
    assert _cosine(fp16_mlp["fp16"], out, x) > 0.99999


@needs_quantizer
def test_sparse_weights_behind_densify_become_dense_constants(tmp_path: Path, fp16_mlp: dict[str, Any]) -> None:
    """Left as DENSIFY outputs, the quantizer took such weights for activations (zero point -128) and
    LiteRT refused the int8 conv; densified, the static recipe's model loads and runs."""
    from edgefleet.controller.compiler.passes.tflite_quantize import TfliteQuantize, prepare_float_source

    sparse = sparse_first_weight(fp16_mlp["fp16"], tmp_path / "sparse.tflite")
    assert _op_names(sparse).count("DENSIFY") == 1
    x = fp16_mlp["calib"].inputs["x"][:4]
    out, edits = prepare_float_source(sparse, tmp_path / "dense.tflite")
    assert edits.sparse_weights_densified == 1
    assert "DENSIFY" not in _op_names(out) and "DEQUANTIZE" not in _op_names(out)
    assert all(t.sparsity is None for t in _read(out).subgraphs[0].tensors)
    ra, rb = ModelRunner(sparse, 1), ModelRunner(out, 1)
    for i in range(len(x)):
        ya, yb = ra.run({"x": x[i : i + 1]}), rb.run({"x": x[i : i + 1]})
        assert all(np.array_equal(ya[k], yb[k]) for k in ya)
    built = TfliteQuantize(recipe="static").run(sparse, _ctx(tmp_path, fp16_mlp["calib"]))
    assert _cosine(sparse, built, x) > 0.98


@needs_quantizer
def test_prepare_float_source_leaves_a_ready_model_alone(tmp_path: Path, fp16_mlp: dict[str, Any]) -> None:
    from edgefleet.controller.compiler.passes.tflite_quantize import prepare_float_source

    out, edits = prepare_float_source(fp16_mlp["float"], tmp_path / "unused.tflite")
    assert out == fp16_mlp["float"] and not edits.changed and not (tmp_path / "unused.tflite").exists()


@needs_quantizer
@pytest.mark.parametrize("recipe", ["dynamic", "weight_only", "static"])
def test_each_recipe_quantizes_an_fp16_model_without_signature(
    tmp_path: Path, fp16_mlp: dict[str, Any], recipe: str
) -> None:
    from edgefleet.controller.compiler.passes.tflite_quantize import TfliteQuantize, _int_tensor_count

    ctx = _ctx(tmp_path, fp16_mlp["calib"])
    out = TfliteQuantize(recipe=recipe).run(fp16_mlp["fp16"], ctx)
    assert _int_tensor_count(out) >= 2  # both weight matrices at least
    assert out.stat().st_size < fp16_mlp["fp16"].stat().st_size  # int8 beats the fp16 source, not only fp32
    assert any("unpacked 4 fp16 weights" in note for note in ctx.notes)
    # It runs on LiteRT and stays close to the float model (static I/O is (de)quantized by the runner).
    assert _cosine(fp16_mlp["float"], out, fp16_mlp["calib"].inputs["x"][:16]) > 0.98


@needs_quantizer
def test_static_calibrates_through_signature_names_that_differ_from_tensor_names(
    tmp_path: Path, fp16_mlp: dict[str, Any]
) -> None:
    """TF-exported models name signature inputs ``x`` and tensors ``serving_default_x:0``; calibration
    files are keyed by tensor name (what the runner feeds), so the pass maps one to the other."""
    from edgefleet.controller.compiler.passes.tflite_quantize import TfliteQuantize

    model = _read(fp16_mlp["float"])
    model.signatureDefs[0].inputs[0].name = "features"
    renamed = _write(model, tmp_path / "renamed.tflite")
    out = TfliteQuantize(recipe="static").run(renamed, _ctx(tmp_path, fp16_mlp["calib"]))
    assert _cosine(fp16_mlp["float"], out, fp16_mlp["calib"].inputs["x"][:8]) > 0.98


@needs_quantizer
def test_static_names_the_missing_calibration_input(tmp_path: Path, fp16_mlp: dict[str, Any]) -> None:
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.passes.tflite_quantize import TfliteQuantize

    wrong = Dataset({"images": fp16_mlp["calib"].inputs["x"]}, {}, "test")
    with pytest.raises(CompileError, match=r"no array for input 'x' \(found: images\)"):
        TfliteQuantize(recipe="static").run(fp16_mlp["fp16"], _ctx(tmp_path, wrong))


def _fp16_add_model(path: Path, width: int = 64) -> Path:
    """y = x + c with c an fp16 constant behind DEQUANTIZE: a weight, but on no op that carries weights."""
    from ai_edge_litert import schema_py_generated as schema

    def tensor(name: str, kind: int, buffer: int = 0) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, width], kind, buffer
        return t

    def opcode(code: int) -> Any:
        c = schema.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = code
        c.version = 1
        return c

    def operator(code: int, inputs: list[int], output: int) -> Any:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, [output]
        return op

    weights = schema.BufferT()
    weights.data = np.frombuffer(np.linspace(-1, 1, width).astype("<f2").tobytes(), np.uint8)
    sub = schema.SubGraphT()
    sub.tensors = [
        tensor("x", schema.TensorType.FLOAT32),
        tensor("c_fp16", schema.TensorType.FLOAT16, 1),
        tensor("c", schema.TensorType.FLOAT32),
        tensor("y", schema.TensorType.FLOAT32),
    ]
    sub.inputs, sub.outputs = [0], [3]
    sub.operators = [operator(0, [1], 2), operator(1, [0, 2], 3)]
    model = schema.ModelT()
    model.version, model.subgraphs = 3, [sub]
    model.operatorCodes = [opcode(schema.BuiltinOperator.DEQUANTIZE), opcode(schema.BuiltinOperator.ADD)]
    model.buffers = [schema.BufferT(), weights]
    return _write(model, path)


@needs_quantizer
@pytest.mark.parametrize("recipe", ["dynamic", "weight_only"])
def test_a_model_with_nothing_to_quantize_still_fails_honestly(tmp_path: Path, recipe: str) -> None:
    """Unpacking fp16 weights to float32 must not pass for quantizing: the pass still says nothing was."""
    from edgefleet.controller.compiler.passes.tflite_quantize import TfliteQuantize

    model = _fp16_add_model(tmp_path / "add.tflite")
    with pytest.raises(PassError, match="nothing was quantized"):
        TfliteQuantize(recipe=recipe).run(model, _ctx(tmp_path, None))


def test_the_controller_extra_alone_installs_the_tflite_quantizer() -> None:
    """`pip install edgefleet[controller]` must compile both formats; `tflite` stays as an old name."""
    from edgefleet.controller.compiler.passes import PASS_REGISTRY

    root = Path(__file__).resolve().parents[3]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    controller = " ".join(extras["controller"]).replace("-", "_")
    for module in PASS_REGISTRY["tflite_quantize"].requires:
        assert module in controller, f"{module} is not in the controller extra"
    assert extras["tflite"] == ["edgefleet[controller]"]


def transpose_conv_bias_model(path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray, np.ndarray]:
    """A one-op model in MediaPipe's segmentation layout: Convolution2DTransposeBias (custom options
    {padding=same, stride 2, stride 2} as int32s), 2x2 kernel, 3 -> 2 channels, 4x4 -> 8x8."""
    from ai_edge_litert import schema_py_generated as schema

    weights = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)  # out, kh, kw, in
    bias = rng.standard_normal(2).astype(np.float32)
    model = schema.ModelT()
    model.version, model.description = 3, b"transpose conv bias"
    model.buffers = [schema.BufferT()]
    for array in (weights, bias):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(array.tobytes(), np.uint8)
        model.buffers.append(buffer)
    tensors = []
    for name, shape, buffer in ((b"x", [1, 4, 4, 3], 0), (b"w", [2, 2, 2, 3], 1), (b"b", [2], 2),
                                (b"y", [1, 8, 8, 2], 0)):
        tensor = schema.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name, shape, schema.TensorType.FLOAT32, buffer
        tensors.append(tensor)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = b"Convolution2DTransposeBias", 1
    model.operatorCodes = [code]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.customOptions = np.frombuffer(np.asarray([1, 2, 2], "<i4").tobytes(), np.uint8)
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs, subgraph.operators = tensors, [0], [3], [op]
    model.subgraphs = [subgraph]
    return _write(model, path), weights, bias


def test_mediapipe_transpose_conv_bias_becomes_the_builtin_openvino_reads(tmp_path: Path) -> None:
    """OpenVINO's TFLite frontend has no translator for this custom op, so a model ending in it got no
    OpenVINO candidate at all (MediaPipe's selfie segmentation: 1.00x, then 1.8x once rewritten)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgefleet.controller.compiler.passes.tflite_quantize import builtin_copy

    rng = np.random.default_rng(3)
    source, weights, bias = transpose_conv_bias_model(tmp_path / "tcb.tflite", rng)
    out, replaced = builtin_copy(source, tmp_path / "builtin.tflite")
    assert replaced == 1 and _op_names(out) == ["TRANSPOSE_CONV"]
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    # Kernel 2, stride 2, same padding: each input pixel paints its own 2x2 block of the output.
    expected = np.einsum("nijc,oabc->niajbo", x, weights).reshape(1, 8, 8, 2) + bias
    interp = Interpreter(model_path=str(out))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    np.testing.assert_allclose(interp.get_tensor(interp.get_output_details()[0]["index"]), expected, atol=1e-5)
    ov = pytest.importorskip("openvino")
    with pytest.raises(Exception, match="Convolution2DTransposeBias"):
        ov.Core().read_model(str(source))
    compiled = ov.Core().compile_model(ov.Core().read_model(str(out)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.asarray(next(iter(compiled.create_infer_request().infer({0: x}).values())))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert builtin_copy(out, tmp_path / "again.tflite") == (out, 0)



def test_openvino_ships_a_tflite_source_as_it_is_when_its_ir_is_no_smaller(
    tmp_path: Path, fp16_mlp: dict[str, Any]
) -> None:
    """An IR is an XML graph plus the weights. For a model whose graph outweighs its weights (small
    MediaPipe models with fp16 weights: 0.32 MB of TFLite became 0.69 MB of IR) the TFLite file ships
    instead, a copy (the chosen build is moved), and OpenVINO reads it on the device."""
    pytest.importorskip("openvino")
    from edgefleet.controller.compiler.passes.openvino_convert import OpenVinoConvert
    from edgefleet.controller.compiler.runner import RuntimeChoice, build_size

    small = tiny_models.tflite_mlp(tmp_path / "small.tflite", din=8, dhidden=8, dout=4)
    ir = OpenVinoConvert(keep_tflite=False).run(small, _ctx(tmp_path, None))
    assert ir.suffix == ".xml" and build_size(ir) > small.stat().st_size, "the case this test is about"
    ctx = _ctx(tmp_path, None)
    kept = OpenVinoConvert(compress_to_fp16=True).run(small, ctx)
    assert kept.suffix == ".tflite" and kept != small and small.is_file()
    assert kept.read_bytes() == small.read_bytes()
    assert any("TFLite file ships as it is" in n for n in ctx.notes), ctx.notes
    x = np.random.default_rng(1).random((4, 8)).astype(np.float32)
    litert, ov = ModelRunner(small, 1), ModelRunner(kept, 1, runtime=RuntimeChoice("openvino", "CPU", "f32"))
    for i in range(len(x)):
        want, got = litert.run({"x": x[i : i + 1]}), ov.run({"x": x[i : i + 1]})
        np.testing.assert_allclose(next(iter(got.values())), next(iter(want.values())), rtol=1e-4, atol=1e-5)
    # A fixed input shape needs the IR: the file OpenVINO would read on the device has the old one.
    assert OpenVinoConvert().run(small, replace(ctx, input_shapes={"x": (2, 8)})).suffix == ".xml"
    # Where the IR is the smaller file (weights that fp16 halves), the IR ships.
    assert OpenVinoConvert(compress_to_fp16=True).run(fp16_mlp["float"], _ctx(tmp_path, None)).suffix == ".xml"
