"""gRPC adapters: ``inference.GRPCInferenceService`` and ``lockgate.admin.v1.AdminService``."""
