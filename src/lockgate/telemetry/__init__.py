"""lockgate.telemetry"""
