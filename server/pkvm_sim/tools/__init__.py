"""pkvm_sim.tools"""
