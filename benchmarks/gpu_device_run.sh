#!/usr/bin/env bash
# The whole GPU check, as run on a lent device machine (shared/GPU.md): unpack the carried
# site-packages (onnxruntime-gpu and lockgate's other dependencies, built for cp312), build the
# Cython kernels and gRPC stubs there, run benchmarks/gpu_check.py and tests/test_gpu_cuda.py
# (STEPS=check,tests, the default) and/or benchmarks/gpu_served.py (STEPS=served).
#
# Prepared here:  pip download the cp312 wheels; unzip them into one folder with onnxruntime-gpu
# (minus its TensorRT provider and the C-API libonnxruntime.so, which the Python module does not
# load); tar | xz -9; split -n 4 into .gpu1/part0 ... .gpu4/part3 (git-ignored); send the parts
# in consecutive calls, the last one running this script. Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/site
cat .gpu*/part* > /tmp/site.tar.xz && tar xJf /tmp/site.tar.xz -C /tmp/site || { echo "unpack failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi -L
python3 -c "import onnxruntime as o, grpc, google.protobuf as p; print('onnxruntime', o.__version__, o.get_available_providers(), 'grpc', grpc.__version__, 'protobuf', p.__version__)"
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 4; }
STEPS=${STEPS:-check,tests}
if [[ ",$STEPS," == *",check,"* ]]; then
  timeout 170 python3 benchmarks/gpu_check.py --seconds "${GPU_CHECK_SECONDS:-2}" --json "$OUT/gpu.json" > "$OUT/check.log" 2>&1
  echo "gpu_check rc=$?"; tail -45 "$OUT/check.log"
fi
if [[ ",$STEPS," == *",tests,"* ]]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rA tests/test_gpu_cuda.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|Error" "$OUT/pytest.log" | tail -30
fi
if [[ ",$STEPS," == *",served,"* ]]; then
  timeout 240 python3 benchmarks/gpu_served.py ${GPU_SERVED_ARGS:-} --json "$OUT/served.json" > "$OUT/served.log" 2>&1
  echo "gpu_served rc=$?"; tail -30 "$OUT/served.log"
fi
