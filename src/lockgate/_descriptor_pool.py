"""lockgate's private protobuf descriptor pool.

Our generated stubs register here instead of protobuf's default pool. Triton's client stubs
use the same proto package (``inference``) with different file contents, and the default pool
refuses duplicate symbols, so an application importing both ``tritonclient`` and lockgate
would crash at import. Server reflection is served from this pool too, so the well-known and
health files our services use are preloaded into it.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool, duration_pb2, struct_pb2, timestamp_pb2

POOL = descriptor_pool.DescriptorPool()

for _module in (timestamp_pb2, duration_pb2, struct_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)

# Health and reflection are served beside our services; reflection answers from this pool.
from grpc_health.v1 import health_pb2 as _health_pb2  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2 as _reflection_pb2  # noqa: E402

for _module in (_health_pb2, _reflection_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
