"""elmm_ray.pruning"""
