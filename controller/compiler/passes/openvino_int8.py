"""OpenVINO int8 by NNCF post-training quantization, accuracy-aware when it has to be.

NNCF calibrates activations on the user's samples (one sample per step, in the model's own shapes),
quantizes with its CPU-tuned scheme, and applies bias correction. With ``accuracy_control`` it runs
NNCF's accuracy-control loop instead: quantize everything, rank the quantized operations by their
measured effect on the gate's own metric over the held-out samples, and return them to float one
group at a time until the drop is within the gate's allowance, or ``max_iterations`` is spent. The
candidate then competes like any other: if the float operations it had to keep make it slower than
a build that passed, the timing says so and it is not chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param

_TRANSFORMER_OPS = {"Softmax", "MatMul"}
_NORM_OPS = {"MVN", "NormalizeL2", "LayerNorm"}


def is_transformer(ov_model: Any) -> bool:
    """Attention blocks (MatMul + Softmax) with normalization: NNCF's TRANSFORMER scheme keeps the ops
    that int8 hurts there (LayerNorm, Softmax inputs) in float."""
    ops = {op.get_type_name() for op in ov_model.get_ops()}
    return ops >= _TRANSFORMER_OPS and bool(_NORM_OPS & ops)


def sample_feeds(ctx: PassContext, names: list[str], limit: int) -> list[dict[str, np.ndarray]]:
    """Calibration samples as single feeds the model takes as they are."""
    if ctx.calib is None:
        raise PassError("int8 needs --calib data (int8 is never calibrated on random inputs)")
    return [{k: feed[k] for k in names if k in feed} for feed in ctx.calib.model_feeds(1, limit)]


class OpenVinoInt8(Pass["OpenVinoInt8.Params"]):
    name = "openvino_int8"

    @dataclass(frozen=True)
    class Params:
        preset: str = param("performance", "performance (symmetric activations) | mixed (asymmetric activations)")
        subset_size: int = param(128, "calibration samples NNCF collects statistics on")
        accuracy_control: bool = param(False, "return the most harmful int8 ops to float until the gate passes")
        max_iterations: int = param(12, "accuracy control: most float-restoring rounds before giving up")
        ranking_samples: int = param(8, "accuracy control: held-out samples that rank the ops by their harm")
        time_budget_s: float = param(180.0, "accuracy control: seconds it may search before it gives up")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import logging

        import nncf
        import openvino as ov

        # NNCF logs every step and draws progress bars; the compile prints its own progress.
        nncf.set_log_level(logging.ERROR)

        core = ov.Core()
        ov_model = core.read_model(str(model))
        names = [port.get_any_name() for port in ov_model.inputs]
        feeds = sample_feeds(ctx, names, self.params.subset_size)
        if self.params.preset not in ("performance", "mixed"):
            raise PassError(f"unknown NNCF preset '{self.params.preset}'; use performance or mixed")
        preset = nncf.QuantizationPreset.MIXED if self.params.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
        model_type = nncf.ModelType.TRANSFORMER if is_transformer(ov_model) else None
        if model_type is not None:
            ctx.notes.append("NNCF transformer scheme (attention and normalization found)")
        common: dict[str, Any] = {
            "preset": preset,
            "subset_size": len(feeds),
            "model_type": model_type,
            "fast_bias_correction": True,
        }
        try:
            if self.params.accuracy_control:
                quantized = self._with_accuracy_control(nncf, ov_model, feeds, ctx, common)
            else:
                quantized = nncf.quantize(ov_model, nncf.Dataset(feeds), **common)
        except PassError:
            raise
        except Exception as exc:  # NNCF raises its own errors for graphs it cannot handle
            raise PassError(f"NNCF could not quantize the model ({_first_line(exc)})") from exc
        out = ctx.new_path("openvino-int8", ".xml")
        ov.save_model(quantized, str(out), compress_to_fp16=False)
        return out

    def _with_accuracy_control(
        self, nncf: Any, ov_model: Any, feeds: list[dict[str, np.ndarray]], ctx: PassContext, common: dict[str, Any]
    ) -> Any:
        probe = ctx.gate_probe
        if probe is None:
            raise PassError("accuracy-aware int8 needs the gate's held-out samples")

        # NNCF has no time limit, and each round that makes the drop worse ranks every remaining op
        # again (about 2 min for PP-OCRv4 det's 104 groups on 2 cores: 9 min in all, still failing).
        # Every evaluation comes through validate(), so that is where the search is stopped.
        deadline = time.monotonic() + self.params.time_budget_s
        # Scores on the whole held-out set (ranking scores use subsets): NNCF scores fp32 first.
        scores: list[float] = []
        stopped: list[bool] = []

        def validate(compiled: Any, data: Any) -> float:
            if time.monotonic() > deadline:
                stopped.append(True)
                raise TimeoutError("accuracy control time budget")
            runs = []
            for feed in data:
                result = compiled(feed)
                runs.append([np.asarray(result[port]) for port in compiled.outputs])
            value = float(probe.score(runs))
            if len(runs) == len(probe.feeds):
                scores.append(value)
            return value

        ctx.say(f"    accuracy control: int8 ops back to float until the drop is within {probe.allowed_drop:g}")
        try:
            quantized = self._restore(nncf, ov_model, feeds, probe, validate, common)
        except Exception as exc:
            if not stopped:
                raise
            best = f"best score {max(scores[1:]):.4f} against fp32's {scores[0]:.4f}" if len(scores) > 1 else ""
            raise PassError(
                f"accuracy control stopped at its {self.params.time_budget_s:g} s budget without reaching a "
                f"drop of at most {probe.allowed_drop:g}" + (f" ({best})" if best else "")
            ) from exc
        compute = ("Convolution", "MatMul", "GroupConvolution")
        total = sum(1 for op in ov_model.get_ops() if op.get_type_name() in compute)
        float_back = _float_compute_ops(quantized)
        ctx.notes.append(f"accuracy control kept {float_back} of {total} conv/matmul ops in float")
        return quantized

    def _restore(
        self, nncf: Any, ov_model: Any, feeds: list[dict[str, np.ndarray]], probe: Any, validate: Any,
        common: dict[str, Any],
    ) -> Any:
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        return nncf.quantize_with_accuracy_control(
            ov_model,
            nncf.Dataset(feeds),
            nncf.Dataset(probe.feeds),
            validate,
            max_drop=probe.allowed_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            # Ranking re-runs the model once per quantized op group on each ranking sample: on a 2-core
            # box NNCF's default subset took 5 min for PP-OCRv4 rec; a few samples rank as well.
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=self.params.max_iterations,
                ranking_subset_size=min(len(probe.feeds), self.params.ranking_samples),
            ),
            **common,
        )


def _float_compute_ops(ov_model: Any) -> int:
    """Conv/MatMul ops whose weights are not fed through a FakeQuantize (left in float)."""
    count = 0
    for op in ov_model.get_ops():
        if op.get_type_name() not in ("Convolution", "MatMul", "GroupConvolution"):
            continue
        producers = {op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())}
        if not producers & {"FakeQuantize", "FakeConvert"}:
            count += 1
    return count


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
