"""pkvm_sim.service"""
