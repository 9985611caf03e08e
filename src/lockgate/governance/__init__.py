"""lockgate.governance"""
