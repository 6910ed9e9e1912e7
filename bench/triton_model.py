"""The step graph behind NVIDIA Triton's sequence batcher: a Triton python-backend model.

bench/peers.py copies this file into a Triton model repository as ``forecaster/1/model.py``, with
the registered version's ``model.onnx`` beside it, and starts the ``tritonserver`` that the
``nvidia-pytriton`` wheel bundles. It runs inside Triton's python-backend stub process (the
peers' virtual environment), never in this project's: it imports numpy, onnxruntime and Triton's
``triton_python_backend_utils`` only.

What a Triton user would write to serve a stateful recurrent model: the sequence batcher (Oldest
strategy) hands ``execute`` a batch of requests, each one step of one sequence, with the control
inputs START, END and CORRID; the model keeps each sequence's recurrent state in rows of
preallocated arrays keyed by the correlation id, gathers the batch's rows, runs the step graph
once with onnxruntime, and scatters the new state back. Every request/response crosses the
python backend's extra hop (shared memory between ``tritonserver`` and the stub process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        # The same session settings as the forecast server (serving/runtime.py): one intra-op
        # thread, sequential, no spinning, all graph optimisations.
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(here / "model.onnx"), so, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_names = [n.strip() for n in meta["state"].split(",") if n.strip()]
        config = json.loads(args["model_config"])
        capacity = int(config["sequence_batching"]["oldest"]["max_candidate_sequences"])
        # Each state tensor has one dynamic (batch) axis: h, c [L, B, H], lags [B, S], lags_seen [B, 1].
        self.axis, self.state = {}, {}
        for name in self.state_names:
            shape = inputs[name].shape
            self.axis[name] = next(i for i, d in enumerate(shape) if not isinstance(d, int))
            full = [capacity if i == self.axis[name] else d for i, d in enumerate(shape)]
            self.state[name] = np.zeros(full, _DTYPES[inputs[name].type])
        self.outputs = ["forecast", *(f"{n}_out" for n in self.state_names)]
        self.rows: dict[int, int] = {}  # correlation id -> state row
        self.free = list(range(capacity - 1, -1, -1))

    def execute(self, requests: list) -> list:
        n = len(requests)
        values = np.empty(n, np.float32)
        stamps = np.empty(n, np.int64)
        rows = np.empty(n, np.int64)
        ends, responses = [], [None] * n
        for i, request in enumerate(requests):
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0])
            start = bool(pb_utils.get_input_tensor_by_name(request, "START").as_numpy().reshape(-1)[0])
            row = self.rows.get(corrid)
            if start:
                if row is None:
                    if not self.free:
                        responses[i] = _error(f"no free state row for sequence {corrid}")
                        continue
                    row = self.free.pop()
                    self.rows[corrid] = row
                for name, arr in self.state.items():  # zero state: the start of a series
                    _rows(arr, self.axis[name], [row])[...] = 0
            elif row is None:
                responses[i] = _error(f"sequence {corrid} is unknown: start it with sequence_start")
                continue
            if bool(pb_utils.get_input_tensor_by_name(request, "END").as_numpy().reshape(-1)[0]):
                ends.append(corrid)
            values[i] = pb_utils.get_input_tensor_by_name(request, "values").as_numpy().reshape(-1)[0]
            stamps[i] = pb_utils.get_input_tensor_by_name(request, "timestamps_ms").as_numpy().reshape(-1)[0]
            rows[i] = row
        ok = [i for i in range(n) if responses[i] is None]
        if ok:
            take = rows[ok]
            feeds = {"values": values[ok], "timestamps_ms": stamps[ok]}
            feeds |= {name: np.take(arr, take, axis=self.axis[name]) for name, arr in self.state.items()}
            forecast, *new_state = self.session.run(self.outputs, feeds)  # forecast [B, horizon, Q]
            for name, out in zip(self.state_names, new_state):
                index = [slice(None)] * out.ndim
                index[self.axis[name]] = take
                self.state[name][tuple(index)] = out
            for j, i in enumerate(ok):
                tensor = pb_utils.Tensor("forecast", forecast[j : j + 1])  # [1, horizon, Q]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        for corrid in ends:  # free after answering
            self.free.append(self.rows.pop(corrid))
        return responses


def _rows(arr: np.ndarray, axis: int, rows: list[int]) -> np.ndarray:
    index = [slice(None)] * arr.ndim
    index[axis] = slice(rows[0], rows[0] + 1)
    return arr[tuple(index)]


def _error(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
