"""Build steps that pyproject.toml cannot express.

* Compiles every ``.pyx`` under ``src/lockgate`` (the fused governance kernel and the
  tensor codec helpers) with Cython.
* Generates the gRPC stubs from ``proto/`` with grpcio-tools into ``src/lockgate/_proto``
  (generated code is never committed).
* Chooses the ONNX Runtime wheel: ``onnxruntime`` by default, ``onnxruntime-gpu`` when
  ``LOCKGATE_ONNXRUNTIME=gpu`` is set or onnxruntime-gpu is already installed, because the two
  wheels ship the same module and must never be installed side by side.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
PROTO_OUT = ROOT / "src" / "lockgate" / "_proto"

# What ``make demo`` installs: the server and its CLI, nothing for tests. Lower bounds are the
# versions the generated stubs need (see pyproject.toml's build-system note), so pip never
# has to search below them.
BASE_DEPENDENCIES = [
    "grpcio>=1.81.1",
    "grpcio-health-checking>=1.81.1",
    "grpcio-reflection>=1.81.1",
    "grpcio-status>=1.81.1",
    "protobuf>=6.33.5",
    "onnx>=1.15",
    "numpy>=1.26",
    "uvloop>=0.19; sys_platform != 'win32'",
    # Bounded above: lockgate.telemetry.tracing encodes OTLP spans with helpers private to
    # opentelemetry-exporter-otlp-proto-common 1.45 (5x cheaper than the public encoder);
    # tests/test_telemetry_tracing.py checks the output is identical to the SDK's.
    "opentelemetry-api>=1.45,<1.46",
    "opentelemetry-sdk>=1.45,<1.46",
    "opentelemetry-exporter-otlp>=1.45,<1.46",
    "opentelemetry-exporter-otlp-proto-common>=1.45,<1.46",
    "prometheus-client>=0.20",
    "datasketches>=5.0",
    # p-values of the drift tests when SciPy (extra "stats") is absent; pure Python, 1 MB
    "mpmath>=1.3",
    "pydantic>=2.6",
    "pyyaml>=6.0",
    "typer>=0.12",
    "rich>=13.7",
    "packaging>=24.2",  # packaging.licenses: SPDX licence ids on model cards
]


def _onnxruntime_requirement() -> str:
    if os.environ.get("LOCKGATE_ONNXRUNTIME", "").lower() == "gpu":
        return "onnxruntime-gpu>=1.17"
    try:
        importlib.metadata.version("onnxruntime-gpu")
        return "onnxruntime-gpu>=1.17"
    except importlib.metadata.PackageNotFoundError:
        return "onnxruntime>=1.17"


def generate_protos() -> None:
    """Run protoc over proto/ and make the generated imports package-relative."""
    from grpc_tools import protoc  # build-time dependency (pyproject build-system.requires)
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        return
    PROTO_OUT.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={PROTO_OUT}",
        f"--pyi_out={PROTO_OUT}",
        f"--grpc_python_out={PROTO_OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    # Generated modules import each other as top-level modules; make them relative to
    # lockgate._proto so they never clash with another package's stubs.
    modules = {Path(p).with_suffix("").as_posix().replace("/", ".") for p in protos}
    for path in PROTO_OUT.rglob("*.py"):
        text = path.read_text()
        depth = len(path.relative_to(PROTO_OUT).parts) - 1
        prefix = "." * (depth + 1)
        for mod in modules:
            pkg, _, name = mod.rpartition(".")
            pb = f"{mod}_pb2"
            if pkg:
                text = re.sub(rf"^from {re.escape(pkg)} import {name}_pb2 as", f"from {prefix}{pkg} import {name}_pb2 as", text, flags=re.M)
            else:
                text = re.sub(rf"^import {re.escape(pb)} as", f"from {prefix} import {pb} as", text, flags=re.M)
        # Register our descriptors in lockgate's own pool, not protobuf's default one: the
        # package is `inference`, like tritonclient's stubs, and the default pool refuses
        # two different files defining the same symbols in one process.
        if "_descriptor_pool.Default().AddSerializedFile(" in text:
            text = text.replace(
                "_descriptor_pool.Default().AddSerializedFile(",
                "_lockgate_pool.POOL.AddSerializedFile(",
            ).replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                "from google.protobuf import descriptor_pool as _descriptor_pool\n"
                "from lockgate import _descriptor_pool as _lockgate_pool\n",
            )
        path.write_text(text)
    for folder in [PROTO_OUT, *[d for d in PROTO_OUT.rglob("*") if d.is_dir()]]:
        (folder / "__init__.py").touch()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class BuildExtWithProtos(build_ext):
    """Editable installs run build_ext but not build_py, so protos are generated here too."""

    def run(self) -> None:
        generate_protos()
        super().run()


def cython_extensions() -> list[Extension]:
    import numpy
    from Cython.Build import cythonize

    sources = sorted(ROOT.glob("src/lockgate/**/*.pyx"))
    extensions = [
        Extension(
            ".".join(src.relative_to(ROOT / "src").with_suffix("").parts),
            [str(src.relative_to(ROOT))],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3"],
        )
        for src in sources
    ]
    return cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


setup(
    install_requires=[*BASE_DEPENDENCIES, _onnxruntime_requirement()],
    ext_modules=cython_extensions(),
    cmdclass={"build_py": BuildPyWithProtos, "build_ext": BuildExtWithProtos},
)
