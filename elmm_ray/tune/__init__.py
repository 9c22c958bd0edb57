"""elmm_ray.tune"""
