"""Property tests of the wire decoder (hypothesis): for any datatype, shape and bytes, decoding
gives the right array or refuses with InvalidArgument (LimitExceeded, i.e. RESOURCE_EXHAUSTED,
when a configured limit is what the request breaks) -- never another exception, and never an
allocation larger than the bytes sent allow."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate._proto import inference_pb2 as pb
from lockgate.errors import InvalidArgument
from lockgate.protocol import codec, datatypes
from lockgate.protocol._bytes_codec import decode_bytes_tensor, encode_bytes_tensor
from lockgate.protocol.codec import LimitExceeded, Limits, Signature, TensorSpec

NAMES = list(datatypes.SUPPORTED_NAMES)
LIMITS = Limits(max_dims=8, max_elements=1 << 16, max_bytes_elements=1 << 12, max_output_bytes=1 << 20)
dims = st.one_of(st.integers(0, 6), st.integers(-3, -1), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1]))
SETTINGS = settings(max_examples=int(os.environ.get("LOCKGATE_HYPOTHESIS_EXAMPLES", 400)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _signature(datatype: str, rank: int, fixed: list[int] | None) -> Signature:
    shape = tuple(fixed) if fixed is not None else (-1,) * rank
    spec = TensorSpec("INPUT0", datatypes.BY_NAME[datatype], shape)
    return Signature((spec,), (TensorSpec("OUTPUT0", datatypes.BY_NAME[datatype], shape),), 0)


def _decode(request: pb.ModelInferRequest, signature: Signature):
    try:
        return codec.decode_inputs(request, signature, LIMITS)
    except (InvalidArgument, LimitExceeded) as exc:
        assert exc.message and len(exc.message) < 2000
        return None


@SETTINGS
@given(model_type=st.sampled_from(NAMES), sent_type=st.one_of(st.sampled_from(NAMES), st.text(max_size=12)),
       shape=st.lists(dims, max_size=10), raw=st.binary(max_size=512), fixed=st.booleans())
def test_any_datatype_shape_and_bytes(model_type: str, sent_type: str, shape: list[int], raw: bytes, fixed: bool) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="INPUT0", datatype=sent_type, shape=shape)
    request.raw_input_contents.append(raw)
    spec_shape = [d if 0 <= d < 2**31 else 1 for d in shape] if fixed else None
    arrays = _decode(request, _signature(model_type, len(shape), spec_shape))
    if arrays is None:
        return
    (array,) = arrays.values()
    assert sent_type == model_type and list(array.shape) == shape
    if model_type == "BYTES":  # the right strings: they encode back to the bytes sent
        assert encode_bytes_tensor(array) == raw
    else:
        expected = np.frombuffer(raw, dtype=datatypes.BY_NAME[model_type].numpy).reshape(shape)
        np.testing.assert_array_equal(array, expected)


@SETTINGS
@given(datatype=st.sampled_from([n for n in NAMES if n != "FP16"]), shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
       data=st.data())
def test_valid_requests_decode_to_their_arrays(datatype: str, shape: list[int], data: st.DataObject) -> None:
    """Raw or typed, a request built from an array decodes to that array."""
    n = int(np.prod(shape))
    dt = datatypes.BY_NAME[datatype]
    if datatype == "BYTES":
        values = data.draw(st.lists(st.text(max_size=8), min_size=n, max_size=n))
        array = np.array(values, dtype=object).reshape(shape)
        raw = encode_bytes_tensor(array)
    elif datatype == "BOOL":
        array = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(shape)
        raw = array.tobytes()
    elif dt.numpy.kind == "f":
        array = np.array(data.draw(st.lists(st.floats(width=32, allow_nan=False), min_size=n, max_size=n)),
                         dtype=dt.numpy).reshape(shape)
        raw = array.tobytes()
    else:
        info = np.iinfo(dt.numpy)
        array = np.array(data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n)),
                         dtype=dt.numpy).reshape(shape)
        raw = array.tobytes()
    typed = data.draw(st.booleans())
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    if typed:
        values = [v.encode() for v in array.ravel()] if datatype == "BYTES" else array.ravel().tolist()
        getattr(tensor.contents, dt.contents_field).extend(values)
    else:
        request.raw_input_contents.append(raw)
    arrays = codec.decode_inputs(request, _signature(datatype, len(shape), None), LIMITS)
    got = arrays["INPUT0"]
    assert got.shape == array.shape
    assert got.tolist() == array.tolist()


@SETTINGS
@given(raw=st.binary(max_size=300), count=st.one_of(st.integers(-5, 80), st.sampled_from([2**30, 2**40, 2**62])))
def test_bytes_decoder_gives_the_elements_or_a_value_error(raw: bytes, count: int) -> None:
    try:
        out = decode_bytes_tensor(raw, count)
    except (ValueError, OverflowError):  # OverflowError: a count beyond Py_ssize_t, refused by the codec first
        return
    assert out.shape == (count,) and encode_bytes_tensor(out) == raw
