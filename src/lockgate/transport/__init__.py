"""lockgate.transport: the adapters that carry requests to the pipeline, and the process.

``grpc/`` holds the gRPC servicers (inference, admin) and the one mapping from lockgate's error
hierarchy to gRPC statuses; ``server.py`` builds and runs the serving process.
"""
