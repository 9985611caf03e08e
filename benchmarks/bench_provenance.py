"""Signature verification at load vs a plain SHA-256 of the same bytes (issue 19).

Run: ``.venv/bin/python benchmarks/bench_provenance.py [--size-mb 1024] [--repeats 5]``.

Builds a version directory in a temporary folder (removed afterwards): a ``model.onnx`` of
``--size-mb`` MiB whose weights are generated in code and streamed to disk (one MatMul with a
large initializer; a small copy is loaded with ONNX Runtime first to prove the writer makes a
valid model), plus a small side file, signed with a fresh EC P-256 key through
``lockgate models sign``'s code path. Then, interleaved in every repeat (rotating the order):

* ``sha256``      hashlib over every file of the directory (1 MiB reads): the floor;
* ``lockgate``    what a load does: ``ProvenanceGate.verify`` (model-signing verifies the bundle
                  and hashes the manifest) + the registry digest taken from that manifest;
* ``two passes``  the same checks without reuse: model-signing's verify, then a separate
                  SHA-256 of ``model.onnx`` for the registry (what hashing twice would cost).

Prints medians (seconds) and ratios to ``sha256``; the target is ``lockgate`` <= 1.2x. The
files are read from the page cache after a warm-up pass, so the ratio compares hashing work,
not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
from onnx import TensorProto, helper

from lockgate.config import ProvenanceSettings, TrustedSignerSettings
from lockgate.control.provenance import ProvenanceGate, sign_directory
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.validation import sha256_file
from lockgate.demo import IR_VERSION, OPSET

ROWS = 1024  # W is ROWS x cols float32
CHUNK = 16 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def write_large_onnx(path: Path, size_bytes: int, seed: int = 0) -> int:
    """``Y = X @ W`` with W (ROWS x cols, float32, random) of about ``size_bytes``, streamed.

    The graph is serialised without W, then a second ``graph`` field holding only W's
    initializer is appended: protobuf merges a repeated singular message field, so parsers see
    one graph with W, and the weights never sit in memory whole. Returns the file size.
    """
    cols = max(1, size_bytes // (4 * ROWS))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "large",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", ROWS])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", cols])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    header = TensorProto(dims=[ROWS, cols], data_type=TensorProto.FLOAT, name="W").SerializeToString()
    nbytes = ROWS * cols * 4
    tensor_len = len(header) + len(_field(9, nbytes)) + nbytes
    graph_part_len = len(_field(5, tensor_len)) + tensor_len
    rng = np.random.default_rng(seed)
    with path.open("wb") as out:
        out.write(model.SerializeToString())
        out.write(_field(7, graph_part_len))
        out.write(_field(5, tensor_len))
        out.write(header)
        out.write(_field(9, nbytes))
        left = nbytes
        while left:
            n = min(CHUNK, left)
            out.write(rng.standard_normal(n // 4, dtype=np.float32).tobytes())
            left -= n
    return path.stat().st_size


def check_writer(directory: Path) -> None:
    """A 1 MiB model from the same writer loads in ONNX Runtime and computes X @ W."""
    import onnxruntime as ort

    path = directory / "check.onnx"
    write_large_onnx(path, 1 << 20, seed=1)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((2, ROWS), np.float32)
    weights = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    assert np.allclose(session.run(None, {"X": x})[0], x @ weights, rtol=1e-4, atol=1e-3)
    path.unlink()


def plain_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "model.sig"):
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def make_key(directory: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "bench.pem", directory / "bench.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="model.onnx size in MiB [1024]")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lockgate-bench-provenance-") as tmp:
        root = Path(tmp)
        check_writer(root)
        version_dir = root / "models" / "large" / "1"
        version_dir.mkdir(parents=True)
        started = time.perf_counter()
        size = write_large_onnx(version_dir / "model.onnx", args.size_mb << 20)
        (version_dir / "tokenizer.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(1000)]}))
        print(f"wrote {size / 2**20:.0f} MiB model.onnx in {time.perf_counter() - started:.1f}s", flush=True)
        private, public = make_key(root)
        started = time.perf_counter()
        sign_directory(version_dir, private)
        print(f"signed in {time.perf_counter() - started:.2f}s", flush=True)
        store = SQLiteStore(root / "state")
        gate = ProvenanceGate(store, settings=ProvenanceSettings(
            require_signature="always",
            trusted_signers=[TrustedSignerSettings(name="bench", vendor="bench", public_key=public)]))
        artifact = version_dir / "model.onnx"
        from model_signing import verifying

        def lockgate_load() -> str:
            provenance = gate.verify("large", "1", version_dir, stage="load")
            return provenance.artifact_digest(artifact)

        def two_passes() -> str:
            verifying.Config().use_elliptic_key_verifier(public_key=public).verify(version_dir, version_dir / "model.sig")
            return sha256_file(artifact)

        variants = {"sha256": lambda: plain_sha256(version_dir), "lockgate": lockgate_load, "two passes": two_passes}
        expected = sha256_file(artifact)
        assert lockgate_load() == expected and two_passes() == expected  # warm-up: page cache, imports
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                began = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - began)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
        store.close()

    base = statistics.median(times["sha256"])
    print()
    print(f"provenance benchmark: {size / 2**20:.0f} MiB version directory, median of {args.repeats} interleaved repeats")
    print(f"{'check':<50} {'median s':>9} {'x sha256':>9}")
    rows = {"sha256": "plain SHA-256 of every byte (floor)",
            "lockgate": "lockgate load: verify model.sig + registry digest",
            "two passes": "verify + separate SHA-256 of model.onnx"}
    results = {}
    for name in names:
        median = statistics.median(times[name])
        results[name] = {"median_s": median, "ratio": median / base, "runs": times[name]}
        print(f"{rows[name]:<50} {median:>9.3f} {median / base:>8.2f}x")
    ratio = results["lockgate"]["ratio"]
    print(f"target lockgate <= 1.2x sha256: {'met' if ratio <= 1.2 else 'NOT met'} ({ratio:.2f}x); "
          f"loadavg {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json is not None:
        args.json.write_text(json.dumps({"size_mib": size / 2**20, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
