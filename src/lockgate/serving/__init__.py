"""lockgate.serving"""
