"""pkvm_sim.metrics"""
