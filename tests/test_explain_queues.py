"""The explain queues in process: background explanations of sampled plain traffic have a queue
of their own and never take the place of a caller who asked for an explanation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_model
from explain_models import logistic_model
from lockgate._proto import inference_pb2 as pb
from lockgate.errors import ExplainQueueFull
from lockgate.explain.service import ExplainService
from lockgate.governance.stage import GovernanceStage
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.serving.repository import ModelRepository

COEF = np.array([0.5, -1.0, 2.0])
CONFIG = """\
max_batch_size: 8
governance:
  mode: flag
  sampling: {rate: 1.0, max_per_second: 10000}
explain:
  max_queue: 1
  sample_share: 1.0
  sample_max_queue: 1
"""


def _request(request_id: str, explain: bool = False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="lr", id=request_id)
    tensor = req.inputs.add(name="features", datatype="FP32", shape=[1, len(COEF)])
    req.raw_input_contents.append(np.ones((1, len(COEF)), np.float32).tobytes())
    assert tensor.name == "features"
    if explain:
        req.parameters["lockgate_explain"].bool_param = True
    return req


def test_sampled_explanations_never_take_an_on_demand_place(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "lr", 1, logistic_model(COEF, 0.1), CONFIG)

    async def scenario() -> None:
        repository = ModelRepository(repo)
        explain = ExplainService(repository_root=repo, state_dir=tmp_path / "state")
        governance = GovernanceStage(repository_root=repo, state_dir=tmp_path / "state",
                                     payload_explainer=explain.sample)
        repository.add_version_hooks(governance.prepare, governance.release)
        repository.add_version_hooks(explain.prepare, explain.release)
        pipeline = InferencePipeline(repository, governance=governance, explain=explain)
        await repository.load_all()
        try:
            version = repository.get("lr").get("1")
            state = version.extensions["explain"]
            # a plain request, sampled into the payload log and chosen for a background explanation;
            # the pool cannot have answered yet (nothing yielded to the loop since sample() ran)
            await pipeline.infer(_request("plain-1"), pb.ModelInferResponse, RequestContext())
            assert state.sampled_in_flight == 1 and state.in_flight == 0
            # the caller's explanation still gets the one on-demand place ...
            ticket = explain.admit(version, _request("asked-1", explain=True), {"features": np.ones((1, 3))},
                                   RequestContext())
            assert ticket is not None and state.in_flight == 1
            # ... and the next caller finds the on-demand queue, not the sampled one, full
            with pytest.raises(ExplainQueueFull):
                explain.admit(version, _request("asked-2", explain=True), {"features": np.ones((1, 3))},
                              RequestContext())
            ticket.abandon()
            assert state.in_flight == 0
            # a second sampled payload while the first is explained is logged unexplained, counted
            await pipeline.infer(_request("plain-2"), pb.ModelInferResponse, RequestContext())
            assert state.sampled.get("explain_queue_full") == 1
        finally:
            await repository.close()  # the gateway's order: versions drain, then the pool closes
            await explain.close()
            governance.close()

    asyncio.run(scenario())
    # nothing lost: the explanation still pending at shutdown is logged with its payload (explain's
    # release runs before governance's, which closes the payload log), the skipped one too
    log_file = tmp_path / "state" / "payloads" / "lr" / "1" / "payloads.jsonl"
    records = {r["request_id"]: r for r in map(json.loads, log_file.read_text().splitlines())}
    assert records["plain-1"]["explanation"] == {"status": "unfinished", "reason": "version unloaded"}
    assert records["plain-2"]["explanation"] == {"status": "skipped", "reason": "explain_queue_full"}
    assert "attributions" not in records["plain-1"]
