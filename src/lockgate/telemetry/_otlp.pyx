# cython: language_level=3, boundscheck=False, wraparound=False
"""OTLP trace export: finished spans -> a serialized ``ExportTraceServiceRequest``.

Why by hand: at 100% tracing every request ends 3-4 spans, and building each one as a
protobuf message (a constructor call with a dozen keyword arguments, a merge of its
attributes, then a copy into its parent) was two thirds of the export thread's CPU, which
competes with the request path for the GIL and the two cores. Here each span's fixed fields
are written straight into one growing C buffer in protobuf's wire format; what is rare or
already cached comes in as bytes from :class:`lockgate.telemetry.tracing.SpanEncoder`:
the resource and scope (encoded once), the attributes (serialized once per distinct value),
and status, events and links (encoded with the generated classes when a span has them).

Field order differs from the SDK's encoder; the parsed message is the same (tested against
the SDK's ``encode_spans``).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy


cdef struct buf_t:
    unsigned char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _reserve(buf_t* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef unsigned char* p
    if b.n + extra <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < b.n + extra:
        cap *= 2
    p = <unsigned char*>PyMem_Realloc(b.p, cap)
    if p == NULL:
        raise MemoryError("OTLP encode buffer")
    b.p = p
    b.cap = cap
    return 0


cdef inline int _raw(buf_t* b, const void* data, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.p + b.n, data, n)
    b.n += n
    return 0


cdef inline int _varint(buf_t* b, unsigned long long v) except -1:
    _reserve(b, 10)
    while v >= 0x80:
        b.p[b.n] = <unsigned char>(v | 0x80)
        b.n += 1
        v >>= 7
    b.p[b.n] = <unsigned char>v
    b.n += 1
    return 0


cdef inline int _fixed(buf_t* b, unsigned long long v, int width) except -1:
    cdef int i
    _reserve(b, width)
    for i in range(width):  # little-endian, whatever the host order
        b.p[b.n + i] = <unsigned char>(v >> (8 * i))
    b.n += width
    return 0


cdef inline int _u64_be(buf_t* b, unsigned long long v) except -1:
    cdef int i
    _reserve(b, 8)
    for i in range(8):
        b.p[b.n + i] = <unsigned char>(v >> (8 * (7 - i)))
    b.n += 8
    return 0


cdef int _str_field(buf_t* b, int tag, str text) except -1:
    cdef Py_ssize_t n
    cdef const char* s = PyUnicode_AsUTF8AndSize(text, &n)
    _varint(b, tag)
    _varint(b, n)
    _raw(b, s, n)
    return 0


cdef int _bytes_field(buf_t* b, int tag, bytes data) except -1:
    _varint(b, tag)
    _varint(b, PyBytes_GET_SIZE(data))
    _raw(b, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    return 0


cdef int _nested(buf_t* outer, int tag, buf_t* inner) except -1:
    """Append ``inner`` as a length-delimited field of ``outer`` and empty ``inner``."""
    _varint(outer, tag)
    _varint(outer, inner.n)
    _raw(outer, inner.p, inner.n)
    inner.n = 0
    return 0


cdef enum:
    # wire tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
    T_TRACE_ID = (1 << 3) | 2
    T_SPAN_ID = (2 << 3) | 2
    T_TRACE_STATE = (3 << 3) | 2
    T_PARENT_SPAN_ID = (4 << 3) | 2
    T_NAME = (5 << 3) | 2
    T_KIND = (6 << 3) | 0
    T_START = (7 << 3) | 1
    T_END = (8 << 3) | 1
    T_DROPPED_ATTRIBUTES = (10 << 3) | 0
    T_DROPPED_EVENTS = (12 << 3) | 0
    T_DROPPED_LINKS = (14 << 3) | 0
    T_FLAGS = (16 << 3) | 5
    T_FIELD1 = (1 << 3) | 2  # ExportTraceServiceRequest.resource_spans, ResourceSpans.resource, ScopeSpans.scope
    T_FIELD2 = (2 << 3) | 2  # ResourceSpans.scope_spans, ScopeSpans.spans
    T_FIELD3 = (3 << 3) | 2  # schema_url
    FLAGS_HAS_IS_REMOTE = 0x100
    FLAGS_IS_REMOTE = 0x200


# Read ReadableSpan's fields directly (``span._name`` ...) rather than through its properties:
# a property call, a MappingProxyType for the attributes and an ABC isinstance check per
# dropped-count were most of a span's encoding time. ``probe_private_fields`` checks once
# that the installed SDK stores them as expected; otherwise the public properties are used.
cdef bint _private = False


def probe_private_fields(span) -> bool:
    """Use the private fields if ``span`` (a ReadableSpan) exposes them as its properties do."""
    global _private
    try:
        ok = (span._name is span.name and span._context is span.get_span_context() and span._kind is span.kind
              and span._parent is span.parent and span._start_time == span.start_time
              and span._end_time == span.end_time and span._status is span.status
              and span._events is not None and span._links is not None
              and tuple(span._context) [:2] == (span.get_span_context().trace_id, span.get_span_context().span_id)
              and span._context[2] is span.get_span_context().is_remote
              and span._context[4] is span.get_span_context().trace_state)
    except (AttributeError, TypeError, IndexError):
        ok = False
    _private = bool(ok)
    return _private


cdef int _attributes(buf_t* b, object attributes, dict cache, object encoder) except -1:
    """Append the attributes as serialized Span.attributes fields, each cached by value."""
    cdef bytes part
    for key, value in attributes.items():
        cache_key = (key, type(value), value)  # the type keeps True, 1 and 1.0 apart
        try:
            part = cache.get(cache_key)
        except TypeError:  # unhashable (a list): encode, do not cache
            part = encoder._encode_attribute(key, value)
        else:
            if part is None:
                part = encoder._encode_attribute(key, value)
                if len(cache) >= encoder.max_cached_attributes:  # high-cardinality values: start over
                    cache.clear()
                cache[cache_key] = part
        _raw(b, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))
    return 0


cdef int _span(buf_t* b, object span, object encoder, dict cache, dict kinds, object unset, object empty_state) except -1:
    cdef unsigned int flags = FLAGS_HAS_IS_REMOTE
    cdef unsigned long long kind
    if _private:
        ctx = span._context
        trace_id = ctx[0]
        span_id = ctx[1]
        state = ctx[4]
        parent = span._parent
        name = span._name
        kind_obj = span._kind
        start = span._start_time
        end = span._end_time
        attributes = span._attributes
        status = span._status
        events = span._events
        links = span._links
    else:
        ctx = span.get_span_context()
        trace_id = ctx.trace_id
        span_id = ctx.span_id
        state = ctx.trace_state
        parent = span.parent
        name = span.name
        kind_obj = span.kind
        start = span.start_time
        end = span.end_time
        attributes = span.attributes
        status = span.status
        events = span.events
        links = span.links
    _varint(b, T_TRACE_ID)
    _varint(b, 16)
    _u64_be(b, PyLong_AsUnsignedLongLongMask(trace_id >> 64))
    _u64_be(b, PyLong_AsUnsignedLongLongMask(trace_id))
    _varint(b, T_SPAN_ID)
    _varint(b, 8)
    _u64_be(b, PyLong_AsUnsignedLongLongMask(span_id))
    if state is not empty_state and state:
        _str_field(b, T_TRACE_STATE, state.to_header())
    if parent is not None:
        _varint(b, T_PARENT_SPAN_ID)
        _varint(b, 8)
        if _private:  # a SpanContext is a tuple: (trace_id, span_id, is_remote, ...)
            _u64_be(b, PyLong_AsUnsignedLongLongMask(parent[1]))
            remote = parent[2]
        else:
            _u64_be(b, PyLong_AsUnsignedLongLongMask(parent.span_id))
            remote = parent.is_remote
        if remote:
            flags |= FLAGS_IS_REMOTE
    _str_field(b, T_NAME, name)
    kind = kinds[id(kind_obj)]
    if kind:
        _varint(b, T_KIND)
        _varint(b, kind)
    if start:
        _varint(b, T_START)
        _fixed(b, PyLong_AsUnsignedLongLongMask(start), 8)
    if end:
        _varint(b, T_END)
        _fixed(b, PyLong_AsUnsignedLongLongMask(end), 8)
    _varint(b, T_FLAGS)
    _fixed(b, flags, 4)
    if attributes:
        _attributes(b, attributes, cache, encoder)
        if type(attributes) is not dict:  # the SDK's BoundedAttributes may have dropped some
            dropped = span.dropped_attributes
            if dropped:
                _varint(b, T_DROPPED_ATTRIBUTES)
                _varint(b, dropped)
    if (status is not None and status is not unset) or events or links:
        tail = encoder._rare_fields(span)  # status, events, links: b"" when UNSET and none
        if tail:
            _raw(b, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
        if type(events) is not tuple:
            dropped = span.dropped_events
            if dropped:
                _varint(b, T_DROPPED_EVENTS)
                _varint(b, dropped)
        if type(links) is not tuple:
            dropped = span.dropped_links
            if dropped:
                _varint(b, T_DROPPED_LINKS)
                _varint(b, dropped)
    return 0


def encode_export_request(spans, encoder, dict kinds, object unset, object empty_state):
    """Serialize ``spans`` (ReadableSpans) as one ``ExportTraceServiceRequest``.

    ``encoder`` provides ``_resource_bytes(resource)``, ``_scope_bytes(scope)``,
    ``_encode_attribute(key, value)``, ``_rare_fields(span)`` (each returning serialized
    fields), its attribute cache ``_attrs`` and ``max_cached_attributes``; ``kinds`` maps
    ``id(SpanKind member)`` to the OTLP enum number; ``unset`` is the shared UNSET status and
    ``empty_state`` the shared empty TraceState (identity checks skip the slower tests).
    """
    cdef dict cache = encoder._attrs
    # Group by resource and scope identity (spans share their tracer's objects); an equal
    # scope held in a second object only makes a second ScopeSpans, which is still valid.
    groups = {}
    for span in spans:
        if _private:
            resource = span._resource
            scope = span._instrumentation_scope
        else:
            resource = span.resource
            scope = span.instrumentation_scope
        group = groups.get(id(resource))
        if group is None:
            group = groups[id(resource)] = (resource, {})
        members = group[1].get(id(scope))
        if members is None:
            members = group[1][id(scope)] = (scope or None, [])
        members[1].append(span)
    cdef buf_t out, rs, ss, sp
    out.p = rs.p = ss.p = sp.p = NULL
    out.n = rs.n = ss.n = sp.n = 0
    out.cap = rs.cap = ss.cap = sp.cap = 0
    try:
        for resource, scopes in groups.values():
            _bytes_field(&rs, T_FIELD1, encoder._resource_bytes(resource))
            for scope, members in scopes.values():
                _bytes_field(&ss, T_FIELD1, encoder._scope_bytes(scope))
                for span in members:
                    _span(&sp, span, encoder, cache, kinds, unset, empty_state)
                    _nested(&ss, T_FIELD2, &sp)
                if scope is not None and scope.schema_url:
                    _str_field(&ss, T_FIELD3, scope.schema_url)
                _nested(&rs, T_FIELD2, &ss)
            if resource.schema_url:
                _str_field(&rs, T_FIELD3, resource.schema_url)
            _nested(&out, T_FIELD1, &rs)
        if out.n == 0:
            return b""
        return PyBytes_FromStringAndSize(<char*>out.p, out.n)
    finally:
        PyMem_Free(out.p)
        PyMem_Free(rs.p)
        PyMem_Free(ss.p)
        PyMem_Free(sp.p)
