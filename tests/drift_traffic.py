"""Governed demo traffic written the way ``lockgate serve`` writes it, for tests of the offline
drift commands (``drift report``) that need closed windows in a repository's state directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from lockgate.demo import DEMO_CONFIG, reference_sample
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import ReferenceProfile


def demo_traffic(rows: int, seed: int) -> np.ndarray:
    """The demo's applicants, drifted: older, a region code the reference never had, and
    some missing credit lines."""
    x = reference_sample(rows, seed=seed).astype(np.float32)
    x[:, 0] = np.clip(x[:, 0] + 10, 18, 120)
    rng = np.random.default_rng(seed)
    x[rng.random(rows) < 0.2, 7] = 9
    x[rng.random(rows) < 0.1, 3] = np.nan
    return x


def serve_windows(root: Path, version: str, x: np.ndarray, profile: ReferenceProfile | None) -> None:
    """What `lockgate serve` leaves behind: closed windows of the demo's governed traffic in
    <repository>/.lockgate/drift (the demo's state directory), outputs included."""
    import onnxruntime as ort

    section = yaml.safe_load(DEMO_CONFIG)["governance"]
    section["mode"] = "flag"  # the drifted rows are served, as a flagging deployment would
    section["inputs"]["features"]["features"].pop("region")  # region 9 is new, not refused
    config = GovernanceConfig.model_validate(section)
    engine = GovernanceEngine("credit", version, config, ["features"], profile, state_dir=root / ".lockgate", background=False)
    session = ort.InferenceSession(str(root / "credit" / version / "model.onnx"), providers=["CPUExecutionProvider"])
    for start in range(0, len(x), 50):
        batch = x[start:start + 50]
        inspection = engine.inspect({"features": batch}, f"r{start}")
        engine.observe_outputs({"probabilities": session.run(None, {"features": batch})[0]}, inspection)
    engine.close()
