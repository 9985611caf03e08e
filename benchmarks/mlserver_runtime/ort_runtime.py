"""Minimal ONNX Runtime custom runtime for Seldon MLServer 1.7 (the peer in the benchmark).

Deliberately as thin as MLServer allows: one session created in ``load()``, inputs decoded with
``NumpyCodec`` (MLServer has already unpacked ``raw_input_contents`` into the payload), outputs
encoded with ``NumpyCodec``. MLServer returns raw outputs when the request used raw inputs.
``predict_stream`` lets MLServer serve ``ModelStreamInfer`` with the same code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    """Serves one ONNX file; thread counts come from ``parameters.extra`` in model-settings."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        extra = (self._settings.parameters.extra or {}) if self._settings.parameters else {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        options.inter_op_num_threads = int(extra.get("inter_op_threads", 1))
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            feeds[request_input.name] = self.decode(request_input, default_codec=NumpyCodec)
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._output_names, results)],
        )

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        async for payload in payloads:
            yield await self.predict(payload)
