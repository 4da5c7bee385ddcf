"""TFLite input: ai-edge-quantizer recipes (dynamic, weight-only, static int8 with calibration).

Many published TFLite models (MediaPipe's among them) store their weights as fp16 constants behind
DEQUANTIZE ops and carry no SignatureDef. ai-edge-quantizer sees neither: it only quantizes float32
constants, and its calibrator only runs signatures. So before the recipe runs, the pass rewrites a copy
of the model: each sparse constant + DENSIFY pair becomes the dense constant, each fp16 constant +
DEQUANTIZE pair becomes one float32 constant, a model without
signatures gets a ``serving_default`` signature naming its tensors, and operator codes written by old
converters (only the deprecated field set) get their ``builtinCode``, which is the one field
ai-edge-quantizer reads. The rewrite uses the flatbuffer
tools ai-edge-litert ships (the ones ai-edge-quantizer itself reads models with).

If the quantizer leaves every weight in float (no op it supports), the pass fails with "nothing was
quantized" instead of shipping a float model under an int8 name and a made-up size ratio. The result
must also load and run on the LiteRT interpreter with finite outputs, or the candidate is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.data import Dataset
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param

DEFAULT_SIGNATURE_KEY = "serving_default"  # the key ai-edge-quantizer and the TF converter use


@dataclass(frozen=True)
class FloatSourceEdits:
    """What the rewrite before quantization changed, for the pass's notes."""

    fp16_weights_unpacked: int = 0
    signature_added: bool = False
    opcodes_upgraded: int = 0
    sparse_weights_densified: int = 0
    custom_ops_replaced: int = 0

    @property
    def changed(self) -> bool:
        return (
            self.fp16_weights_unpacked > 0
            or self.signature_added
            or self.opcodes_upgraded > 0
            or self.sparse_weights_densified > 0
            or self.custom_ops_replaced > 0
        )


def _int_tensor_count(path: Path) -> int:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return sum(1 for d in interp.get_tensor_details() if np.dtype(d["dtype"]) in (np.int8, np.uint8, np.int16))


def _decode(name: bytes | str | None) -> str:
    if name is None:
        return ""
    return name.decode("utf-8") if isinstance(name, bytes) else name


def _unpack_fp16_weights(model: Any) -> int:
    """Fold every fp16 constant -> DEQUANTIZE pair into one float32 constant; returns how many.

    The DEQUANTIZE output tensor takes the float32 data and the op goes away. A pair is left alone when
    its output is a subgraph output (there would be no op left to produce it). fp16 constants that no
    op reads any more are removed, so the float32 copy replaces them instead of adding to them.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    folded = 0
    for subgraph in model.subgraphs or []:
        outputs = set(subgraph.outputs or [])
        kept = []
        for op in subgraph.operators or []:
            code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            if code == schema.BuiltinOperator.DEQUANTIZE and len(op.inputs) == 1 and len(op.outputs) == 1:
                src, dst = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
                data = model.buffers[src.buffer].data if src.buffer else None
                if (
                    src.type == schema.TensorType.FLOAT16
                    and dst.type == schema.TensorType.FLOAT32
                    and data is not None
                    and len(data)
                    and op.outputs[0] not in outputs
                ):
                    weights = np.frombuffer(bytes(data), dtype="<f2").astype("<f4")
                    buffer = schema.BufferT()
                    buffer.data = np.frombuffer(weights.tobytes(), np.uint8)
                    model.buffers.append(buffer)
                    dst.buffer = len(model.buffers) - 1
                    folded += 1
                    continue
            kept.append(op)
        subgraph.operators = kept
    if folded:
        _drop_unread_tensors(model)
    return folded


def _densify_sparse_weights(model: Any, model_path: Path) -> int:
    """Replace every DENSIFY of a sparse constant (MediaPipe's pose and face detectors store weights so)
    with the dense constant it produces; returns how many.

    Left in place, the conv behind it reads a computed tensor, not a constant: ai-edge-quantizer then
    quantizes that "weight" like an activation (asymmetric, zero point -128), which LiteRT's int8
    CONV_2D refuses to load. The dense values are LiteRT's own: one run of the source with every
    tensor kept, so the sparse format is decoded by the runtime that defines it.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from ai_edge_litert.tools import flatbuffer_utils

    if not model.subgraphs:
        return 0
    subgraph = model.subgraphs[0]  # the interpreter's tensor indices are the first subgraph's
    targets = []
    for op in subgraph.operators or []:
        code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
        if code == schema.BuiltinOperator.DENSIFY and len(op.inputs) == 1 and len(op.outputs) == 1:
            src = subgraph.tensors[op.inputs[0]]
            constant = bool(src.buffer) and model.buffers[src.buffer].data is not None
            if constant and op.outputs[0] not in (subgraph.outputs or []):
                targets.append(op)
    if not targets:
        return 0
    # Without the default XNNPACK delegate: it takes the DENSIFY nodes over and never writes their outputs.
    interp = Interpreter(
        model_path=str(model_path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interp.allocate_tensors()
    for detail in interp.get_input_details():
        interp.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interp.invoke()
    for op in targets:
        dense = np.ascontiguousarray(interp.get_tensor(op.outputs[0]))
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(dense.tobytes(), np.uint8)
        model.buffers.append(buffer)
        subgraph.tensors[op.outputs[0]].buffer = len(model.buffers) - 1
    subgraph.operators = [op for op in subgraph.operators if op not in targets]
    _drop_unread_tensors(model)
    return len(targets)


# MediaPipe's custom op: a transposed convolution with a bias, which TRANSPOSE_CONV (version 3) has
# built in. Its custom options are the C struct {padding, stride_width, stride_height} as int32s, with
# TfLitePadding's numbering (1 = same, 2 = valid).
_TRANSPOSE_CONV_BIAS = b"Convolution2DTransposeBias"


def _builtin_code_index(model: Any, builtin: int, version: int) -> int:
    from ai_edge_litert import schema_py_generated as schema

    for index, code in enumerate(model.operatorCodes):
        if code.builtinCode == builtin and code.version >= version and not code.customCode:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.version = builtin, version
    code.deprecatedBuiltinCode = min(builtin, 127)  # the int8 field holds the placeholder past 127
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def replace_custom_ops(model: Any) -> int:
    """Rewrite the custom ops that have a builtin equivalent into that builtin; returns how many.

    OpenVINO's TFLite frontend and ai-edge-quantizer know only builtin ops, so one custom op (MediaPipe's
    selfie and hair segmentation models end in Convolution2DTransposeBias) keeps every OpenVINO and
    int8 candidate away from the whole model.
    """
    from ai_edge_litert import schema_py_generated as schema

    replaced = 0
    for subgraph in model.subgraphs or []:
        for op in subgraph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            options = bytes(op.customOptions) if op.customOptions is not None else b""
            if code.customCode != _TRANSPOSE_CONV_BIAS or len(op.inputs) != 3 or len(options) < 12:
                continue
            padding, stride_w, stride_h = np.frombuffer(options[:12], "<i4")
            output = subgraph.tensors[op.outputs[0]]
            if padding not in (1, 2) or not output.shape or any(d <= 0 for d in output.shape):
                continue  # a dynamic output shape would need a Shape subgraph; leave the op alone
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.asarray(output.shape, "<i4").tobytes(), np.uint8)
            model.buffers.append(buffer)
            shape = schema.TensorT()
            shape.name, shape.shape = output.name + b"_output_shape", [len(output.shape)]
            shape.type, shape.buffer = schema.TensorType.INT32, len(model.buffers) - 1
            subgraph.tensors.append(shape)
            params = schema.TransposeConvOptionsT()
            params.padding = schema.Padding.SAME if padding == 1 else schema.Padding.VALID
            params.strideW, params.strideH = int(stride_w), int(stride_h)
            data, weights, bias = op.inputs
            op.opcodeIndex = _builtin_code_index(model, schema.BuiltinOperator.TRANSPOSE_CONV, 3)
            op.inputs = [len(subgraph.tensors) - 1, weights, data, bias]
            op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.TransposeConvOptions, params
            op.customOptions, op.customOptionsFormat = None, 0
            replaced += 1
    return replaced


def builtin_copy(model_path: Path, out: Path) -> tuple[Path, int]:
    """``model_path`` with ``replace_custom_ops`` applied, written to ``out``; the path itself (and 0)
    when it has no such op."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_path.read_bytes()))
    replaced = replace_custom_ops(model)
    if not replaced:
        return model_path, 0
    out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return out, replaced


def _drop_unread_tensors(model: Any) -> None:
    """Remove the tensors no op reads or writes any more (the fp16 originals) and empty their buffers.

    A dangling tensor with no data is not harmless: the calibrator reads every named tensor after each
    run and fails on one that was never allocated.
    """
    from ai_edge_litert import schema_py_generated as schema

    read_buffers: set[int] = {m.buffer for m in model.metadata or []}
    for index, subgraph in enumerate(model.subgraphs or []):
        used: set[int] = {*(subgraph.inputs or []), *(subgraph.outputs or [])}
        for op in subgraph.operators or []:
            used.update(i for i in [*(op.inputs or []), *(op.outputs or []), *(op.intermediates or [])] if i >= 0)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                used.update(m.tensorIndex for m in [*(sig.inputs or []), *(sig.outputs or [])])
        remap = {old: new for new, old in enumerate(sorted(used))}
        subgraph.tensors = [subgraph.tensors[old] for old in sorted(used)]

        def renumber(indices: Any, remap: dict[int, int] = remap) -> list[int] | None:
            return None if indices is None else [remap[i] if i >= 0 else i for i in indices]

        subgraph.inputs, subgraph.outputs = renumber(subgraph.inputs), renumber(subgraph.outputs)
        for op in subgraph.operators or []:
            op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
            op.intermediates = renumber(op.intermediates)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                for entry in [*(sig.inputs or []), *(sig.outputs or [])]:
                    entry.tensorIndex = remap[entry.tensorIndex]
        read_buffers.update(t.buffer for t in subgraph.tensors)
    for index in range(1, len(model.buffers)):
        if index not in read_buffers:
            model.buffers[index] = schema.BufferT()


def _upgrade_operator_codes(model: Any) -> int:
    """Fill ``builtinCode`` from ``deprecatedBuiltinCode`` in models written by older converters.

    Older files set only the deprecated int8 field and leave ``builtinCode`` at 0 (ADD). LiteRT reads
    the larger of the two, but ai-edge-quantizer reads ``builtinCode`` alone, so to it every op is an
    ADD and nothing gets quantized.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    upgraded = 0
    for code in model.operatorCodes or []:
        real = flatbuffer_utils.get_builtin_code_from_operator_code(code)
        if code.builtinCode != real:
            code.builtinCode = real
            upgraded += 1
    return upgraded


def _add_default_signature(model: Any) -> bool:
    """Give a model without signatures one for its main subgraph, named after its tensors, so the
    calibrator (which only runs signatures) can feed it samples keyed like the model's inputs."""
    from ai_edge_litert import schema_py_generated as schema

    if model.signatureDefs or not model.subgraphs:
        return False
    main = model.subgraphs[0]

    def tensor_maps(indices: list[int]) -> list[Any]:
        maps = []
        for i in indices:
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = _decode(main.tensors[i].name) or f"tensor_{i}", i
            maps.append(entry)
        return maps

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = DEFAULT_SIGNATURE_KEY, 0
    sig.inputs, sig.outputs = tensor_maps(list(main.inputs or [])), tensor_maps(list(main.outputs or []))
    model.signatureDefs = [sig]
    return True


def prepare_float_source(model_path: Path, out: Path) -> tuple[Path, FloatSourceEdits]:
    """The model as ai-edge-quantizer can work on it: float32 weights and a signature.

    Returns ``model_path`` itself when nothing needed changing.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_path.read_bytes()))
    opcodes = _upgrade_operator_codes(model)
    densified = _densify_sparse_weights(model, model_path)
    edits = FloatSourceEdits(_unpack_fp16_weights(model), _add_default_signature(model), opcodes, densified,
                             replace_custom_ops(model))
    if not edits.changed:
        return model_path, edits
    out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return out, edits


def signature_feeds(model_path: Path, calib: Dataset, count: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration samples keyed the way the calibrator wants them: by signature key, then by the
    signature's input names (which need not be the tensor names the calibration file uses)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))
    signatures: Mapping[str, Any] = interp._get_full_signature_list()  # the calibrator reads it too
    if not signatures:
        raise PassError("the model has no signature to calibrate; this is a bug in prepare_float_source")
    key = DEFAULT_SIGNATURE_KEY if DEFAULT_SIGNATURE_KEY in signatures else next(iter(signatures))
    by_index = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    names = {}
    for sig_name, tensor_index in signatures[key]["inputs"].items():
        tensor_name = by_index.get(tensor_index, sig_name)
        source = tensor_name if tensor_name in calib.inputs else sig_name
        if source not in calib.inputs:
            raise CompileError(
                f"calibration data has no array for input '{tensor_name}' (found: {', '.join(sorted(calib.inputs))}); "
                "pass --calib with keys named after the model inputs"
            )
        names[sig_name] = source
    samples = [{sig: calib.inputs[src][i : i + 1] for sig, src in names.items()} for i in range(count)]
    return {key: samples}


def smoke_run(path: Path, calib: Dataset | None) -> None:
    """Load and run the quantized model once on LiteRT; raise PassError when it cannot."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
        for detail in interp.get_input_details():
            dtype, shape = np.dtype(detail["dtype"]), tuple(detail["shape"])
            sample = calib.inputs.get(detail["name"]) if calib is not None else None
            arr = sample[:1].reshape(shape) if sample is not None and sample[:1].size == np.prod(shape) else None
            if arr is None:
                arr = np.zeros(shape, dtype)
            scale, zero = detail.get("quantization", (0.0, 0))
            if dtype.kind in "iu" and scale:
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zero), info.min, info.max)
            interp.set_tensor(detail["index"], arr.astype(dtype))
        interp.invoke()
        outputs = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    except Exception as exc:
        raise PassError(
            f"the quantized model does not run on LiteRT ({str(exc).strip().splitlines()[0][:160]}); try another recipe"
        ) from exc
    bad = [d["name"] for d, o in zip(interp.get_output_details(), outputs, strict=True) if not np.isfinite(o).all()]
    if bad:
        raise PassError(f"the quantized model gives non-finite values in output '{bad[0]}'; try another recipe")


class TfliteQuantize(Pass["TfliteQuantize.Params"]):
    name = "tflite_quantize"

    @dataclass(frozen=True)
    class Params:
        recipe: str = param(
            "dynamic",
            "dynamic (int8 weights, float activations computed in int8) | "
            "weight_only (int8 weights dequantized at load) | static (int8 everywhere)",
        )
        max_calib_samples: int = param(64, "cap on calibration samples for the static recipe")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from ai_edge_quantizer import quantizer, recipe

        recipes: dict[str, Any] = {
            "dynamic": recipe.dynamic_wi8_afp32,
            "weight_only": recipe.weight_only_wi8_afp32,
            "static": recipe.static_wi8_ai8,
        }
        if self.params.recipe not in recipes:
            raise PassError(f"unknown ai-edge-quantizer recipe '{self.params.recipe}'")
        if self.params.recipe == "static" and ctx.calib is None:
            raise CompileError("the static TFLite recipe needs realistic calibration data; pass --calib")
        try:
            source, edits = prepare_float_source(model, ctx.new_path("tflite-fp32-source", ".tflite"))
        except Exception as exc:
            raise PassError(
                f"could not rewrite the TFLite flatbuffer for ai-edge-quantizer ({str(exc).strip()[:160]}); "
                "the float model stays the answer"
            ) from exc
        if edits.fp16_weights_unpacked:
            ctx.notes.append(f"tflite_quantize: unpacked {edits.fp16_weights_unpacked} fp16 weights to float32")
        if edits.sparse_weights_densified:
            ctx.notes.append(f"tflite_quantize: densified {edits.sparse_weights_densified} sparse weights")
        if edits.custom_ops_replaced:
            ctx.notes.append(f"tflite_quantize: {edits.custom_ops_replaced} custom op(s) rewritten as builtins")
        if edits.opcodes_upgraded:
            ctx.notes.append(f"tflite_quantize: filled {edits.opcodes_upgraded} opcodes from the deprecated field")
        if edits.signature_added:
            ctx.notes.append(f"tflite_quantize: added signature '{DEFAULT_SIGNATURE_KEY}' for calibration")
        qt = quantizer.Quantizer(str(source))
        qt.load_quantization_recipe(recipes[self.params.recipe]())
        try:
            if self.params.recipe == "static":
                assert ctx.calib is not None
                n = min(ctx.calib.count, self.params.max_calib_samples)
                result = qt.quantize(qt.calibrate(signature_feeds(source, ctx.calib, n)))
            else:
                result = qt.quantize()
        except (CompileError, PassError):
            raise
        except Exception as exc:
            raise PassError(f"ai-edge-quantizer failed ({str(exc).strip().splitlines()[0][:160]})") from exc
        out = ctx.new_path(f"tflite-{self.params.recipe}", ".tflite")
        result.export_model(str(out))
        if _int_tensor_count(out) <= _int_tensor_count(model):
            raise PassError(
                f"nothing was quantized by the '{self.params.recipe}' recipe (no supported op); "
                "the float model stays the answer"
            )
        smoke_run(out, ctx.calib)
        return out
