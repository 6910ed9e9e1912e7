"""The Open Inference Protocol's conversions (serving.oip, serving.oip_wire): tensors to the data
plane's work, every refusal naming what was wrong, and hand-written answers that tritonclient's
own classes parse."""

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton

from serving import oip
from serving.domain import History, SequenceSteps
from serving.errors import InvalidInput, Unsupported
from serving.oip_servicer import request_from
from serving.oip_wire import infer_response, stream_error
from serving.proto import oip as pb

T0 = 1_388_534_400_000


def tensors(values, stamps, raw=True, cov=None):
    v, ts = np.asarray(values, np.float32), np.asarray(stamps, np.int64)
    out = [
        oip.Tensor("values", "FP32", list(v.shape), v.tobytes() if raw else v.ravel().tolist()),
        oip.Tensor("timestamps_ms", "INT64", list(ts.shape), ts.tobytes() if raw else ts.ravel().tolist()),
    ]
    if cov is not None:
        c = np.asarray(cov, np.float32)
        out.append(oip.Tensor("covariates", "FP32", list(c.shape), c.tobytes() if raw else c.ravel().tolist()))
    return out


@pytest.mark.parametrize("raw", [True, False])
def test_one_step_of_a_sequence_raw_or_typed_is_the_same_work(raw):
    work = oip.work_from(tensors([[2.5]], [[T0]], raw), oip.sequence_parameters(7, True, None))
    assert isinstance(work, SequenceSteps)
    assert (work.sequence_id, list(work.values), list(work.timestamps_ms), work.start, work.end) == (
        7, [2.5], [T0], True, False,
    )  # fmt: skip
    assert [tuple(c) for c in work.covariates] == [()]


def test_several_steps_with_covariates_and_stateless_rows():
    cov = np.arange(6, dtype=np.float32).reshape(1, 3, 2)
    steps = oip.work_from(tensors([[1, 2, 3]], [[T0, T0 + 1, T0 + 2]], cov=cov), ("s", False, True))
    assert steps.values == [1.0, 2.0, 3.0] and steps.covariates == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert steps.end and not steps.start
    rows = oip.work_from(tensors([[1, 2], [3, 4]], [[T0, T0 + 1]] * 2), oip.sequence_parameters(0, None, None))
    assert [type(r) for r in rows] == [History, History] and rows[1].values.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: oip.work_from(tensors([[1.0]], [[T0]])[:1]), "input 'timestamps_ms' is missing"),
        (
            lambda: oip.work_from([oip.Tensor("value", "FP32", [1, 1], b"\0" * 4)]),
            "unknown input 'value': the model takes values",
        ),
        (
            lambda: oip.work_from([oip.Tensor("values", "FP64", [1, 1], b"\0" * 8)]),
            "input 'values' has datatype FP64; the model takes FP32",
        ),
        (
            lambda: oip.work_from([tensors([[1.0]], [[T0]])[0]] * 2),
            "input 'values' is given twice",
        ),
        (
            lambda: oip.work_from(tensors([[1.0, 2.0]], [[T0]])),
            r"input 'timestamps_ms' has shape \[1, 1\]; it must match values' \[1, 2\]",
        ),
        (
            lambda: oip.work_from(
                [oip.Tensor("values", "FP32", [1, 2], b"\0" * 4), tensors([[1.0]], [[T0, T0]])[1]],
                oip.sequence_parameters("a", None, None),
            ),
            r"input 'values': 4 bytes of raw contents; shape \[1, 2\] of FP32 takes 8",
        ),
        (
            lambda: oip.work_from(tensors([[1.0], [2.0]], [[T0], [T0]]), ("a", True, False)),
            r"one row \(B = 1\)",
        ),
        (lambda: oip.work_from(tensors([[1.0]], [[T0]]), outputs=["mean"]), "unknown output 'mean'"),
        (lambda: oip.sequence_parameters(0, True, None), "sequence_start and sequence_end need a sequence_id"),
        (lambda: oip.sequence_parameters(1.5, None, None), "sequence_id is 1.5; it must be an integer or a string"),
        (lambda: oip.sequence_parameters(3, 1, None), "sequence_start is 1; it must be a boolean"),
    ],
)
def test_refusals_name_the_input_or_parameter(make, message):
    with pytest.raises(InvalidInput, match=message):
        make()


def test_a_grpc_request_carries_its_refusal_and_its_id():
    m = pb.ModelInferRequest(model_name="forecaster", id="r9")
    m.parameters["sequence_id"].int64_param = 4
    m.parameters["sequence_start"].int64_param = 1  # not a bool
    m.inputs.add(name="values", datatype="FP32", shape=[1, 1])
    m.inputs.add(name="timestamps_ms", datatype="INT64", shape=[1, 1])
    m.raw_input_contents.extend([struct.pack("<f", 1.0), struct.pack("<q", T0)])
    request = request_from(m)
    assert isinstance(request.work, InvalidInput) and "sequence_start is 1" in str(request.work)
    assert request.tag == ("r9", "forecaster")
    m.parameters["sequence_start"].bool_param = True
    assert request_from(m).work == SequenceSteps(4, (T0,), (1.0,), ((),), True, False)
    m.outputs.add(name="forecast").parameters["classification"].int64_param = 3
    assert isinstance(request_from(m).work, Unsupported)


def test_answers_written_by_hand_parse_with_tritonclients_classes():
    forecast = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    unary = infer_response("forecaster", "7", "r1", "forecast", "FP32", forecast.shape, forecast.tobytes())
    streamed = infer_response("forecaster", "7", "", "forecast", "FP32", forecast.shape, forecast.tobytes(), True)
    answers = {
        "r1": triton.ModelInferResponse.FromString(unary),
        "": triton.ModelStreamInferResponse.FromString(streamed).infer_response,
    }
    for request_id, response in answers.items():
        assert (response.model_name, response.model_version, response.id) == ("forecaster", "7", request_id)
        (output,) = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("forecast", "FP32", [1, 4, 3])
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), forecast.ravel())
    error = triton.ModelStreamInferResponse.FromString(stream_error("request 'r2': bad", "forecaster", "", "r2"))
    assert (error.error_message, error.infer_response.id) == ("request 'r2': bad", "r2")
