"""Build the tiny models the profiler ships as package data (dev-time script; the agent never runs it).

The agent must not import `onnx` (it is a controller-side dependency), so the graphs the micro-benchmark
and the provider probe need are built here once and committed:

- `matmul_fp32.onnx`: Y = MatMul(A, B), float32, all dimensions symbolic so the benchmark picks the size.
- `matmul_int8.onnx`: Y = MatMulInteger(A uint8, B int8) -> int32, the u8s8 GEMM onnxruntime's int8
  kernels (VNNI, dotprod, i8mm) serve; dimensions symbolic.
- `probe_add.tflite`: out = ADD(x, x), float32 [1, 4], to check which LiteRT delegates really run.

IR version 7 / opset 13 keep them loadable by old onnxruntime builds found on Jetsons and Pis.

Regenerate with: `.venv/bin/python agent/profiler/models/make_models.py` (needs onnx and flatbuffers).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_onnx() -> None:
    import onnx
    from onnx import TensorProto, helper

    graphs = {
        "matmul_fp32.onnx": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT),
        "matmul_int8.onnx": ("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32),
    }
    for filename, (op, a_type, b_type, y_type) in graphs.items():
        graph = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["Y"])],
            filename.removesuffix(".onnx"),
            [
                helper.make_tensor_value_info("A", a_type, ["M", "K"]),
                helper.make_tensor_value_info("B", b_type, ["K", "N"]),
            ],
            [helper.make_tensor_value_info("Y", y_type, ["M", "N"])],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet-profiler"
        )
        model.ir_version = 7
        onnx.checker.check_model(model)
        (HERE / filename).write_bytes(model.SerializeToString(deterministic=True))


def make_tflite() -> None:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    builder = flatbuffers.Builder(1024)

    def shape(dims: list[int]) -> int:
        schema.TensorStartShapeVector(builder, len(dims))
        for dim in reversed(dims):
            builder.PrependInt32(dim)
        return builder.EndVector()

    def tensor(name: str) -> int:
        label, dims = builder.CreateString(name), shape([1, 4])
        schema.TensorStart(builder)
        schema.TensorAddShape(builder, dims)
        schema.TensorAddType(builder, schema.TensorType.FLOAT32)
        schema.TensorAddBuffer(builder, 0)
        schema.TensorAddName(builder, label)
        return schema.TensorEnd(builder)

    def int_vector(start: object, values: list[int]) -> int:
        start(builder, len(values))  # type: ignore[operator]
        for value in reversed(values):
            builder.PrependInt32(value)
        return builder.EndVector()

    tensors = [tensor("x"), tensor("out")]
    schema.SubGraphStartTensorsVector(builder, len(tensors))
    for item in reversed(tensors):
        builder.PrependUOffsetTRelative(item)
    tensor_vector = builder.EndVector()

    op_inputs = int_vector(schema.OperatorStartInputsVector, [0, 0])
    op_outputs = int_vector(schema.OperatorStartOutputsVector, [1])
    schema.OperatorStart(builder)
    schema.OperatorAddOpcodeIndex(builder, 0)
    schema.OperatorAddInputs(builder, op_inputs)
    schema.OperatorAddOutputs(builder, op_outputs)
    operator = schema.OperatorEnd(builder)
    schema.SubGraphStartOperatorsVector(builder, 1)
    builder.PrependUOffsetTRelative(operator)
    operators = builder.EndVector()

    sub_inputs = int_vector(schema.SubGraphStartInputsVector, [0])
    sub_outputs = int_vector(schema.SubGraphStartOutputsVector, [1])
    name = builder.CreateString("main")
    schema.SubGraphStart(builder)
    schema.SubGraphAddTensors(builder, tensor_vector)
    schema.SubGraphAddInputs(builder, sub_inputs)
    schema.SubGraphAddOutputs(builder, sub_outputs)
    schema.SubGraphAddOperators(builder, operators)
    schema.SubGraphAddName(builder, name)
    subgraph = schema.SubGraphEnd(builder)
    schema.ModelStartSubgraphsVector(builder, 1)
    builder.PrependUOffsetTRelative(subgraph)
    subgraphs = builder.EndVector()

    schema.OperatorCodeStart(builder)
    schema.OperatorCodeAddDeprecatedBuiltinCode(builder, schema.BuiltinOperator.ADD)
    schema.OperatorCodeAddBuiltinCode(builder, schema.BuiltinOperator.ADD)
    schema.OperatorCodeAddVersion(builder, 1)
    opcode = schema.OperatorCodeEnd(builder)
    schema.ModelStartOperatorCodesVector(builder, 1)
    builder.PrependUOffsetTRelative(opcode)
    opcodes = builder.EndVector()

    schema.BufferStart(builder)
    empty = schema.BufferEnd(builder)
    schema.ModelStartBuffersVector(builder, 1)
    builder.PrependUOffsetTRelative(empty)
    buffers = builder.EndVector()

    description = builder.CreateString("edgefleet profiler delegate probe")
    schema.ModelStart(builder)
    schema.ModelAddVersion(builder, 3)
    schema.ModelAddOperatorCodes(builder, opcodes)
    schema.ModelAddSubgraphs(builder, subgraphs)
    schema.ModelAddDescription(builder, description)
    schema.ModelAddBuffers(builder, buffers)
    builder.Finish(schema.ModelEnd(builder), file_identifier=b"TFL3")
    (HERE / "probe_add.tflite").write_bytes(bytes(builder.Output()))


if __name__ == "__main__":
    make_onnx()
    make_tflite()
    print(f"wrote models to {HERE}")
