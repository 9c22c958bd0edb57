"""elmm_ray.models"""
