"""lockgate.control"""
