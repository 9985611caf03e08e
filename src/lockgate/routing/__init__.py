"""lockgate.routing"""
