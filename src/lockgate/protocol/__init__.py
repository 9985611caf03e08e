"""lockgate.protocol"""
